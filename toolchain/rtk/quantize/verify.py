"""Every quantized folder checks itself against the folder it came from: both reloaded in ONNX Runtime (CPU) and
run on the same token ids.

- Prefill: the log-prob of every predicted token of a few blocks of the evaluation text (WikiText-2 test by
  default), and the PPL of each model on them.
- Decode: the same for the last DECODE_TOKENS tokens of the first block, fed one at a time through the KV cache,
  as generation runs the graph (dynamic quantization sees each call's own activation range).

The tolerance (fail when exceeded; every number is recorded in quantize.json):
- PPL: the quantized model's at most MAX_PPL_INCREASE (5%) above the unquantized model's;
- per token: mean |log p_quantized - log p_unquantized| at most MAX_MEAN_LOGPROB_DIFF (0.1 nats), in prefill and in
  decode. The largest single difference is recorded, not judged (a few tokens near a tie move far).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import ValidationError

from rtk.data import DataSpec, token_blocks
from rtk.errors import RtkError
from rtk.model.ppl import logprobs_ppl
from rtk.quantize import VERIFY_SAMPLES, VERIFY_SEQ_LEN
from rtk.settings import format_errors

MAX_PPL_INCREASE = 0.05  # relative: ppl_quantized / ppl_unquantized - 1
MAX_MEAN_LOGPROB_DIFF = 0.1  # nats per token
DECODE_TOKENS = 8
PROVIDER = "CPUExecutionProvider"  # the provider the int8 graph is meant for, and checked on


def text_spec(text: Optional[str] = None, samples: int = VERIFY_SAMPLES, seq_len: int = VERIFY_SEQ_LEN) -> DataSpec:
    """The comparison's text: `wikitext2` (its test split, rtk's evaluation text; the default) or a text file."""
    source = text or "wikitext2"
    try:
        return DataSpec(source=source, split="test" if source == "wikitext2" else None, samples=samples,
                        seq_len=seq_len)
    except ValidationError as exc:
        raise RtkError(format_errors(exc, "--text")) from None


def comparison_blocks(folder: Path, spec: DataSpec):
    """[samples, seq_len] token ids of `spec` by the folder's own tokenizer, and where they came from."""
    from rtk.model.load import load_tokenizer

    return token_blocks(load_tokenizer(str(folder)), spec, "--text")


def diffs(ref: list[list[float]], got: list[list[float]]) -> dict:
    d = np.abs(np.concatenate([np.asarray(g) - np.asarray(r) for r, g in zip(ref, got)]))
    return {"tokens": int(d.size), "mean_abs_logprob_diff": float(d.mean()), "max_abs_logprob_diff": float(d.max())}


def compare(reference: Path, quantized: Path, blocks) -> dict:
    """Run both folders on `blocks` [N, T] (prefill) and on the first block's last DECODE_TOKENS tokens (decode)."""
    from rtk.export.onnx_runtime import OrtLM

    lms = [OrtLM(f, provider=PROVIDER) for f in (reference, quantized)]
    seqs = blocks.tolist()
    ref, got = (lm.token_logprobs(seqs) for lm in lms)
    ppl_ref, ppl_got = logprobs_ppl(ref)["ppl"], logprobs_ppl(got)["ppl"]
    first = seqs[0]
    prefill = max(1, len(first) - DECODE_TOKENS)
    dec_ref, dec_got = (lm.cached_logprobs(first, prefill) for lm in lms)
    return {"provider": PROVIDER, "blocks": len(seqs), "seq_len": len(first),
            "ppl_unquantized": ppl_ref, "ppl_quantized": ppl_got, "ppl_increase": ppl_got / ppl_ref - 1,
            "prefill": diffs(ref, got), "decode": diffs([dec_ref], [dec_got]),
            "tolerance": tolerance()}


def tolerance(max_ppl_increase: Optional[float] = None, max_logprob_diff: Optional[float] = None) -> dict:
    """The tolerance a comparison is judged by: the defaults above, or the user's (--max-ppl-increase,
    --max-logprob-diff); quantize.json and the card record which."""
    return {"max_ppl_increase": MAX_PPL_INCREASE if max_ppl_increase is None else max_ppl_increase,
            "max_mean_abs_logprob_diff": MAX_MEAN_LOGPROB_DIFF if max_logprob_diff is None else max_logprob_diff,
            "default": max_ppl_increase is None and max_logprob_diff is None}


def check(stats: dict, where: str) -> None:
    """Raise the one line naming every number over its tolerance (stats["tolerance"]; the defaults without it)."""
    tol = stats.get("tolerance") or tolerance()
    max_ppl, max_diff = tol["max_ppl_increase"], tol["max_mean_abs_logprob_diff"]
    bad = []
    if not stats["ppl_increase"] <= max_ppl:  # NaN fails too
        bad.append(f"PPL {stats['ppl_unquantized']:.4g} -> {stats['ppl_quantized']:.4g} "
                   f"({stats['ppl_increase']:+.2%}; tolerance +{max_ppl:.0%})")
    for part in ("prefill", "decode"):
        if part not in stats:  # a served model is compared on prefill only
            continue
        d = stats[part]["mean_abs_logprob_diff"]
        if not d <= max_diff:
            bad.append(f"{part}: mean |log-prob difference| {d:.3g} nats per token (tolerance {max_diff:g})")
    if bad:
        raise RtkError(f"{where}: the quantized model differs from the unquantized one beyond the tolerance: "
                       + "; ".join(bad))
