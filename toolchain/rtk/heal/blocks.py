"""What the healing loop reads: training blocks by their sample index, from an in-memory pool or from a stream.

- `Pool`: the blocks rtk.data cut from a text held in memory; sample i is block perm_e[i % n] of pass e = i // n,
  each pass a permutation seeded by (seed, e) (rtk.heal.schedule.DataOrder).
- `BlockStream`: text read from its source record by record and never held whole (`heal.data.stream: true`): a
  .jsonl / .txt / .parquet file, a folder of such shards (sorted by name), or a hub dataset (streamed). Each
  record is tokenized as it comes (records joined by a blank line, as rtk.data joins a .jsonl), and the tokens are
  packed into blocks on the fly exactly as rtk.data cuts a text: whole seq_len steps, BOS + the first seq_len - 1
  tokens where the tokenizer adds BOS. Blocks are shuffled in windows of `shuffle_blocks` (window k of pass e
  permuted by a generator seeded by (seed, e, k); window 0's seed is DataOrder's). When the text has at most
  `shuffle_blocks` blocks and the budget reads all of them, the stream gives the same blocks in the same order as
  the pool of the same text. Memory is one window of blocks, whatever `tokens` is.

Every process reads the same stream and keeps its own share of each global batch (rtk.heal.distributed.Share):
tokenizing is repeated on every rank, which is cheap beside training. The stream's position (the pass, the window,
where in the source the window starts) is part of each checkpoint; a resumed run reads that window again and goes
on from the same sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from rtk import pip_install
from rtk.data import RECORD_SEP, _record_text, adds_bos
from rtk.errors import RtkError
from rtk.heal.schedule import Pool  # noqa: F401  (the in-memory source, beside DataOrder)

if TYPE_CHECKING:
    from rtk.heal.config import HealData

TEXT_CHUNK = 1 << 20  # a .txt file is read (and tokenized) in pieces of about this many bytes, cut at line ends
STREAM_KINDS = (".jsonl", ".txt", ".parquet")


# ---- records ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One record (or a piece of a .txt file) and where it starts: `at` = (file index, position in it: a byte offset,
    a row, a record number); `sep`: a blank line joins it to the text before."""

    at: tuple[int, int]
    sep: bool
    text: str


def stream_files(spec: "HealData", field: str) -> list[Path]:
    """The files a file or folder source streams, in order; one line when there are none."""
    p = Path(spec.source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in STREAM_KINDS)
        if not files:
            raise RtkError(f"{field}.source: {spec.source}: folder holds no {' / '.join(STREAM_KINDS)} files")
        return files
    if not p.is_file():
        raise RtkError(f"{field}.source: {spec.source}: no such file or folder")
    return [p]


def _jsonl_pieces(path: Path, start: int, key: str, field: str) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        f.seek(start)
        pos = start
        for raw in iter(f.readline, b""):
            at, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                raise RtkError(f"{field}.source: {path}: the line at byte {at} is not JSON") from None
            yield at, _record_text(rec, key, f"the line at byte {at} of {path.name}", field)


def _text_pieces(path: Path, start: int, field: str) -> Iterator[tuple[int, str]]:
    """Pieces of about TEXT_CHUNK bytes, each ending before a line that starts with a non-space character (where a
    whitespace-splitting tokenizer splits anyway), or at 16 x TEXT_CHUNK bytes when no such line comes."""
    with path.open("rb") as f:
        f.seek(start)
        at, chunk, size = start, [], 0
        for raw in iter(f.readline, b""):
            if size >= TEXT_CHUNK and (raw[:1].strip() or size >= 16 * TEXT_CHUNK):
                yield at, _utf8(b"".join(chunk), path, field)
                at, chunk, size = at + size, [], 0
            chunk.append(raw)
            size += len(raw)
        if chunk:
            yield at, _utf8(b"".join(chunk), path, field)


