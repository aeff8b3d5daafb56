"""`rtk.quantize(model_dir, scheme=..., out=...)`: `rtk quantize` in process (rtk.cli.quantize is a thin layer over it).

    q = rtk.quantize("runs/demo-onnx", scheme="ort-int8", out="runs/demo-onnx-int8")
    q.ppl_unquantized, q.ppl_quantized, q.mean_abs_logprob_diff, q.out

The scheme is checked first (unknown, or one this install / machine cannot serve: a line saying why, before any
work); the quantized folder is compared with its source and moved to `out` only within the tolerance
(rtk.quantize.verify). Bad input raises RtkError with the line the command prints, and nothing is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from rtk.quantize import quantizer

__all__ = ["QuantizeResult", "quantize"]


@dataclass(frozen=True)
class QuantizeResult:
    """What `rtk quantize` wrote at `out`, and how it compared with the unquantized model (quantize.json's numbers)."""

    out: Path
    scheme: str
    record: dict  # quantize.json: settings, counts, the comparison and its tolerance

    @property
    def ppl_unquantized(self) -> float:
        return self.record["verification"]["ppl_unquantized"]

    @property
    def ppl_quantized(self) -> float:
        return self.record["verification"]["ppl_quantized"]

    @property
    def mean_abs_logprob_diff(self) -> float:
        """Per predicted token of the blocks (prefill), in nats."""
        return self.record["verification"]["prefill"]["mean_abs_logprob_diff"]


def quantize(model_dir: Union[str, Path], scheme: str = "ort-int8", *, out: Union[str, Path],
             text: Optional[str] = None, samples: Optional[int] = None, seq_len: Optional[int] = None,
             echo: Optional[Callable[[str], None]] = print) -> QuantizeResult:
    """Quantize MODEL_DIR with `scheme` into `out`, as `rtk quantize MODEL_DIR --scheme S -o OUT`. ort-int8: MODEL_DIR
    is an `rtk export --format onnx` folder. `text`: what the comparison reads (default `wikitext2`, its test split;
    or a text / .jsonl file), `samples` blocks of `seq_len` tokens (defaults: rtk.quantize.VERIFY_*)."""
    write = quantizer(scheme)
    out = Path(out)
    rec = write(model_dir, out, text=text, samples=samples, seq_len=seq_len, echo=echo or (lambda s: None))
    return QuantizeResult(out=out, scheme=scheme, record=rec)
