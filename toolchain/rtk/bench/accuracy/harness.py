"""Zero-shot accuracy measured by lm-eval-harness itself: `python -m lm_eval` run as a subprocess, so the
command rtk records is exactly the one that produced the numbers.

- in process: lm-eval's `hf` model on the model folder (`trust_remote_code` for rtk's pruned DeciLM
  folders, whose class is `modeling_rtk.py` beside the weights);
- served: lm-eval's `local-completions` model against an OpenAI-compatible /v1/completions endpoint (the
  vLLM server rtk bench started or was given), token-id prompts with echoed log-probs.

Where the folder's tokenizer puts BOS before the text (Gemma), lm-eval is told to add it (`add_bos_token=True`),
as rtk's token blocks do; otherwise its arguments are as they always were.

The result per task is what lm-eval reports: acc, acc_stderr and, where the task defines it, acc_norm
(log-likelihood divided by the choice's length in characters) and acc_norm_stderr. lm_eval runs with
`--log_samples`: its per-document file (samples_<task>_<date>.jsonl, beside results_<date>.json) stays in the
output, and each document's acc / acc_norm is read from it (`per_doc`), for paired comparisons (rtk.paired).
A run on chosen documents (`samples`: lm-eval's --samples, e.g. select's judge documents) replaces --limit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rtk import pip_install
from rtk.data import adds_bos
from rtk.errors import RtkError
from rtk.model.load import load_tokenizer, transformers_remote_code
from rtk.bench.accuracy.tasks import TaskSet

METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def check_installed() -> str:
    """lm-eval's version, or one clear error when it is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RtkError(f"--tasks: lm-eval is not installed ({pip_install('eval')}, i.e. lm-eval[api]==0.4.13); "
                       "or pass --tasks none")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class LmEvalRun:
    """One lm_eval invocation: a model (hf folder or served endpoint), tasks, limit."""

    model: str                          # "hf" | "local-completions"
    model_args: dict
    tasks: TaskSet
    limit: Optional[int] = None
    batch_size: int = 1
    device: Optional[str] = None
    extra: list[str] = field(default_factory=list)
    samples: Optional[dict] = None      # lm-eval task name -> document indices (--samples; instead of --limit)

    def args(self) -> list[str]:
        a = ["--model", self.model, "--model_args", ",".join(f"{k}={v}" for k, v in self.model_args.items()),
             "--tasks", ",".join(self.tasks.lm_eval_names)]
        if self.tasks.include_path:
            a += ["--include_path", self.tasks.include_path]
        if self.device:
            a += ["--device", self.device]
        a += ["--batch_size", str(self.batch_size)]
        if self.samples:
            a += ["--samples", json.dumps(self.samples, separators=(",", ":"))]
        elif self.limit:
            a += ["--limit", str(self.limit)]
        return a + list(self.extra)

    def command(self) -> str:
        """The shell command that reproduces the numbers (lm_eval's console script; --output_path and
        --log_samples, which write the files, left out)."""
        return shlex.join(["lm_eval", *self.args()])


def bos_args(folder: str) -> dict:
    """{"add_bos_token": True} where the folder's tokenizer adds BOS (lm-eval's served models add it only when told,
    its hf model for the model types it knows), else {}; {} for a folder without a tokenizer (lm-eval says so)."""
    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return {}
    return {"add_bos_token": True} if adds_bos(load_tokenizer(str(folder))) else {}


def hf_run(folder: str, tasks: TaskSet, limit: Optional[int], dtype: str = "float32", device: str = "cpu",
           batch_size: int = 8) -> LmEvalRun:
    """lm-eval's `hf` model on a model folder in this machine's memory."""
    args = {"pretrained": str(folder), "dtype": dtype}
    if transformers_remote_code(folder):
        args["trust_remote_code"] = True
    return LmEvalRun("hf", {**args, **bos_args(folder)}, tasks, limit, batch_size, device)


