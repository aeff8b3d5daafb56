"""`rtk quantize --scheme ort-int8`: ONNX Runtime's own dynamic quantization of an `rtk export --format onnx` folder.

`onnxruntime.quantization.quantize_dynamic` rewrites every MatMul whose second input is a stored weight (the
attention projections, the MLP, an untied LM head) into int8 weights, symmetric per output channel, times uint8
activations quantized at run time from each call's own range (per tensor): DynamicQuantizeLinear + MatMulInteger,
which ONNX Runtime's CPU provider runs. Everything else stays float32, as it was: the graph's inputs and outputs
(the KV-cache inputs and presents: names, types and shapes are checked equal), the norms, the attention arithmetic
(its MatMuls multiply two activations), the embedding (a Gather) and a head tied to it (its weight is
Transpose(embedding), no stored weight). Weights keep the full int8 range (`reduce_range` off: quantize_dynamic's
7-bit option is for CPUs without VNNI, where its uint8 x int8 products can saturate); the comparison runs on the
machine that quantized.

The output keeps every other file of the export (tokenizer and chat template, generation_config.json,
genai_config.json, config.json, plan.json when there), adds quantize.json (what was quantized, how, and the
comparison of rtk.quantize.verify) and a Quantization section in README.md. It is written in a temporary folder
beside OUT and renamed to OUT only after the comparison passed.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from rtk.errors import RtkError
from rtk.export.onnx import DATA, GRAPH
from rtk.outdir import temp_dir_beside

from rtk.quantize import RECORD, json_object, publish, unquantized_source
# quantize_dynamic's arguments (weight_type by its QuantType name); recorded in quantize.json
SETTINGS = {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": False, "weight_type": "QInt8"}
ACTIVATIONS = "QUInt8, dynamic: per tensor, from each call's range"
# operators only a quantized graph holds: a source with any of them is quantized already
QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                 "QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized", "QGemm", "ConvInteger",
                 "MatMulIntegerToFloat"}
ONNX_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # float, (u)int8, int32/64, bool, halves


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def check_source(model_dir) -> Path:
    """MODEL_DIR as a folder `rtk export --format onnx` wrote, not quantized yet; else the one line why not."""
    src = unquantized_source(model_dir, "export")
    if not (src / GRAPH).is_file() or "rtk_onnx" not in json_object(src / "config.json"):
        raise RtkError(f"MODEL_DIR: {model_dir} is not an rtk ONNX export (no {GRAPH} beside a config.json with "
                       "rtk_onnx); --scheme ort-int8 quantizes what `rtk export MODEL --format onnx -o DIR` writes")
    ops = sorted({n.op_type for n in _graph(src / GRAPH).graph.node} & QUANTIZED_OPS)
    if ops:
        raise RtkError(f"MODEL_DIR: {model_dir}: {GRAPH} is quantized already (it holds {', '.join(ops)}); quantize "
                       "the unquantized export")
    return src


def quantize_graph(src: Path, dst: Path) -> None:
    """quantize_dynamic with SETTINGS: src/model.onnx (+ .data) -> dst/model.onnx (+ model.onnx.data). It writes its
    shape-inferred copy beside the graph it reads: it reads copies of the source's files in a scratch folder of dst
    (onnx reads external data through no symbolic or hard link), so the source folder is never written to."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {**SETTINGS, "weight_type": getattr(QuantType, SETTINGS["weight_type"])}
    scratch = dst / ".source"
    scratch.mkdir()
    for name in (GRAPH, DATA):
        if (src / name).is_file():
            shutil.copy2(src / name, scratch / name)
    logging.disable(logging.WARNING)  # its advice to pre-process (shape inference rtk's graph already carries)
    try:
        quantize_dynamic(scratch / GRAPH, dst / GRAPH, use_external_data_format=True, **settings)
    except Exception as exc:  # onnxruntime.quantization raises many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RtkError(f"ort-int8: onnxruntime's quantize_dynamic failed ({type(exc).__name__}: {first})") from None
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(scratch, ignore_errors=True)


def io_signature(graph) -> dict:
    """{'inputs' | 'outputs': [(name, element type, dims)]} of a graph (dims: numbers or symbolic names)."""
    def sig(v):
        t = v.type.tensor_type
        return [v.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]]

    return {"inputs": [sig(v) for v in graph.graph.input], "outputs": [sig(v) for v in graph.graph.output]}


