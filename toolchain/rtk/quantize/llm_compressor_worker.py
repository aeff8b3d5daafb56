"""llm-compressor's `oneshot` on an rtk safetensors folder: the worker rtk.quantize.llm_compressor runs in the
quantization environment (`.venv-lc`: llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0; it
cannot share rtk's environment, README: Quantize).

It imports no rtk module (rtk is not installed there): it is run as a script,

    .venv-lc/bin/python llm_compressor_worker.py JOB.json

where JOB.json holds {"source", "out", "scheme", "calibration": null | {"input_ids": [[...]]}, "result"}. It loads the
folder as a user would (AutoModelForCausalLM, trust_remote_code for rtk's modeling_rtk.py), applies llm-compressor's
preset scheme to every Linear but the LM head, saves the compressed-tensors checkpoint to `out` and writes what it
did to `result` (JSON). Errors: one line on stderr, exit 3.
"""
from __future__ import annotations

import json
import os
import sys
import time

# llm-compressor's preset schemes, by rtk's scheme names
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}
IGNORE = ["lm_head"]


def load(source: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(source, trust_remote_code=True)
    auto = (getattr(cfg, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if auto and "AutoConfig" not in cfg.auto_map:
        # rtk's plugin / per-layer-config layouts: a standard config (LlamaConfig, ...) whose auto_map names
        # modeling_rtk's class; transformers' Auto class maps the config class itself, so load that class directly
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(auto, source)
        model = cls.from_pretrained(source, config=cfg, dtype=torch.float32, trust_remote_code=True)
        model.config._name_or_path = source  # the class converts the config and loses it; oneshot reads it
        return model, cfg
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=True), cfg

def traceable(model) -> None:
    """Folders rtk wrote before 2026-12-08 carry a modeling_rtk.py whose forward methods default `skip` to
    frozenset(), which the sequential pipeline's tracer cannot take as a constant (NotImplementedError); rtk's current
    file defaults to (). The same empty default, as a tuple, on those classes' functions."""
    import inspect

    for cls in {type(m) for m in model.modules()}:
        if "modeling_rtk" not in cls.__module__:
            continue
        for _, fn in inspect.getmembers(cls, inspect.isfunction):
            if fn.__defaults__ and any(isinstance(d, frozenset) and not d for d in fn.__defaults__):
                fn.__defaults__ = tuple(() if isinstance(d, frozenset) and not d else d for d in fn.__defaults__)


def recipe(scheme: str, calibrated: bool, model) -> list:
    """llm-compressor's modifiers: data-free rounding, or GPTQ on the calibration blocks, for w8a8 after SmoothQuant
    (llm-compressor's own int8 W8A8 recipe: activation outliers moved into the weights, strength 0.8). SmoothQuant
    is given rtk's module names (the MLP's pre-norm is pre_feedforward_layernorm in sandwich layers) and left out
    for norms that scale by (1 + w) (Gemma), whose weight it cannot divide."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if not calibrated:
        return [QuantizationModifier(targets="Linear", scheme=PRESETS[scheme], ignore=IGNORE)]
    mods = [GPTQModifier(targets="Linear", scheme=PRESETS[scheme], ignore=IGNORE)]
    cfg = model.config
    unit_offset = getattr(cfg, "rms_norm_unit_offset", False) or "gemma" in str(getattr(cfg, "model_type", ""))
    if scheme == "w8a8" and not unit_offset:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
        mappings = [[["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"], "re:.*input_layernorm$"],
                    [["re:.*gate_proj$", "re:.*up_proj$"], f"re:.*{mlp_norm}$"]]
        mods.insert(0, SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings))
    return mods


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    import torch
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, cfg = load(job["source"])
    model.eval()
    traceable(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    cal = job.get("calibration")
    kw = {}
    if cal:
        from datasets import Dataset

        ids = cal["input_ids"]
        kw = {"dataset": Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
              "num_calibration_samples": len(ids), "max_seq_length": max(len(r) for r in ids)}
    mods = recipe(job["scheme"], bool(cal), model)
    from transformers import AutoTokenizer

    # the tokenizer given, not found by llm-compressor from the model's name_or_path (which rtk's plugin class,
    # loaded directly, leaves unset); the calibration blocks are token ids already
    oneshot(model=model, recipe=mods, trust_remote_code_model=True, processor=AutoTokenizer.from_pretrained(
        job["source"]), **kw)
    quantized = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None]
    seconds = time.perf_counter() - t0
    model.save_pretrained(job["out"], save_compressed=True)
    result = {"tool": "llmcompressor.oneshot", "preset": PRESETS[job["scheme"]],
              "modifier": " + ".join(type(m).__name__ for m in mods), "targets": "Linear", "ignore": IGNORE,
              "linears": len(linears), "quantized_linears": len(quantized),
              "not_quantized": sorted(set(linears) - set(quantized)),
              "versions": {"llmcompressor": llmcompressor.__version__,
                           "compressed-tensors": compressed_tensors.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
              "quantize_seconds": round(seconds, 2)}
    with open(job["result"], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: llm_compressor_worker.py JOB.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(sys.argv[1])
    except Exception as exc:  # the driver prints this line as rtk's error
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        print(f"llm-compressor failed: {type(exc).__name__}: {first}", file=sys.stderr)
        sys.exit(3)