def served_run(url: str, served_name: str, tokenizer_dir: str, tasks: TaskSet, limit: Optional[int],
               num_concurrent: int = 4) -> LmEvalRun:
    """lm-eval's `local-completions` model on a served /v1/completions endpoint; requests are token ids
    (tokenized by the model folder's tokenizer, as the hf model tokenizes them)."""
    args = {"model": served_name, "base_url": url.rstrip("/") + "/v1/completions", "tokenizer": str(tokenizer_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": num_concurrent,
            "max_retries": 3}
    if transformers_remote_code(tokenizer_dir):
        args["trust_remote_code"] = True
    return LmEvalRun("local-completions", {**args, **bos_args(tokenizer_dir)}, tasks, limit, 1, None)


def _error_line(log: Path) -> str:
    """The most telling line of a failed lm_eval's output: the exception line of the last traceback."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    for x in reversed(lines):
        head = x.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) or head in ("KeyError", "error", "lm-eval run"):
            return x[:300]
    return lines[-1][:300] if lines else ""


def parse_results(path: Path, tasks: TaskSet) -> dict:
    """Per rtk task: lm-eval's metrics (filter "none"), the sample count, the task's lm-eval version."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name in tasks.names:
        t = tasks.lm_eval_name(name)
        r = data["results"].get(t)
        if r is None:
            raise RtkError(f"lm_eval: {path} has no results for task {t}")
        rec = {m: float(r[f"{m},none"]) for m in METRICS if f"{m},none" in r}
        rec["n"] = int(data.get("n-samples", {}).get(t, {}).get("effective", r.get("sample_len", 0)))
        rec["lm_eval_task"] = t
        rec["version"] = data.get("versions", {}).get(t)
        out[name] = rec
    return out


def per_document(results_file: Path, tasks: TaskSet) -> dict:
    """Per rtk task, lm-eval's per-document scores from the samples file written beside `results_file`
    (--log_samples: samples_<task>_<date>.jsonl): {doc_id: [...], acc: [...], acc_norm: [...] where defined,
    file}, in document order."""
    results_file = Path(results_file)
    date = results_file.stem.removeprefix("results_")
    out = {}
    for name in tasks.names:
        f = results_file.with_name(f"samples_{tasks.lm_eval_name(name)}_{date}.jsonl")
        if not f.is_file():
            raise RtkError(f"lm_eval: no per-document results {f.name} beside {results_file}")
        rows = sorted((json.loads(x) for x in f.read_text(encoding="utf-8").splitlines() if x.strip()),
                      key=lambda r: r["doc_id"])
        rec = {"doc_id": [int(r["doc_id"]) for r in rows], "file": f.name}
        for m in ("acc", "acc_norm"):
            if rows and all(m in r for r in rows):
                rec[m] = [float(r[m]) for r in rows]
        out[name] = rec
    return out


def table_lines(log: Path) -> list[str]:
    """The results table lm_eval printed (its last block of lines starting with '|')."""
    lines = log.read_text(errors="replace").splitlines()
    blocks, cur = [], []
    for x in lines:
        if x.startswith("|"):
            cur.append(x)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks[-1] if blocks else []


def run(spec: LmEvalRun, out_dir: Path, label: str, echo: Callable[[str], None] = print,
        python: str = sys.executable) -> dict:
    """Run lm_eval; returns {tasks: per task metrics, command, results_file, table, seconds}. A failure is one
    RtkError naming the log; an interrupt stops the lm_eval process."""
    check_installed()
    out_dir = Path(out_dir)
    res_dir = out_dir / "lm_eval" / label
    log = out_dir / "logs" / f"lm_eval-{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [python, "-m", "lm_eval", *spec.args(), "--output_path", str(res_dir), "--log_samples"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    which = (f", {sum(map(len, spec.samples.values()))} chosen docs" if spec.samples
             else f", first {spec.limit} docs each" if spec.limit else "")
    echo(f"rtk bench:   lm_eval ({spec.model}) on {', '.join(spec.tasks.lm_eval_names)}{which} (log: {log})")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        raise RtkError(f"lm_eval failed for {label} (exit {rc}): {_error_line(log) or 'no output'} (log: {log})")
    files = sorted(res_dir.rglob("results_*.json"))
    if not files:
        raise RtkError(f"lm_eval wrote no results file under {res_dir} (log: {log})")
    per = parse_results(files[-1], spec.tasks)
    docs = per_document(files[-1], spec.tasks)
    table = table_lines(log)
    for line in table:
        echo(f"rtk bench:   {line}")
    return {"tasks": per, "per_doc": docs, "command": spec.command(), "model": spec.model,
            "results_file": str(files[-1]),
            "table": table, "seconds": round(time.perf_counter() - t0, 1), "lm_eval_version": check_installed()}
