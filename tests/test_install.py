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