def check_io(before, after) -> None:
    """The quantized graph takes and returns exactly what the export did (the KV cache included)."""
    a, b = io_signature(before), io_signature(after)
    for side in ("inputs", "outputs"):
        if a[side] != b[side]:
            changed = [x[0] for x, y in zip(a[side], b[side]) if x != y] or ["their number"]
            raise RtkError(f"ort-int8: quantize_dynamic changed the graph's {side} ({', '.join(changed)}); "
                           "rtk keeps them, the KV cache included, exactly")


def weight_counts(graph) -> dict:
    """Stored weights by element type name: {'FLOAT': {'tensors', 'elements', 'bytes'}, 'INT8': ...}."""
    import onnx

    out: dict = {}
    for init in graph.graph.initializer:
        n = math.prod(init.dims)
        row = out.setdefault(onnx.TensorProto.DataType.Name(init.data_type), {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += n
        row["bytes"] += n * ONNX_DTYPE_BYTES.get(init.data_type, 4)
    return out


def copy_beside(src: Path, dst: Path) -> list[str]:
    """Every file of the export but the graph (tokenizer, configs, plan.json, the card) into dst; their names."""
    kept = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in (GRAPH, DATA, RECORD):
            shutil.copy2(f, dst / f.name)
            kept.append(f.name)
    return kept


def record_of(src: Path, dst: Path, kept: list[str], stats: dict, seconds: float, text: dict) -> dict:
    import onnxruntime

    before, after = _graph(src / GRAPH), _graph(dst / GRAPH)
    ops = {}
    for n in after.graph.node:
        if n.op_type in QUANTIZED_OPS:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    stored = {i.name for i in before.graph.initializer}
    weight_matmuls = sum(1 for n in before.graph.node if n.op_type == "MatMul" and n.input[1] in stored)
    return {"scheme": "ort-int8", "tool": "onnxruntime.quantization.quantize_dynamic",
            "onnxruntime": onnxruntime.__version__, "settings": SETTINGS, "activations": ACTIVATIONS,
            "source": src.name, "quantized_matmuls": ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0),
            "weight_matmuls": weight_matmuls, "quantized_ops": ops,
            "weights_before": weight_counts(before), "weights_after": weight_counts(after),
            "io": "kept: inputs and outputs (KV cache included) equal the export's", "kept_files": kept,
            "quantize_seconds": round(seconds, 2), "text": text, "verification": stats}


def quantize_onnx(model_dir, out, text: Optional[str] = None, samples: Optional[int] = None,
                  seq_len: Optional[int] = None, max_ppl_increase: Optional[float] = None,
                  max_logprob_diff: Optional[float] = None, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Quantize the ONNX export at `model_dir` into `out` (which must not exist) and compare the two; returns the
    record written as quantize.json. Nothing is left at `out` unless the comparison passed."""
    from rtk.quantize import VERIFY_SAMPLES, VERIFY_SEQ_LEN
    from rtk.quantize.verify import check, compare, comparison_blocks, text_spec, tolerance

    out = Path(out)
    spec = text_spec(text, samples or VERIFY_SAMPLES, seq_len or VERIFY_SEQ_LEN)
    src = check_source(model_dir)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites a quantized folder)")
    blocks, info = comparison_blocks(src, spec)
    tmp = temp_dir_beside(out)
    try:
        t0 = time.perf_counter()
        quantize_graph(src, tmp)
        seconds = time.perf_counter() - t0
        check_io(_graph(src / GRAPH), _graph(tmp / GRAPH))
        echo(f"rtk: quantized {src.name}/{GRAPH} in {seconds:.1f}s; comparing the two in ONNX Runtime on "
             f"{spec.describe()}")
        stats = compare(src, tmp, blocks)
        stats["tolerance"] = tolerance(max_ppl_increase, max_logprob_diff)
        check(stats, f"-o {out}")
        kept = copy_beside(src, tmp)
        record = record_of(src, tmp, kept, stats, seconds, {"text": info.get("text"), "samples": spec.samples,
                                                            "seq_len": spec.seq_len})
        publish(src, tmp, out, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
