"""Zero-shot multiple-choice tasks, read from $RTK_DATA_DIR, scored as lm-eval-harness does.

Each record becomes a `Doc`: one context per choice (WinoGrande's partial scoring varies the
context) and one continuation per choice. A choice's score is the log-likelihood of its
continuation given its context; `acc` takes the argmax of the sum, `acc_norm` of the sum divided
by the continuation's length in characters (lm-eval-harness's acc_norm).
Prompt formats follow lm-eval-harness (piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import RtkError

TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")


@dataclass(frozen=True)
class Doc:
    contexts: tuple[str, ...]       # one per choice
    continuations: tuple[str, ...]  # one per choice
    gold: int


def data_dir() -> Path:
    root = os.environ.get("RTK_DATA_DIR")
    if not root:
        raise RtkError("--tasks: zero-shot tasks read their files from $RTK_DATA_DIR, which is not set")
    return Path(root)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RtkError(f"--tasks: {path} not found (RTK_DATA_DIR={path.parents[1]})")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise RtkError(f"--tasks: {path} not found (RTK_DATA_DIR={path.parents[1]})")
    return path.read_text(encoding="utf-8").splitlines()


def _mc(context: str, choices: Sequence[str], gold: int) -> Doc:
    return Doc(tuple([context] * len(choices)), tuple(" " + c for c in choices), gold)


def load_piqa(root: Path) -> list[Doc]:
    recs, labels = _jsonl(root / "piqa" / "valid.jsonl"), _lines(root / "piqa" / "valid-labels.lst")
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(lab))
            for r, lab in zip(recs, labels)]


def _arc(path: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(path):
        choices = r["question"]["choices"]
        labels = [c["label"] for c in choices]  # A-D, a few 1-4; 3 to 5 choices
        docs.append(_mc(f"Question: {r['question']['stem']}\nAnswer:", [c["text"] for c in choices],
                        labels.index(r["answerKey"])))
    return docs


def load_arc_easy(root: Path) -> list[Doc]:
    return _arc(root / "arc-easy" / "ARC-Easy-Test.jsonl")


def load_arc_challenge(root: Path) -> list[Doc]:
    return _arc(root / "arc-challenge" / "ARC-Challenge-Test.jsonl")


def load_boolq(root: Path) -> list[Doc]:
    return [_mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(r["label"])))
            for r in _jsonl(root / "boolq" / "val.jsonl")]


def load_hellaswag(root: Path) -> list[Doc]:
    lines = _lines(root / "hellaswag" / "hellaswag_val_full.txt")
    if len(lines) % 6:
        raise RtkError(f"--tasks: {root / 'hellaswag'}: {len(lines)} lines, not 6 per task")
    return [_mc(lines[i], lines[i + 2: i + 6], int(lines[i + 1])) for i in range(0, len(lines), 6)]


def load_winogrande(root: Path) -> list[Doc]:
    docs = []
    for r in _jsonl(root / "winogrande" / "winogrande_dev_llmfoundry.jsonl"):
        opts = tuple(r["context_options"])
        docs.append(Doc(opts, tuple(" " + r["continuation"].strip() for _ in opts), int(r["gold"])))
    return docs


LOADERS: dict[str, Callable[[Path], list[Doc]]] = {
    "piqa": load_piqa, "arc_easy": load_arc_easy, "arc_challenge": load_arc_challenge,
    "boolq": load_boolq, "hellaswag": load_hellaswag, "winogrande": load_winogrande,
}


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip().replace("-", "_") for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    bad = [t for t in names if t not in LOADERS]
    if bad or not names:
        raise RtkError(f"--tasks: unknown task(s) {', '.join(bad) or '(none)'}; known: {', '.join(TASKS)}, all")
    return names


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """The first `limit` records of a task (all when None)."""
    docs = LOADERS[name](data_dir())
    return docs[:limit] if limit else docs


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness cuts them: encode the whole string and
    the context alone, the continuation is what the whole adds; trailing context spaces move over."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [bos], whole
    return whole[: len(ctx)], whole[len(ctx):]


def loglikelihoods(token_logprobs, tokenizer, docs: Sequence[Doc], batch: int = 16) -> list[list[float]]:
    """Per doc, per choice: sum of log p(continuation tokens | context).

    `token_logprobs(seqs)` returns, per sequence, log p(t_i | t_<i) for i >= 1."""
    reqs = []
    for d, doc in enumerate(docs):
        for c, (ctx, cont) in enumerate(zip(doc.contexts, doc.continuations)):
            ci, co = split_tokens(tokenizer, ctx, cont)
            reqs.append((d, c, ci + co, len(ci)))
    out = [[0.0] * len(doc.continuations) for doc in docs]
    reqs.sort(key=lambda r: -len(r[2]))  # similar lengths share a batch: little padding (as lm-eval)
    for s in range(0, len(reqs), batch):
        chunk = reqs[s: s + batch]
        lps = token_logprobs([r[2] for r in chunk])
        for (d, c, seq, n_ctx), lp in zip(chunk, lps):
            if len(lp) != len(seq) - 1:
                raise RtkError(f"backend returned {len(lp)} log-probs for a sequence of {len(seq)} tokens")
            out[d][c] = float(sum(lp[n_ctx - 1:]))
    return out


def score(docs: Sequence[Doc], lls: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm (log-likelihood per character of the continuation), with their std errors."""
    hits, hits_norm = [], []
    for doc, ll in zip(docs, lls):
        hits.append(max(range(len(ll)), key=lambda i: ll[i]) == doc.gold)
        norm = [x / len(c) for x, c in zip(ll, doc.continuations)]
        hits_norm.append(max(range(len(norm)), key=lambda i: norm[i]) == doc.gold)
    n = len(hits)

    def stat(h):
        p = sum(h) / n if n else math.nan
        return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan

    acc, acc_se = stat(hits)
    acc_norm, acc_norm_se = stat(hits_norm)
    return {"n": n, "acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm, "acc_norm_stderr": acc_norm_se}
