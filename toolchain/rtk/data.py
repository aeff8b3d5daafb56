"""Text -> deterministic token blocks for perplexity (calibration, evaluation, healing).

Sources (`DataSpec.source`):
- `wikitext2`: $RTK_DATA_DIR/wikitext-2-raw/{valid,test}.txt when RTK_DATA_DIR is set, else the hub
  dataset (wikitext / wikitext-2-raw-v1);
- a `.jsonl` file: one JSON object per line, the text under `field`; records joined by a blank line;
- `hub:<dataset id>`: a Hugging Face dataset (`subset`, `split`, `field`), streamed: records are read in
  order until there are enough tokens, so a corpus as large as C4 costs only what is used;
- any other path: a UTF-8 text file.

Blocks are cut from the tokenized text: from files, evenly spaced over the whole text; from the hub, one
after another from its first records. Where the model's tokenizer puts BOS before what it encodes (its config
says so: Gemma's does, SmolLM2's does not), every block is BOS + the first seq_len - 1 text tokens of the block
cut without it, as the model saw sequences in training (the same text with and without BOS); otherwise the
blocks are seq_len text tokens, as they always were.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from pydantic import Field, model_validator

from rtk import pip_install
from rtk.errors import RtkError
from rtk.settings import Strict

class DataSpec(Strict):
    """Where text comes from and how it is cut into token blocks.

    `source`: `wikitext2` (WikiText-2 raw; `split` valid | test), a `.jsonl` file (one JSON object per
    line, the text under `field`), any other path (a plain UTF-8 text file), or `hub:<dataset id>`
    (a Hugging Face dataset, streamed: `subset` is its config name, `split` its split, `field` the text
    column; needs the `hub` extra and the hub)."""

    source: str = Field("wikitext2", description="'wikitext2', a .txt or .jsonl path, or hub:<dataset id>")
    split: Optional[str] = Field(None, description="wikitext2: valid | test (default valid); hub: the split "
                                 "(default train); not used for files")
    subset: Optional[str] = Field(None, description="hub: the dataset's config name (e.g. 'en' for allenai/c4)")
    field: Optional[str] = Field(None, description="jsonl / hub: the key that holds the text (default 'text')")
    samples: int = Field(8, gt=0, description="number of token blocks")
    seq_len: int = Field(128, gt=1, description="tokens per block")

    @property
    def kind(self) -> str:
        """wikitext2 | hub | jsonl | text | parquet | folder (the last two are streamed, by healing only)"""
        if self.source == "wikitext2":
            return "wikitext2"
        if self.source.startswith("hub:"):
            return "hub"
        if self.source.lower().endswith(".parquet"):
            return "parquet"
        if Path(self.source).expanduser().is_dir():
            return "folder"
        return "jsonl" if self.source.lower().endswith(".jsonl") else "text"

    @model_validator(mode="after")
    def _fields_for_kind(self):
        kind = self.kind
        if kind == "wikitext2":
            if self.split is None:
                self.split = "valid"
            if self.split not in ("valid", "test"):
                raise ValueError(f"split: WikiText-2 has 'valid' and 'test' here (no train), got '{self.split}'")
        elif kind == "hub":
            if not self.source[4:].strip():
                raise ValueError("source: 'hub:' needs a dataset id, e.g. hub:allenai/c4")
            self.split = self.split or "train"
        elif self.split is not None:
            raise ValueError(f"split: applies to wikitext2 and hub: sources, not to the file {self.source}")
        if kind in ("wikitext2", "text"):
            if self.field is not None:
                raise ValueError(f"field: applies to .jsonl and hub: sources, not to {self.source}")
            if self.subset is not None:
                raise ValueError(f"subset: applies to hub: sources, not to {self.source}")
        else:
            self.field = self.field or "text"
            if kind != "hub" and self.subset is not None:
                raise ValueError(f"subset: applies to hub: sources, not to {self.source}")
        return self

    def text_id(self) -> tuple:
        """What identifies the text itself (not how it is cut): two specs with the same id read the same text."""
        src = self.source
        if self.kind not in ("wikitext2", "hub"):
            src = str(Path(src).expanduser().resolve())
        return (self.kind, src, self.split, self.subset, self.field)

    def describe(self) -> str:
        if self.kind == "wikitext2":
            src = f"WikiText-2 raw [{self.split}]"
        elif self.kind == "hub":
            src = f"{self.source}" + (f"/{self.subset}" if self.subset else "") + f" [{self.split}] .{self.field}"
        elif self.kind in ("jsonl", "parquet", "folder"):
            src = f"{Path(self.source).name}{'/' if self.kind == 'folder' else ''} .{self.field}"
        else:
            src = Path(self.source).name
        return f"{src}, {self.samples} blocks x {self.seq_len} tokens"


def same_text(a: DataSpec, b: DataSpec) -> bool:
    return a.text_id() == b.text_id()


def text_name(spec: DataSpec) -> str:
    """The text a spec reads, as errors name it: 'wikitext2 [test]', 'corpus.jsonl'."""
    return spec.source + (f" [{spec.split}]" if spec.split else "")


# The evaluation PPL's text and size, one default for every command that reports a test PPL: a recipe's
# data.evaluation (rtk prune, rtk ablate) and rtk bench's WikiText-2 PPL (--ppl-samples, --ppl-seq-len), so the
# same model prints the same test PPL in both. plan.json's `eval` and every recorded demo number use it.
EVALUATION = DataSpec(source="wikitext2", split="test", samples=32, seq_len=256)


class DataConfig(Strict):
    calibration: DataSpec = DataSpec(split="valid", samples=8, seq_len=128)
    evaluation: DataSpec = EVALUATION

    @model_validator(mode="after")
    def _different_splits(self):
        c, e = self.calibration, self.evaluation
        if same_text(c, e):
            raise ValueError(
                f"calibration and evaluation use the same text ({text_name(c)}); calibrate on one split and "
                "report on another"
            )
        return self



HUB_SPLITS = {"valid": "validation", "test": "test"}
STREAMED_KINDS = ("parquet", "folder")  # sources only a stream reads (rtk.heal.blocks)
RECORD_SEP = "\n\n"


def _wikitext(spec: DataSpec, field: str) -> tuple[str, str, str]:
    name = f"WikiText-2 raw {spec.split} (wiki.{spec.split}.raw)"
    root = os.environ.get("RTK_DATA_DIR")
    if root:
        path = Path(root) / "wikitext-2-raw" / f"{spec.split}.txt"
        if not path.is_file():
            raise RtkError(f"{field}: {path} not found (RTK_DATA_DIR={root})")
        return path.read_text(encoding="utf-8"), str(path), name
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=HUB_SPLITS[spec.split])
    except Exception as exc:
        raise RtkError(f"{field}: WikiText-2 needs RTK_DATA_DIR or the hub dataset "
                       f"'wikitext/wikitext-2-raw-v1' ({type(exc).__name__}: {exc})") from None
    # hub rows are the file's lines, with "" for blank " \n" lines
    return "".join(r if r else " \n" for r in ds["text"]), "hub:wikitext/wikitext-2-raw-v1", name


def _record_text(rec, key: str, where: str, field: str) -> str:
    if not isinstance(rec, dict):
        raise RtkError(f"{field}: {where} is not a JSON object")
    if key not in rec:
        keys = ", ".join(list(rec)[:8]) or "none"
        raise RtkError(f"{field}.field: '{key}' is not in {where} (its keys: {keys})")
    text = rec[key]
    if not isinstance(text, str):
        raise RtkError(f"{field}.field: '{key}' of {where} is {type(text).__name__}, not text")
    return text


def _jsonl(spec: DataSpec, field: str) -> tuple[str, str, str]:
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise RtkError(f"{field}.source: {spec.source}: no such file")
    texts = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise RtkError(f"{field}.source: {spec.source}: line {n} is not JSON") from None
                texts.append(_record_text(rec, spec.field, f"line {n} of {path.name}", field))
    except UnicodeDecodeError:
        raise RtkError(f"{field}.source: {spec.source}: not UTF-8 text") from None
    if not texts:
        raise RtkError(f"{field}.source: {spec.source}: holds no records")
    return RECORD_SEP.join(texts), str(path), f"{path.name} (field '{spec.field}', {len(texts):,} records)"


def _hub_records(spec: DataSpec, field: str) -> Iterator[str]:
    dataset = spec.source[4:]
    try:
        from datasets import load_dataset
    except ImportError:
        raise RtkError(f"{field}.source: {spec.source} needs the datasets package ({pip_install('hub')})") from None
    try:
        ds = load_dataset(dataset, spec.subset, split=spec.split, streaming=True)
    except ValueError as exc:  # datasets names the splits it has: "Bad split: x. Available splits: [...]"
        raise RtkError(f"{field}: {spec.source}" + (f" ({spec.subset})" if spec.subset else "")
                       + f": {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise RtkError(f"{field}.source: cannot open {spec.source}" + (f" ({spec.subset})" if spec.subset else "")
                       + f" [{spec.split}] ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for n, rec in enumerate(ds, 1):
        yield _record_text(rec, spec.field, f"record {n} of {spec.source} [{spec.split}]", field)


def read_text(spec: DataSpec, field: str) -> tuple[str, str]:
    """(text, where it came from) of a file source (wikitext2, .jsonl, text file)."""
    text, where, _ = _read_file_source(spec, field)
    return text, where


def _read_file_source(spec: DataSpec, field: str) -> tuple[str, str, str]:
    if spec.kind in STREAMED_KINDS:
        raise RtkError(f"{field}.source: {spec.source}: a {spec.kind} is read as a stream, which healing does "
                       "(heal.data.stream: true); give calibration and evaluation a .txt, .jsonl or wikitext2")
    if spec.kind == "wikitext2":
        return _wikitext(spec, field)
    if spec.kind == "jsonl":
        return _jsonl(spec, field)
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise RtkError(f"{field}.source: {spec.source}: no such file (use 'wikitext2', a .txt or .jsonl path, "
                       "or hub:<dataset id>)")
    try:
        return path.read_text(encoding="utf-8"), str(path), path.name
    except UnicodeDecodeError:
        raise RtkError(f"{field}.source: {spec.source}: not UTF-8 text") from None


def adds_bos(tokenizer) -> bool:
    """The tokenizer puts its BOS token before the text it encodes (as its config says)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _too_few(field: str, where: str, n_tokens: int, spec: DataSpec) -> RtkError:
    return RtkError(f"{field}: {where} has {n_tokens:,} tokens, too few for {spec.samples} blocks of "
                    f"{spec.seq_len} (at most {n_tokens // spec.seq_len}); lower samples or seq_len")


