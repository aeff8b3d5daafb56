"""Text -> deterministic token blocks for perplexity.

`source: wikitext2` reads $RTK_DATA_DIR/wikitext-2-raw/{valid,test}.txt when RTK_DATA_DIR is set,
else the hub dataset (wikitext / wikitext-2-raw-v1). Any other source is a path to a .txt file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import RtkError
from .recipe import DataSpec

HUB_SPLITS = {"valid": "validation", "test": "test"}


def read_text(spec: DataSpec, field: str) -> tuple[str, str]:
    """Returns (text, where it came from)."""
    if spec.source == "wikitext2":
        root = os.environ.get("RTK_DATA_DIR")
        if root:
            path = Path(root) / "wikitext-2-raw" / f"{spec.split}.txt"
            if not path.is_file():
                raise RtkError(f"{field}: {path} not found (RTK_DATA_DIR={root})")
            return path.read_text(encoding="utf-8"), str(path)
        try:
            from datasets import load_dataset

            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=HUB_SPLITS[spec.split])
        except Exception as exc:
            raise RtkError(f"{field}: WikiText-2 needs RTK_DATA_DIR or the hub dataset "
                           f"'wikitext/wikitext-2-raw-v1' ({type(exc).__name__}: {exc})") from None
        # hub rows are the file's lines, with "" for blank " \n" lines
        return "".join(r if r else " \n" for r in ds["text"]), "hub:wikitext/wikitext-2-raw-v1"
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise RtkError(f"{field}.source: {spec.source}: no such file (use 'wikitext2' or a .txt path)")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise RtkError(f"{field}.source: {spec.source}: not UTF-8 text") from None


def token_blocks(tokenizer, spec: DataSpec, field: str) -> tuple[torch.Tensor, dict]:
    """[samples, seq_len] token ids: blocks cut from the tokenized text, evenly spaced."""
    text, where = read_text(spec, field)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_avail = ids.numel() // spec.seq_len
    if n_avail < spec.samples:
        raise RtkError(
            f"{field}: {where} has {ids.numel():,} tokens, too few for {spec.samples} blocks of "
            f"{spec.seq_len} (at most {n_avail}); lower samples or seq_len"
        )
    starts = torch.linspace(0, n_avail - 1, spec.samples).round().long() * spec.seq_len
    blocks = torch.stack([ids[s: s + spec.seq_len] for s in starts.tolist()])
    info = {"source": spec.source, "file": where, "split": spec.split, "samples": spec.samples,
            "seq_len": spec.seq_len, "tokens": int(blocks.numel()),
            "predicted_tokens": int(spec.samples * (spec.seq_len - 1))}
    return blocks, info
