"""`rtk quantize MODEL_DIR --scheme S -o OUT`: parse -> rtk.quantize.api.quantize -> echo."""
from __future__ import annotations

from pathlib import Path

import click

from rtk.quantize import SCHEMES, VERIFY_SAMPLES, VERIFY_SEQ_LEN  # a table of names: imports nothing heavy


@click.command("quantize")
@click.argument("model_dir")
@click.option("--scheme", required=True, help=f"How to quantize: {', '.join(SCHEMES)} (ort-int8: ONNX Runtime's "
              "dynamic int8 of an `rtk export --format onnx` folder; ort-int8-block / ort-int4-block: its block-wise "
              "MatMulNBits weights; w8a8, w4a16, fp8: llm-compressor's "
              "compressed-tensors checkpoint of an rtk safetensors folder, for vLLM; w4a16 and fp8 need a GPU).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--text", default=None, help="The text the quantized and unquantized models are compared on: "
              "wikitext2 (its test split, the default) or a .txt / .jsonl file.")
@click.option("--ppl-samples", type=click.IntRange(min=1), default=VERIFY_SAMPLES, show_default=True,
              help="Blocks of the text compared.")
@click.option("--ppl-seq-len", type=click.IntRange(min=2), default=VERIFY_SEQ_LEN, show_default=True,
              help="Tokens per block.")
@click.option("--calibration", default=None, help="llm-compressor's schemes: the text GPTQ calibrates on: wikitext2 "
              "(its valid split, the default) or a .txt / .jsonl file; never the --text the result is checked on.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=None,
              help="Calibration blocks (default 32).")
@click.option("--calibration-seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per calibration block (default 512).")
@click.option("--data-free", is_flag=True, help="llm-compressor's schemes: round the weights without calibration "
              "data (QuantizationModifier) instead of GPTQ.")
@click.option("--max-ppl-increase", type=click.FloatRange(min=0), default=None,
              help="Tolerance: the quantized model's PPL at most this fraction above the unquantized one's (default "
              "0.05).")
@click.option("--max-logprob-diff", type=click.FloatRange(min=0), default=None,
              help="Tolerance: mean |log-prob difference| per token, nats (default 0.1).")
@click.option("--keep-float", default=None, help="ONNX Runtime's schemes: projection kinds left float32 "
              "(e.g. down_proj,up_proj), or auto: the fewest, worst first, that bring the comparison within the "
              "tolerance.")
def quantize(model_dir: str, scheme: str, out: Path, text: str | None, ppl_samples: int, ppl_seq_len: int,
             calibration: str | None, calibration_samples: int | None, calibration_seq_len: int | None,
             data_free: bool, max_ppl_increase: float | None, max_logprob_diff: float | None,
             keep_float: str | None):
    """Quantize MODEL_DIR with the ecosystem's own tool and check it: the quantized model is reloaded and compared
    with MODEL_DIR on the same token ids (per-token log-probs, PPL) and moved to -o OUT only within the tolerance
    (README: Quantize). OUT keeps MODEL_DIR's tokenizer, configs and card, plus quantize.json."""
    from rtk.quantize import UnknownScheme
    from rtk.quantize.api import quantize as run

    try:
        res = run(model_dir, scheme, out=out, text=text, samples=ppl_samples, seq_len=ppl_seq_len,
                  calibration=calibration, calibration_samples=calibration_samples,
                  calibration_seq_len=calibration_seq_len, data_free=data_free, max_ppl_increase=max_ppl_increase,
                  max_logprob_diff=max_logprob_diff, keep_float=keep_float, echo=click.echo)
    except UnknownScheme as exc:
        raise click.BadParameter(exc.message, param_hint="'--scheme'") from None
    v, rec = res.record["verification"], res.record
    if "quantized_matmuls" in rec:
        kept = f"; float32: {', '.join(rec['float_kinds'])}" if rec["float_kinds"] else ""
        click.echo(f"rtk: wrote {out} ({scheme}: {rec['quantized_matmuls']} of {rec['weight_matmuls']} weight "
                   f"MatMuls int{rec['settings'].get('bits', 8)}{kept})")
    else:
        click.echo(f"rtk: wrote {out} ({scheme}: {rec['quantized_linears']} of {rec['linears']} Linear layers "
                   f"{rec['preset']}; served by {v['served']})")
    decoding = (f", decoding {v['decode']['mean_abs_logprob_diff']:.4f}" if "decode" in v else "")
    click.echo(f"rtk: verified: PPL {res.ppl_unquantized:.4f} -> {res.ppl_quantized:.4f} ({v['ppl_increase']:+.2%}; "
               f"tolerance +{v['tolerance']['max_ppl_increase']:.0%}); mean |log-prob difference| "
               f"{res.mean_abs_logprob_diff:.4f} nats per token{decoding} "
               f"(tolerance {v['tolerance']['max_mean_abs_logprob_diff']:g})")
