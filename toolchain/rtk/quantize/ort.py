"""`rtk quantize --scheme ort-int8 | ort-int8-block | ort-int4-block`: ONNX Runtime's own quantizers on an
`rtk export --format onnx` folder. Each rewrites the MatMuls whose second input is a stored weight (the attention
projections, the MLP, an untied LM head); everything else stays float32 as it was: the graph's inputs and outputs
(the KV-cache inputs and presents: names, types and shapes are checked equal), the norms, the attention arithmetic
(its MatMuls multiply two activations), the embedding (a Gather) and a head tied to it (its weight is
Transpose(embedding), no stored weight).

- `ort-int8`: `onnxruntime.quantization.quantize_dynamic`: int8 weights, symmetric per output channel, times uint8
  activations quantized at run time from each call's whole range (per tensor): DynamicQuantizeLinear +
  MatMulInteger. Weights keep the full int8 range (`reduce_range` off: the 7-bit option is for CPUs without VNNI).
- `ort-int8-block`, `ort-int4-block`: `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`:
  8- or 4-bit weights, symmetric, one scale per block of 32 input elements of each output channel (MatMulNBits,
  what onnxruntime-genai's model builder writes for CPUs), with `accuracy_level` 4: the CPU kernel quantizes the
  activations to int8 at run time per block of 32, so one outlier moves the scale of its block only.

`keep_float` (`--keep-float`): projection kinds left float32, by the module name the dynamo export records on each
MatMul (`q_proj`, ..., `down_proj`, `lm_head`), or `auto`: quantize all; when the comparison fails, rank the kinds
by the error each one causes quantized alone, and keep the worst float one at a time until the comparison passes
(an accuracy-aware fallback; every try is recorded). The comparison runs on the machine that quantized.

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
# each scheme's tool and its arguments (weight_type by its QuantType name), recorded in quantize.json
BLOCK = {"block_size": 32, "is_symmetric": True, "accuracy_level": 4}
ORT_SCHEMES = {
    "ort-int8": {"tool": "onnxruntime.quantization.quantize_dynamic",
                 "settings": {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": False,
                              "weight_type": "QInt8"},
                 "weights": "int8, symmetric, per output channel",
                 "activations": "QUInt8, dynamic: per tensor, from each call's range"},
    "ort-int8-block": {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                       "settings": {"bits": 8, **BLOCK},
                       "weights": "int8, symmetric, one scale per block of 32 inputs of each output channel",
                       "activations": "float32 in; int8 per block of 32 at run time (accuracy_level 4)"},
    "ort-int4-block": {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                       "settings": {"bits": 4, **BLOCK},
                       "weights": "int4, symmetric, one scale per block of 32 inputs of each output channel",
                       "activations": "float32 in; int8 per block of 32 at run time (accuracy_level 4)"},
}
QUANTIZED_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits")
# operators only a quantized graph holds: a source with any of them is quantized already
QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                 "QuantizeLinear", "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized", "QGemm", "ConvInteger",
                 "MatMulIntegerToFloat"}
ONNX_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}  # float, (u)int8, int32/64, bool, halves


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def check_source(model_dir, scheme: str = "ort-int8") -> Path:
    """MODEL_DIR as a folder `rtk export --format onnx` wrote, not quantized yet; else the one line why not."""
    src = unquantized_source(model_dir, "export")
    if not (src / GRAPH).is_file() or "rtk_onnx" not in json_object(src / "config.json"):
        raise RtkError(f"MODEL_DIR: {model_dir} is not an rtk ONNX export (no {GRAPH} beside a config.json with "
                       f"rtk_onnx); --scheme {scheme} quantizes what `rtk export MODEL --format onnx -o DIR` writes")
    ops = sorted({n.op_type for n in _graph(src / GRAPH).graph.node} & QUANTIZED_OPS)
    if ops:
        raise RtkError(f"MODEL_DIR: {model_dir}: {GRAPH} is quantized already (it holds {', '.join(ops)}); quantize "
                       "the unquantized export")
    return src


def weight_matmuls(graph) -> dict[str, str]:
    """{MatMul node name: its projection kind} for every MatMul whose second input is a stored weight. The kind is
    the module the dynamo export names in the node's `pkg.torch.onnx.name_scopes` (..., 'model.layers.3.mlp.down_proj',
    'linear_5' -> 'down_proj'); '?' when the export recorded none."""
    import ast

    stored = {i.name for i in graph.graph.initializer}
    out = {}
    for n in graph.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in stored:
            scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
            try:
                scopes = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                scopes = []
            out[n.name] = scopes[-2].rsplit(".", 1)[-1] if len(scopes) >= 2 and scopes[-2] else "?"
    return out


def quantize_graph(src: Path, dst: Path, scheme: str, exclude: list[str]) -> None:
    """The scheme's tool on src/model.onnx (+ .data) -> dst/model.onnx (+ model.onnx.data), MatMul nodes named in
    `exclude` left float. quantize_dynamic writes a shape-inferred copy beside the graph it reads: it reads copies of
    the source's files in a scratch folder of dst (onnx reads external data through no symbolic or hard link), so
    the source folder is never written to."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    settings = ORT_SCHEMES[scheme]["settings"]
    scratch = dst / ".source"
    scratch.mkdir()
    for name in (GRAPH, DATA):
        if (src / name).is_file():
            shutil.copy2(src / name, scratch / name)
    logging.disable(logging.WARNING)  # its advice to pre-process (shape inference rtk's graph already carries)
    try:
        if "weight_type" in settings:
            quantize_dynamic(scratch / GRAPH, dst / GRAPH, use_external_data_format=True, nodes_to_exclude=exclude,
                             **{**settings, "weight_type": getattr(QuantType, settings["weight_type"])})
        else:
            import onnx

            q = MatMulNBitsQuantizer(onnx.load(str(scratch / GRAPH)), nodes_to_exclude=exclude, **settings)
            q.process()
            q.model.save_model_to_file(str(dst / GRAPH), use_external_data_format=True)
            for name in (GRAPH, DATA):
                if (dst / name).is_file():
                    (dst / name).chmod(0o644)  # it writes its data file private
    except Exception as exc:  # onnxruntime.quantization raises many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RtkError(f"{scheme}: onnxruntime's {ORT_SCHEMES[scheme]['tool'].rsplit('.', 1)[-1]} failed "
                       f"({type(exc).__name__}: {first})") from None
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
            raise RtkError(f"the quantizer changed the graph's {side} ({', '.join(changed)}); "
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


def record_of(src: Path, before, dst: Path, scheme: str, kept: list[str], stats: dict, seconds: float, text: dict,
              float_kinds: dict, weight_count: int) -> dict:
    import onnxruntime

    after = _graph(dst / GRAPH)
    ops = {}
    for n in after.graph.node:
        if n.op_type in QUANTIZED_OPS:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    how = ORT_SCHEMES[scheme]
    return {"scheme": scheme, "tool": how["tool"], "onnxruntime": onnxruntime.__version__,
            "settings": how["settings"], "weights": how["weights"], "activations": how["activations"],
            "source": src.name, "quantized_matmuls": sum(ops.get(op, 0) for op in QUANTIZED_MATMULS),
            "weight_matmuls": weight_count, "quantized_ops": ops, **float_kinds,
            "weights_before": weight_counts(before), "weights_after": weight_counts(after),
            "io": "kept: inputs and outputs (KV cache included) equal the export's", "kept_files": kept,
            "quantize_seconds": round(seconds, 2), "text": text, "verification": stats}


def float_kinds_of(keep_float, kinds: dict[str, str]) -> Optional[list[str]]:
    """`keep_float` as a list of projection kinds (None: `auto`); an unknown kind is the one line naming it."""
    if keep_float is None:
        return []
    if isinstance(keep_float, str):
        if keep_float.strip() == "auto":
            return None
        keep_float = [k for k in keep_float.split(",") if k.strip()]
    wanted = [k.strip() for k in keep_float]
    have = sorted(set(kinds.values()))
    unknown = [k for k in wanted if k not in have]
    if unknown:
        raise RtkError(f"--keep-float: {', '.join(unknown)} names no MatMul of this export; its projection kinds: "
                       f"{', '.join(have)} (or auto)")
    if set(have) <= set(wanted):
        raise RtkError(f"--keep-float: {', '.join(wanted)} leaves every weight MatMul float32, nothing to quantize")
    return wanted


class Trials:
    """Quantize with some kinds float and compare, in scratch folders beside OUT; each try's numbers are kept."""

    def __init__(self, src: Path, source, out: Path, scheme: str, kinds: dict[str, str], blocks, tol: dict, echo):
        self.src, self.source, self.out, self.scheme, self.kinds, self.blocks, self.tol, self.echo = (
            src, source, out, scheme, kinds, blocks, tol, echo)  # source: src's graph, without its weights
        self.tried: list[dict] = []
        self.kept: list[str] = []  # the files of the source copied beside the last graph

    def run(self, float_kinds: list[str], into: Optional[Path] = None) -> tuple[dict, bool, float]:
        """(comparison, whether it passes, seconds quantizing) for the graph with `float_kinds` left float, written
        into `into` (kept) or a scratch folder (removed)."""
        from rtk.quantize.verify import check, compare

        tmp = into or temp_dir_beside(self.out)
        try:
            t0 = time.perf_counter()
            quantize_graph(self.src, tmp, self.scheme, [n for n, k in self.kinds.items() if k in float_kinds])
            seconds = time.perf_counter() - t0
            check_io(self.source, _graph(tmp / GRAPH))
            self.kept = copy_beside(self.src, tmp)  # OrtLM reads the folder's config and tokenizer
            stats = compare(self.src, tmp, self.blocks)
        finally:
            if into is None:
                shutil.rmtree(tmp, ignore_errors=True)
        stats["tolerance"] = self.tol
        try:
            check(stats, "")
        except RtkError:
            return stats, False, seconds
        return stats, True, seconds

    def note(self, float_kinds: list[str], stats: dict, ok: bool, why: str) -> None:
        self.tried.append({"float": float_kinds, "why": why, "ppl_increase": stats["ppl_increase"],
                           "prefill": stats["prefill"]["mean_abs_logprob_diff"],
                           "decode": stats["decode"]["mean_abs_logprob_diff"], "passes": ok})
        self.echo(f"rtk:   float {','.join(float_kinds) or 'none'} ({why}): PPL {stats['ppl_increase']:+.2%}, "
                  f"{stats['prefill']['mean_abs_logprob_diff']:.3f} nats per token"
                  f"{'' if ok else ' - over the tolerance'}")


def auto_float(trials: Trials) -> list[str]:
    """The accuracy-aware fallback: the fewest kinds kept float, worst first, so that the comparison passes."""
    stats, ok, _ = trials.run([])
    trials.note([], stats, ok, "everything quantized")
    if ok:
        return []
    kinds = sorted(set(trials.kinds.values()))
    error = {}
    for k in kinds:  # each kind quantized alone: the error it brings
        s, ok_k, _ = trials.run([x for x in kinds if x != k])
        trials.note([x for x in kinds if x != k], s, ok_k, f"{k} alone quantized")
        error[k] = s["prefill"]["mean_abs_logprob_diff"]
    order = sorted(kinds, key=lambda x: -error[x])
    for n in range(1, len(order)):  # at least one kind stays quantized
        s, ok, _ = trials.run(order[:n])
        trials.note(order[:n], s, ok, "worst kinds float")
        if ok:
            return order[:n]
    raise RtkError(f"--keep-float auto: no set of projection kinds left float brings {trials.scheme} within the "
                   f"tolerance (the least harmful kind, {order[-1]}, quantized alone: PPL "
                   f"{s['ppl_increase']:+.2%}, {s['prefill']['mean_abs_logprob_diff']:.3f} nats per token); nothing "
                   "written")


def quantize_onnx(model_dir, out, scheme: str = "ort-int8", text: Optional[str] = None,
                  samples: Optional[int] = None, seq_len: Optional[int] = None,
                  max_ppl_increase: Optional[float] = None, max_logprob_diff: Optional[float] = None,
                  keep_float=None, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Quantize the ONNX export at `model_dir` with `scheme` (ORT_SCHEMES) into `out` (which must not exist) and
    compare the two; returns the record written as quantize.json. `keep_float`: projection kinds left float32 (a
    list, or 'q_proj,down_proj'), or 'auto'. Nothing is left at `out` unless the comparison passed."""
    from rtk.quantize import VERIFY_SAMPLES, VERIFY_SEQ_LEN
    from rtk.quantize.verify import check, comparison_blocks, text_spec, tolerance

    out = Path(out)
    spec = text_spec(text, samples or VERIFY_SAMPLES, seq_len or VERIFY_SEQ_LEN)
    src = check_source(model_dir, scheme)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites a quantized folder)")
    source = _graph(src / GRAPH)
    kinds = weight_matmuls(source)
    wanted = float_kinds_of(keep_float, kinds)
    blocks, info = comparison_blocks(src, spec)
    trials = Trials(src, source, out, scheme, kinds, blocks, tolerance(max_ppl_increase, max_logprob_diff), echo)
    if wanted is None:
        echo(f"rtk: --keep-float auto: searching which projection kinds {scheme} leaves float32, on "
             f"{spec.describe()}")
        wanted = auto_float(trials)
    tmp = temp_dir_beside(out)
    try:
        stats, _, seconds = trials.run(wanted, into=tmp)
        echo(f"rtk: quantized {src.name}/{GRAPH} ({scheme}) in {seconds:.1f}s; compared the two in ONNX Runtime "
             f"on {spec.describe()}")
        hint = ("" if keep_float is not None else
                f" (--keep-float auto leaves the worst projection kinds float32"
                f"{'; --scheme ort-int8-block scales activations per block' if scheme == 'ort-int8' else ''})")
        try:
            check(stats, f"-o {out}")
        except RtkError as exc:
            raise RtkError(exc.message + hint) from None
        kept = trials.kept
        float_record = {"float_kinds": wanted,
                        "float_matmuls": sum(1 for k in kinds.values() if k in wanted),
                        **({"keep_float_search": trials.tried} if trials.tried else {})}
        record = record_of(src, source, tmp, scheme, kept, stats, seconds,
                           {"text": info.get("text"), "samples": spec.samples, "seq_len": spec.seq_len},
                           float_record, len(kinds))
        publish(src, tmp, out, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