def _utf8(data: bytes, path: Path, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RtkError(f"{field}.source: {path}: not UTF-8 text") from None


def _parquet_pieces(path: Path, start: int, key: str, field: str) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RtkError(f"{field}.source: {path.name} needs pyarrow ({pip_install('hub')})") from None
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:
        raise RtkError(f"{field}.source: {path}: not a parquet file ({type(exc).__name__})") from None
    if key not in pf.schema_arrow.names:
        raise RtkError(f"{field}.field: '{key}' is not a column of {path.name} (its columns: "
                       f"{', '.join(pf.schema_arrow.names[:8])})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[key]):
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        for i, text in enumerate(batch.column(0).to_pylist()):
            if row + i >= start:
                if not isinstance(text, str):
                    raise RtkError(f"{field}.field: row {row + i} of {path.name} has no text under '{key}'")
                yield row + i, text
        row += n


def _hub_pieces(spec: "HealData", start: int, field: str) -> Iterator[tuple[int, str]]:
    from rtk.data import _hub_records

    for n, text in enumerate(_hub_records(spec, field)):  # datasets streams; what is skipped is only read
        if n >= start:
            yield n, text


def pieces(spec: "HealData", field: str, at: tuple[int, int] = (0, 0), sep: bool = False) -> Iterator[Piece]:
    """The source's records from position `at` on, to its end (one pass)."""
    if spec.kind == "hub":
        for n, text in _hub_pieces(spec, at[1], field):
            yield Piece((0, n), sep, text)
            sep = True
        return
    files = stream_files(spec, field)
    for i in range(at[0], len(files)):
        path, start = files[i], at[1] if i == at[0] else 0
        kind = path.suffix.lower()
        if kind == ".jsonl":
            gen = _jsonl_pieces(path, start, spec.field or "text", field)
        elif kind == ".parquet":
            gen = _parquet_pieces(path, start, spec.field or "text", field)
        else:
            gen = _text_pieces(path, start, field)
        first_of_file = True
        for pos, text in gen:
            # a .txt file's pieces are one text; records and files are joined by a blank line
            yield Piece((i, pos), sep if (first_of_file or kind != ".txt") else False, text)
            sep, first_of_file = True, False


def _with_next(it: Iterator[Piece]) -> Iterator[tuple[Piece, bool]]:
    """(piece, whether a blank line joins it to the next piece)."""
    prev = None
    for piece in it:
        if prev is not None:
            yield prev, piece.sep
        prev = piece
    if prev is not None:
        yield prev, False


# ---- blocks ----------------------------------------------------------------------------------------------------
class BlockStream:
    """Blocks packed on the fly from a streamed source, by sample index (see the module's doc)."""

    def __init__(self, tokenizer, spec: "HealData", seed: int, field: str = "heal.data",
                 need: Optional[int] = None):
        self.tok, self.spec, self.seed, self.field = tokenizer, spec, seed, field
        self.seq_len, self.window_size = spec.seq_len, spec.shuffle_blocks
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.need = need  # samples the budget reads (for the message when a stream without repeat ends)
        self.n_blocks = None  # a stream's length is not known before its end
        self._start_pass(0)

    # where the reading stands
    def _start_pass(self, epoch: int) -> None:
        self.epoch, self.k, self.pos = epoch, 0, getattr(self, "pos", 0)
        self._reader = self._blocks(((0, 0), False, 0))
        self._window, self._window_start, self._taken = None, None, 0

    def _blocks(self, start: tuple) -> Iterator[tuple[torch.Tensor, tuple]]:
        """(block, where its first token is) from `start` = (piece position, sep, tokens of that piece to skip)."""
        width = self.seq_len - len(self.bos)
        buf: list[int] = []
        origins: list[list] = []  # [piece position, sep, offset into its tokens, tokens of it left in buf]
        at, sep, skip = start
        head = 0  # buf[head:] is what is not cut yet
        for piece, joined in _with_next(pieces(self.spec, self.field, at, sep)):
            # the blank line that joins a record to the next ends the record's text, as in the whole text (a
            # whitespace-splitting tokenizer keeps the next record's leading space with its first word)
            ids = self.tok(piece.text + (RECORD_SEP if joined else ""), add_special_tokens=False)["input_ids"]
            off, skip = skip, 0
            ids = ids[off:]
            if head:
                buf, head = buf[head:], 0
            buf.extend(ids)
            origins.append([piece.at, piece.sep, off, len(ids)])
            while len(buf) - head >= self.seq_len:
                o = origins[0]
                yield torch.tensor(self.bos + buf[head: head + width], dtype=torch.long), (o[0], o[1], o[2])
                head += self.seq_len
                drop = self.seq_len
                while drop and origins:  # the piece that now holds buf[head], and how far into it
                    if origins[0][3] <= drop:
                        drop -= origins.pop(0)[3]
                    else:
                        origins[0][2] += drop
                        origins[0][3] -= drop
                        drop = 0

    def _fill(self) -> None:
        """The next window of blocks, permuted; at the end of a pass, the next pass (repeat) or one line."""
        blocks, start = [], None
        for block, where in self._reader:
            if start is None:
                start = where
            blocks.append(block)
            if len(blocks) == self.window_size:
                break
        if not blocks:
            if self.k == 0 and self.epoch == 0:
                raise RtkError(f"{self.field}: {self.spec.source} holds fewer than {self.seq_len} tokens; lower seq_len")
            if not self.spec.repeat:
                raise RtkError(f"{self.field}: {self.spec.source} ended after {self.pos:,} blocks of {self.seq_len} "
                               f"tokens" + (f", before the {self.need:,} blocks the token budget reads" if self.need else "")
                               + "; set heal.data.repeat: true to pass over it again, or lower tokens")
            self._start_pass(self.epoch + 1)
            return self._fill()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + self.k * (1 << 40))
        perm = torch.randperm(len(blocks), generator=g)
        self._window = torch.stack(blocks)[perm]
        self._window_start = {"epoch": self.epoch, "k": self.k, "pos": self.pos, "at": list(start[0]),
                              "sep": start[1], "skip": start[2]}
        self._taken = 0

    def _next(self) -> torch.Tensor:
        if self._window is None or self._taken == len(self._window):
            if self._window is not None:
                self.k += 1
            self._fill()
        b = self._window[self._taken]
        self._taken += 1
        self.pos += 1
        return b

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Samples [start, start + count); `start` never goes back (samples before it are passed over)."""
        if start < self.pos:
            raise RuntimeError(f"stream at sample {self.pos}, asked for {start}")
        while self.pos < start:
            self._next()
        return torch.stack([self._next() for _ in range(count)])

    def state(self) -> Optional[dict]:
        """Where the current window starts (a checkpoint keeps it), or None before the first."""
        return None if self._window_start is None else dict(self._window_start)

    def restore(self, state: Optional[dict]) -> None:
        if state is None:
            return
        self.epoch, self.k, self.pos = state["epoch"], state["k"], state["pos"]
        self._reader = self._blocks(((state["at"][0], state["at"][1]), state["sep"], state["skip"]))
        self._window = None
        self._fill()
