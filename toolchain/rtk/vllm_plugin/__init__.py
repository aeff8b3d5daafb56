"""rtk's vLLM plugin: serves the rtk-pruned models stock vLLM's DeciLM cannot (Qwen3's q/k norms, Gemma 3's
norms after each sublayer, a model whose first sublayer is an MLP, e.g. layer 0's attention removed).

vLLM loads it in every process through the entry point ``vllm.general_plugins`` (pyproject.toml:
``rtk = "rtk.vllm_plugin:register"``); ``register`` only names the class, which vLLM imports when a
model's ``architectures`` is ``["RtkForCausalLM"]``. So ``pip install rtk-prune`` (rtk's distribution
name) next to vLLM is all a server needs. This module imports nothing heavy: rtk's export and deploy read the
names below without vLLM.
"""
from __future__ import annotations

ARCHITECTURE = "RtkForCausalLM"  # the architectures[] entry of a folder that needs this plugin
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "rtk"  # also the name VLLM_PLUGINS must list when it is set
MODEL_CLASS = "rtk.vllm_plugin.model:RtkForCausalLM"


def register() -> None:
    """The entry point vLLM calls (maybe several times per process): register the architecture, lazily."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
