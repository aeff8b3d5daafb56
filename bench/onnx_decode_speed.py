"""Greedy decode speed of an exported ONNX folder vs torch (and onnxruntime-genai), one sequence.

    python bench/onnx_decode_speed.py MODEL_DIR ONNX_DIR [--new 64] [--threads 2] [--reps 3]

ms/token = (time of prompt + N new tokens - time of prompt + 1 new token) / (N - 1): decode steps
only, prefill excluded; the median of --reps runs. All runs fp32 on CPU, the same prompt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def decode_ms(run, n, reps):
    run(2)  # warm-up
    return 1000 * (timed(lambda: run(n), reps) - timed(lambda: run(1), reps)) / (n - 1)


def genai_runner(folder, prompt, threads):
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)

    def run(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        while not gen.is_done():
            gen.generate_next_token()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("onnx_dir")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", default="The history of the city begins in")
    a = ap.parse_args()
    import torch

    from rtk.export.onnx import torch_greedy
    from rtk.export.onnx_runtime import OrtLM
    from rtk.model.load import load_model

    torch.set_num_threads(a.threads)
    model, tok, _ = load_model(a.model_dir)
    prompt = tok(a.prompt, add_special_tokens=False)["input_ids"]
    lm = OrtLM(a.onnx_dir, provider="CPUExecutionProvider", threads=a.threads)
    res = {"prompt_tokens": len(prompt), "new_tokens": a.new, "threads": a.threads, "dtype": "float32",
           "torch_ms_per_token": decode_ms(lambda n: torch_greedy(model, prompt, n), a.new, a.reps),
           "ort_cpu_ms_per_token": decode_ms(lambda n: lm.greedy(prompt, n), a.new, a.reps)}
    try:
        res["genai_cpu_ms_per_token"] = decode_ms(genai_runner(a.onnx_dir, prompt, a.threads), a.new, a.reps)
    except ImportError:
        res["genai_cpu_ms_per_token"] = None
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