def _hub_ids(tokenizer, spec: DataSpec, field: str) -> torch.Tensor:
    need = spec.samples * spec.seq_len
    parts, have = [], 0
    for text in _hub_records(spec, field):
        ids = tokenizer((RECORD_SEP if parts else "") + text, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
        have += len(ids)
        if have >= need:
            break
    if have < need:
        raise _too_few(field, f"{spec.source} [{spec.split}]", have, spec)
    return torch.cat(parts)


Spans = Sequence[tuple[int, int]]  # token ranges [start, end) of a text's token ids


def _starts(n_tokens: int, spec: DataSpec, avoid: Spans, hub: bool) -> list[int]:
    """Where the blocks start: the grid of whole blocks (from a hub stream, one after another; from a file,
    evenly spaced over the text) minus every block that overlaps a span of `avoid`."""
    grid = [k * spec.seq_len for k in range(n_tokens // spec.seq_len)]
    free = [s for s in grid if not any(s < b and a < s + spec.seq_len for a, b in avoid)]
    if len(free) < spec.samples:
        return []
    if hub:
        return free[: spec.samples]
    return [free[i] for i in torch.linspace(0, len(free) - 1, spec.samples).round().long().tolist()]


def token_blocks(tokenizer, spec: DataSpec, field: str, avoid: Spans = ()) -> tuple[torch.Tensor, dict]:
    """[samples, seq_len] token ids, each led by BOS where the tokenizer adds it, and where they came from (`file`:
    this machine's path or hub id; `text`: a name for the text that is the same on every machine, for model
    cards). `avoid`: token ranges of the same text that no block may overlap (held out for another use); without
    it the blocks are those rtk has always cut."""
    blocks, info, _ = cut_blocks(tokenizer, spec, field, avoid)
    return blocks, info


def token_spans(tokenizer, spec: DataSpec, field: str, avoid: Spans = ()) -> list[tuple[int, int]]:
    """The ranges of the text's tokens token_blocks takes for `spec` (what another use of the same text must
    avoid; a leading BOS is no token of the text)."""
    return cut_blocks(tokenizer, spec, field, avoid)[2]


def cut_blocks(tokenizer, spec: DataSpec, field: str, avoid: Spans = ()) -> tuple[torch.Tensor, dict, list]:
    """token_blocks and token_spans from one tokenization of the text: (blocks, info, spans)."""
    if spec.kind == "hub":
        extra = sum(b - a for a, b in avoid) + spec.seq_len * len(avoid)
        ids = _hub_ids(tokenizer, spec.model_copy(update={"samples": spec.samples + -(-extra // spec.seq_len)})
                       if avoid else spec, field)
        where = f"{spec.source}" + (f"/{spec.subset}" if spec.subset else "")
        name = f"{spec.source[4:]}" + (f" ({spec.subset})" if spec.subset else "") + \
            f" [{spec.split}], field '{spec.field}', first records"
    else:
        text, where, name = _read_file_source(spec, field)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    starts = _starts(ids.numel(), spec, avoid, spec.kind == "hub")
    if not starts and not avoid:
        raise _too_few(field, where, ids.numel(), spec)
    if not starts:
        raise RtkError(f"{field}: {where} has {ids.numel():,} tokens, too few for {spec.samples} blocks of "
                       f"{spec.seq_len} outside the {len(avoid)} block(s) held out for other uses; lower samples "
                       "or seq_len")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    width = spec.seq_len - len(bos)  # text tokens per block: the start of each block cut without BOS
    lead = torch.tensor(bos, dtype=ids.dtype)
    blocks = torch.stack([torch.cat([lead, ids[s: s + width]]) for s in starts])
    info = {"source": spec.source, "file": where, "text": name, "split": spec.split, "samples": spec.samples,
            "seq_len": spec.seq_len, "tokens": int(blocks.numel()),
            "predicted_tokens": int(spec.samples * (spec.seq_len - 1))}
    if bos:
        info["bos"] = True  # every block starts with the tokenizer's BOS
    if avoid:
        info["held_out_blocks"] = len(avoid)
    if spec.field is not None:
        info["field"] = spec.field
    if spec.subset is not None:
        info["subset"] = spec.subset
    return blocks, info, [(s, s + width) for s in starts]
