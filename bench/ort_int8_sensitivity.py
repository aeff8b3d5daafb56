"""Which MatMuls does ONNX Runtime's per-tensor dynamic int8 (`rtk quantize --scheme ort-int8`) hurt? For bench/RESULTS.md
"ONNX Runtime int8, stacked on pruning".

    .venv/bin/python bench/ort_int8_sensitivity.py ONNX_DIR [--kind down_proj] [--scheme ort-int8] > out.jsonl

Everything quantized, then one MatMul of `--kind` at a time left float32 (one line per layer), compared with the
unquantized export as `rtk quantize` compares (rtk.quantize.verify: 8 x 128 tokens of WikiText-2 test, ONNX Runtime
CPU). The per-kind ranking is `rtk quantize --keep-float auto`'s own search (quantize.json: keep_float_search).
Scratch folders are made beside ONNX_DIR and removed.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rtk.export.onnx import GRAPH
from rtk.quantize.ort import Trials, _graph, weight_matmuls
from rtk.quantize.verify import comparison_blocks, text_spec, tolerance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx_dir", type=Path)
    ap.add_argument("--kind", default="down_proj")
    ap.add_argument("--scheme", default="ort-int8")
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    source = _graph(a.onnx_dir / GRAPH)
    kinds = weight_matmuls(source)
    blocks, _ = comparison_blocks(a.onnx_dir, text_spec())

    class OneNode(Trials):  # float_kinds holds node names here: leave exactly those float
        def __init__(self, *args):
            super().__init__(*args)
            self.kinds = {n: n for n in kinds}

    t = OneNode(a.onnx_dir, source, a.onnx_dir.parent / "sensitivity", a.scheme, kinds, blocks, tolerance(),
                lambda s: None)
    nodes = [n for n, k in kinds.items() if k == a.kind]
    for i, node in enumerate([None, *nodes]):
        stats, ok, _ = t.run([node] if node else [])
        print(json.dumps({"float": node, "layer_of_kind": i - 1 if node else None, "kind": a.kind,
                          "ppl_unquantized": stats["ppl_unquantized"], "ppl_quantized": stats["ppl_quantized"],
                          "ppl_increase": stats["ppl_increase"], "prefill": stats["prefill"]["mean_abs_logprob_diff"],
                          "decode": stats["decode"]["mean_abs_logprob_diff"], "passes": ok}), flush=True)


if __name__ == "__main__":
    main()
