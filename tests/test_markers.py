"""conftest's guards: a test that heals, exports ONNX or starts a vLLM server in its process without the marker
fails and names the marker (so `make test-fast` stays fast and `make test` runs every vLLM test after the rest);
a marked one, or one whose VLLMServer runs a stand-in command, goes on to the guarded function."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

CASES = '''
import sys
import pytest
from rtk.errors import RtkError

def test_heals_unmarked():
    from rtk.heal import trainer
    trainer.distill()

@pytest.mark.heal
def test_heals_marked():
    from rtk.heal import trainer
    with pytest.raises(TypeError):  # past the guard: distill itself refuses no arguments
        trainer.distill()

def test_onnx_unmarked():
    from rtk.export import onnx
    onnx.export_graph()

def test_vllm_unmarked():
    from rtk.serve.server import VLLMServer
    VLLMServer("/nowhere", port=1, command=[sys.executable, "-m", "vllm.entrypoints.openai.api_server"]).__enter__()

def test_stand_in_server_unmarked():
    from rtk.serve.server import VLLMServer
    server = VLLMServer("/nowhere", command=[sys.executable, "-c", "import sys; sys.exit(3)"], startup_timeout=1)
    with pytest.raises(RtkError):  # past the guard: the stand-in exits before it is healthy
        server.__enter__()
'''


def test_unmarked_heavy_work_fails_and_names_its_marker(tmp_path):
    (tmp_path / "conftest.py").write_text(  # the suite's conftest, under another module name
        f"import importlib.util, sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(REPO / 'tests' / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(suite)\n"
        "pytest_runtest_setup, pytest_runtest_call = suite.pytest_runtest_setup, suite.pytest_runtest_call\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rf",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    failed = sorted(line.split("::")[1].split(" ")[0] for line in p.stdout.splitlines() if line.startswith("FAILED"))
    assert failed == ["test_heals_unmarked", "test_onnx_unmarked", "test_vllm_unmarked"], p.stdout[-3000:]
    for name, marker in (("test_heals_unmarked", "heal"), ("test_onnx_unmarked", "onnx"),
                         ("test_vllm_unmarked", "vllm")):
        assert f"test_cases.py::{name} runs " in p.stdout and f"mark it @pytest.mark.{marker}" in p.stdout
    assert "2 passed" in p.stdout, p.stdout[-3000:]
