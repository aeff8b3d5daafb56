"""bench/scale scripts, exercised at tiny scale (the real runs need a GPU or a long quiet machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What a bare GPU machine has: torch and transformers (and their dependencies), not rtk's CLI stack.
BLOCK = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'click', 'pydantic', 'matplotlib', 'ray', 'peft', 'lm_eval', 'vllm'}:
            raise ImportError(f'blocked: {name}')
        return None
sys.meta_path.insert(0, _Block())
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_gpu_step_script_runs_with_torch_and_transformers_only(tmp_path):
    out = tmp_path / "step.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "toolchain")}
    r = subprocess.run([sys.executable, "-c", BLOCK, str(REPO / "bench" / "scale" / "gpu_step.py"), "--tiny",
                        "--device", "cpu", "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["candidates"] == 7 and res["step_pflop"] > 0
    assert set(res["engines"]) == {"layer-major", "per-candidate"}
    for row in res["engines"].values():
        assert row["seconds"] > 0 and row["max_rel_ppl_diff_vs_first_engine"] < 1e-5
    assert res["engines"]["layer-major"]["groups"] == 1
