"""`rtk prune` of a model several times larger than its memory budget, weights streamed from disk, on this
machine's CPU: peak RSS of the whole command (search, evaluation, streamed export and its verification)
against the model's own bytes, scoring throughput of both engines, and the plan against the in-memory run's.

    PYTHONPATH=toolchain .venv/bin/python bench/scale/offload_disk.py [--layers 12 --hidden 2048] \
        -o bench/results/scale/offload_disk.json

The model is a random-weight Llama (GQA, untied; SmolLM2's tokenizer), written shard by shard, so making it
never holds it in memory either. Each `rtk prune` runs as its own process under /usr/bin/time -v, whose
"Maximum resident set size" is the peak RSS reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def make_model(folder: Path, layers: int, hidden: int, inter: int, heads: int, kv: int) -> int:
    """A random Llama folder; returns its weight bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rtk.export.shards import write_shards
    from rtk.model.load import resolve

    smol = Path(resolve("embedded:smollm2"))
    vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    specs = [(k, torch.float32, tuple(v.shape)) for k, v in skeleton.state_dict().items()]

    def tensor(name: str) -> torch.Tensor:
        shape = dict((k, s) for k, _, s in specs)[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        return torch.randn(shape, generator=g) * 0.02

    write_shards(tmp, specs, tensor, shard_bytes=10 ** 9)
    cfg.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smol / f).is_file():
            shutil.copy(smol / f, tmp / f)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def prune(model: Path, work: Path, name: str, scoring: dict, steps: int) -> dict:
    r = {"model": str(model), "device": "cpu", "dtype": "float32", "scoring": scoring,
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 4, "seq_len": 128},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 4, "seq_len": 128}},
         "search": {"method": "progressive", "target": {"sublayers": steps}, "protect": ["attn.0"]}}
    rp = work / f"{name}.yaml"
    rp.write_text(yaml.safe_dump(r, sort_keys=False))
    out = work / name
    for d in (out, out.with_name(out.name + ".partial")):  # a fresh run, not a resumed one
        shutil.rmtree(d, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", "from rtk.cli import run; run()", "prune", str(rp), "-o",
           str(out), "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "toolchain")})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name}: rtk prune failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    plan = json.loads((out / "plan.json").read_text())
    sc = plan["scoring"]
    return {"scoring": scoring, "peak_rss_bytes": rss_kb * 1024, "wall_seconds": round(wall, 1),
            "scoring_seconds": sc["seconds"], "candidate_evaluations": sc["candidate_evaluations"],
            "candidate_eval_tokens_per_s": round(sc["candidate_evaluations"] * plan["calibration"]["predicted_tokens"]
                                                 / sc["seconds"], 1),
            "layer_weight_reads": sc.get("layer_weight_reads"),
            "removed": [e["name"] for e in plan["removed"]], "ppl_after": [e["ppl_after"] for e in plan["removed"]],
            "eval": {k: plan["eval"][k] for k in ("ppl_base", "ppl_final")},
            "export_bytes": sum(f.stat().st_size for f in (out / "model").glob("*.safetensors")),
            "verification": [ln for ln in (out / "model" / "README.md").read_text().splitlines()
                             if "max |logit difference|" in ln]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="sublayers removed (search steps)")
    ap.add_argument("--memory", default="64MB", help="scoring.memory of the offloaded run")
    ap.add_argument("--work", default="runs/scale-offload")
    ap.add_argument("--runs", default="disk,memory,per-candidate")
    ap.add_argument("-o", "--out", default=str(REPO / "bench" / "results" / "scale" / "offload_disk.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"random-llama-{a.layers}x{a.hidden}"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        make_model(model, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads)
        print(f"made {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    runs = {
        "disk": {"engine": "layer-major", "offload": "disk", "streams": "cpu", "memory": a.memory, "batch_size": 4},
        "memory": {"engine": "layer-major", "offload": "none", "batch_size": 4},
        "per-candidate": {"engine": "per-candidate", "offload": "none", "batch_size": 4},
    }
    res = {"model": f"random-weight Llama, {a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, "
                    f"{a.heads} heads / {a.kv_heads} KV heads, untied, SmolLM2 tokenizer (vocab 49152), fp32",
           "model_bytes": model_bytes,
           "measured": f"rtk prune, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
                       f"torch {torch.__version__}, calibration WikiText-2 valid 4 x 128 tokens, evaluation "
                       f"WikiText-2 test 4 x 128, {a.steps} progressive steps, attn.0 protected; peak RSS from "
                       "/usr/bin/time -v of the whole command (load, search, evaluation, export, verification)",
           "runs": {}}
    for name in a.runs.split(","):
        print(f"running {name} ...", flush=True)
        res["runs"][name] = row = prune(model, work, name, runs[name], a.steps)
        row["peak_rss_over_model_bytes"] = round(row["peak_rss_bytes"] / model_bytes, 3)
        print(json.dumps({name: row}, indent=1), flush=True)
    r = res["runs"]
    if "disk" in r and "memory" in r:
        res["disk_plan_equals_memory_plan"] = r["disk"]["removed"] == r["memory"]["removed"]
    if "per-candidate" in r and "memory" in r:
        res["plans_equal_across_engines"] = r["per-candidate"]["removed"] == r["memory"]["removed"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
