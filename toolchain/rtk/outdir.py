"""Output folders that are never half-written: OUT appears only when complete (work in progress lives in
OUT.partial/ and is resumed), and each file is written beside its place, then renamed over it. Also the one
fingerprint scheme that decides whether saved work may be resumed or reused."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from rtk.errors import RtkError


def cache_dir() -> Path:
    """Where rtk caches what it makes once (dequantized GGUF checkpoints): $RTK_CACHE_DIR or ~/.cache/rtk."""
    return Path(os.environ.get("RTK_CACHE_DIR", Path.home() / ".cache" / "rtk"))


def replace_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data, indent: int = 1) -> None:
    replace_atomic(path, lambda p: p.write_text(json.dumps(data, indent=indent)))


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write a text file beside `path` (making its folder), then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)

    replace_atomic(path, write)


def temp_dir_beside(final: Path) -> Path:
    """A new temporary folder next to `final`: the caller fills it and renames it to `final` when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def fingerprint(data) -> str:
    """16 hex digits of the SHA-256 of `data` as sorted JSON: equal settings give equal fingerprints."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_json(path: Path, default=None):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else default


def check_out(out: Path, fingerprint: str, result: str, state: str, kind: str, differs: str,
              result_key: str = "fingerprint") -> tuple[Path, bool]:
    """(OUT.partial, OUT is complete) for a command writing OUT. `result` (in OUT, fingerprint under
    `result_key`) and `state` (in OUT.partial, under "fingerprint") are JSON files; a folder of another
    kind, or made from other settings (`differs` says which), is refused with a one-line error."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        res = load_json(out / result)
        if res is None:
            raise RtkError(f"-o {out}: folder exists and is not an rtk {kind}; choose another")
        if res.get(result_key) != fingerprint:
            raise RtkError(f"-o {out}: holds {kind_a(kind)} of {differs}; choose another folder")
        return partial, True
    if partial.exists() and (load_json(partial / state) or {}).get("fingerprint") != fingerprint:
        raise RtkError(f"-o {out}: {partial} holds an unfinished {kind} of {differs}; "
                       "remove it or choose another folder")
    return partial, False


def kind_a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind
