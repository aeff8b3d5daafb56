"""The model card of a quantized folder: the folder's own card (when it has one) with a Quantization section saying
what was quantized, how, by which tool, and how the result compared with the unquantized model (from quantize.json,
rtk.quantize.ort's record). A folder without a card gets a short one around the section."""
from __future__ import annotations

from typing import Optional

SECTION = "## Quantization"


def _weights(rec: dict) -> str:
    after = rec["weights_after"]
    int8 = sum(after.get(t, {}).get("elements", 0) for t in ("INT8", "UINT8"))
    total = sum(r["elements"] for r in after.values())
    before = sum(r["bytes"] for r in rec["weights_before"].values())
    now = sum(r["bytes"] for r in after.values())
    return (f"{int8:,} of {total:,} stored elements are bytes of integer weights ({int8 / max(total, 1):.0%}: "
            f"weights, packed two to a byte at 4 bits, and zero points); stored bytes {before:,} -> {now:,} "
            f"({now / max(before, 1):.0%})")


def _tolerance(tol: dict) -> str:
    who = ("rtk's default" if tol.get("default", True) else
           "set by --max-ppl-increase / --max-logprob-diff; rtk's default is +5% and 0.1")
    return (f"- Tolerance (the command fails beyond it; {who}): PPL at most +{tol['max_ppl_increase']:.0%}, mean "
            f"|log-prob difference| at most {tol['max_mean_abs_logprob_diff']:g} nats per token.")


def llm_compressor_lines(rec: dict) -> list[str]:
    v, cal, ver = rec["verification"], rec["calibration"], rec["versions"]
    tol = v["tolerance"]
    how = (f"GPTQ on {cal['samples']} blocks x {cal['seq_len']} tokens of {cal['text']}" if cal
           else "round-to-nearest weights, no calibration data")
    return [
        SECTION, "",
        f"Scheme `{rec['scheme']}`: llm-compressor's `{rec['preset']}` preset (`{rec['tool']}`, {rec['modifier']}; "
        f"llmcompressor {ver['llmcompressor']}, compressed-tensors {ver['compressed-tensors']}), {how}: a "
        "compressed-tensors checkpoint that vLLM loads as it is (`quantization_config` in config.json).", "",
        f"- Quantized: {rec['quantized_linears']} of {rec['linears']} Linear layers (attention projections, MLP). "
        f"Kept unquantized: {', '.join(rec['not_quantized']) or 'none'}, the embedding and the norms.",
        f"- Compared on the same token ids, {v['blocks']} blocks x {v['seq_len']} tokens of {rec['text']['text']}: "
        f"{v['reference']} against {v['served']}: PPL {v['ppl_unquantized']:.4f} -> {v['ppl_quantized']:.4f} "
        f"({v['ppl_increase']:+.2%}); mean |log-prob difference| per token {v['prefill']['mean_abs_logprob_diff']:.4f} "
        f"nats (largest {v['prefill']['max_abs_logprob_diff']:.3f}).",
        _tolerance(tol),
        "", "Every setting and number: `quantize.json`; llm-compressor's own recipe: `recipe.yaml`. Serve it as the "
        "unquantized folder (`rtk deploy`, `rtk bench --backend vllm`).", ""]


def card_lines(rec: dict) -> list[str]:
    if rec["tool"].startswith("llmcompressor"):
        return llm_compressor_lines(rec)
    v = rec["verification"]
    tol = v["tolerance"]
    how = ("dynamic quantization" if rec["tool"].endswith("quantize_dynamic")
           else "block-wise weight quantization (MatMulNBits)")
    floats = rec.get("float_kinds") or []
    search = rec.get("keep_float_search")
    kept = (f"; left float32 (`--keep-float`): {rec['float_matmuls']} MatMuls of kinds {', '.join(floats)}"
            + (f", found by the accuracy-aware search ({len(search)} tries, in quantize.json)" if search else "")
            if floats else "")
    return [
        SECTION, "",
        f"Scheme `{rec['scheme']}`: ONNX Runtime's own {how} (`{rec['tool']}`, onnxruntime "
        f"{rec['onnxruntime']}) of the unquantized ONNX export, no calibration data.", "",
        f"- Quantized: {rec['quantized_matmuls']} of {rec['weight_matmuls']} MatMuls with a stored weight "
        f"(attention projections, MLP, an untied LM head): weights {rec['weights']}; activations "
        f"{rec['activations']}{kept}.",
        f"- Kept float32: the embedding and a head tied to it, norms, the attention arithmetic, and the graph's "
        f"inputs and outputs, the KV cache included (names, types and shapes as the export's). {_weights(rec)}.",
        f"- Compared with the unquantized export in ONNX Runtime ({v['provider']}) on the same token ids, "
        f"{v['blocks']} blocks x {v['seq_len']} tokens of {rec['text']['text']}: PPL {v['ppl_unquantized']:.4f} -> "
        f"{v['ppl_quantized']:.4f} ({v['ppl_increase']:+.2%}); mean |log-prob difference| per token "
        f"{v['prefill']['mean_abs_logprob_diff']:.4f} nats (largest {v['prefill']['max_abs_logprob_diff']:.3f}), "
        f"decoding through the KV cache {v['decode']['mean_abs_logprob_diff']:.4f}.",
        _tolerance(tol),
        "", "Every setting and number: `quantize.json`. Run it with ONNX Runtime as the unquantized folder "
        "(`rtk bench --backend onnx`, onnxruntime-genai with `genai_config.json`).", ""]


def card_with(existing: Optional[str], rec: dict) -> str:
    """`existing` card (None: a short new one) with the Quantization section appended."""
    if existing is None:
        lib = "vllm" if rec["tool"].startswith("llmcompressor") else "onnxruntime"
        existing = "\n".join(["---", f"library_name: {lib}", f"tags: [rtk, {rec['scheme']}]", "---", "",
                              f"# {rec['source']}, quantized by rtk", ""])
    return existing.rstrip("\n") + "\n\n" + "\n".join(card_lines(rec))
