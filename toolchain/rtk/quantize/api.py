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

from rtk.errors import RtkError
from rtk.quantize import SCHEMES, quantizer

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
             calibration: Optional[str] = None, calibration_samples: Optional[int] = None,
             calibration_seq_len: Optional[int] = None, data_free: bool = False,
             max_ppl_increase: Optional[float] = None, max_logprob_diff: Optional[float] = None,
             keep_float: Union[str, list, None] = None,
             echo: Optional[Callable[[str], None]] = print) -> QuantizeResult:
    """Quantize MODEL_DIR with `scheme` into `out`, as `rtk quantize MODEL_DIR --scheme S -o OUT`. ort-int8: MODEL_DIR
    (and ort-int8-block, ort-int4-block) is an `rtk export --format onnx` folder; w8a8 (llm-compressor, served by vLLM): an rtk safetensors folder.
    `text`: what the comparison reads (default `wikitext2`, its test split; or a text / .jsonl file), `samples`
    blocks of `seq_len` tokens (defaults: rtk.quantize.VERIFY_*). llm-compressor's schemes only: `calibration`
    (default WikiText-2 valid, rtk.quantize.llm_compressor.CALIBRATION), its blocks, or `data_free`.
    `max_ppl_increase` / `max_logprob_diff`: the tolerance, instead of rtk.quantize.verify's defaults. ONNX
    Runtime's schemes only: `keep_float`, projection kinds left float32 (['down_proj'] or 'down_proj,up_proj'), or
    'auto' (the fewest, worst first, that bring the comparison within the tolerance; rtk.quantize.ort)."""
    if keep_float is not None and scheme in SCHEMES and not SCHEMES[scheme].onnx:
        raise RtkError(f"--keep-float: --scheme {scheme} takes no projection kinds to keep float (ONNX Runtime's "
                       f"schemes do: {', '.join(n for n, s in SCHEMES.items() if s.onnx)}; llm-compressor keeps "
                       "lm_head unquantized)")
    write = quantizer(scheme)
    out = Path(out)
    cal = {k: v for k, v in (("calibration", calibration), ("calibration_samples", calibration_samples),
                             ("calibration_seq_len", calibration_seq_len), ("data_free", data_free)) if v}
    if cal and not SCHEMES[scheme].calibrated:
        flag = "--" + next(iter(cal)).replace("_", "-")
        raise RtkError(f"{flag}: --scheme {scheme} takes no calibration data (llm-compressor's schemes do: "
                       f"{', '.join(n for n, s in SCHEMES.items() if s.calibrated)})")
    if keep_float is not None:
        cal["keep_float"] = keep_float
    rec = write(model_dir, out, text=text, samples=samples, seq_len=seq_len, echo=echo or (lambda s: None),
                max_ppl_increase=max_ppl_increase, max_logprob_diff=max_logprob_diff, **cal)
    return QuantizeResult(out=out, scheme=scheme, record=rec)
