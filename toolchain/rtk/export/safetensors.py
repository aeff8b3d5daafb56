"""Safetensors export: a physically smaller checkpoint that transformers and stock vLLM load.

Two layouts, chosen from the model's config:
- **standard**: only whole layers are gone (or nothing): the original architecture
  (Llama / Mistral / Qwen2, from `rtk_base_model_type`) with fewer, renumbered layers; no remote code.
- **native**: some layer lacks only its attention or only its MLP: DeciLM / nemotron-nas, one
  `block_configs` entry per layer, with `modeling_rtk.py` beside the weights (`auto_map`).

Every export is written into a temp folder next to the target, reloaded and verified (see verify.py),
and only then renamed into place.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import RtkError
from ..load import DTYPES
from ..modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM
from ..rewrite import atomic_write_dir, expand, save_native
from ..scoring import total_params
from .card import model_card
from .verify import verify

VLLM_VERSION = "0.32"


@dataclass(frozen=True)
class Standard:
    """How an rtk config maps back onto a standard transformers architecture."""

    hf_class: str
    extra: Callable[[RtkDeciConfig], dict]
    fits: Callable[[RtkDeciConfig], bool]  # biases expressible in that architecture


STANDARD: dict[str, Standard] = {
    "llama": Standard("LlamaForCausalLM",
                      lambda c: {"attention_bias": bool(c.attention_bias), "mlp_bias": bool(c.mlp_bias)},
                      lambda c: bool(c.qkv_bias) == bool(c.attention_bias)),
    "mistral": Standard("MistralForCausalLM", lambda c: {"sliding_window": None},
                        lambda c: not (c.qkv_bias or c.attention_bias or c.mlp_bias)),
    "qwen2": Standard("Qwen2ForCausalLM", lambda c: {"use_sliding_window": False},
                      lambda c: bool(c.qkv_bias) and not (c.attention_bias or c.mlp_bias)),
}


def removed_sublayers(config: RtkDeciConfig) -> list[str]:
    out = []
    for i, b in enumerate(config.block_configs):
        out += [f"attn.{i}"] * bool(b.attention.no_op) + [f"mlp.{i}"] * bool(b.ffn.no_op)
    return out


def standard_base(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type when the model is expressible as a standard checkpoint, else None."""
    base = getattr(config, "rtk_base_model_type", None)
    if base not in STANDARD or not STANDARD[base].fits(config):
        return None
    group = config.num_attention_heads // config.num_key_value_heads
    for b in config.block_configs:
        if bool(b.attention.no_op) != bool(b.ffn.no_op):
            return None
        if not b.attention.no_op and (b.attention.n_heads_in_group != group
                                      or b.ffn.intermediate_size != config.intermediate_size):
            return None
    return base


def vllm_blocker(config: RtkDeciConfig) -> Optional[str]:
    """The sublayer that stops stock vLLM serving a DeciLM folder, or None.

    vLLM's DeciLM layer starts its residual stream in the first attention; when the first sublayer
    that exists is an MLP, the residual is still None there and the first request crashes."""
    for i, b in enumerate(config.block_configs):
        if not b.attention.no_op:
            return None
        if not b.ffn.no_op:
            return f"mlp.{i}"
    return None


def _state_dict(model: RtkDeciLMForCausalLM, dtype: torch.dtype, keep_layers: Optional[list[int]] = None) -> dict:
    """Weights cast to `dtype`; with keep_layers, layers renumbered 0..len(keep_layers)-1."""
    new_index = {old: new for new, old in enumerate(keep_layers or [])}
    sd = {}
    for k, v in model.state_dict().items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", k)
        if m and keep_layers is not None:
            if int(m.group(1)) not in new_index:
                continue
            k = f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"
        sd[k] = v.detach().to(dtype)
    return sd


def _standard_config(config: RtkDeciConfig, base: str, n_layers: int, dtype: torch.dtype):
    from transformers import AutoConfig

    c = config
    cfg = AutoConfig.for_model(
        base, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        **STANDARD[base].extra(c))
    cfg.architectures = [STANDARD[base].hf_class]
    cfg.dtype = dtype
    return cfg


def _write_standard(model, base: str, dtype: torch.dtype, out: Path, generation_config) -> None:
    from transformers import AutoModelForCausalLM

    keep = [i for i, b in enumerate(model.config.block_configs) if not b.attention.no_op]
    cfg = _standard_config(model.config, base, len(keep), dtype)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = _state_dict(model, dtype, keep)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a bug, not a user error: the tables above are wrong
        raise RuntimeError(f"standard {base} layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    if generation_config is not None:
        hf.generation_config = generation_config
    hf.save_pretrained(out)


def _write_native(model, dtype: torch.dtype, out: Path, generation_config, vllm_note: Optional[str]) -> None:
    with torch.device("meta"):
        m = RtkDeciLMForCausalLM(RtkDeciConfig(**model.config.to_dict()))
    sd = _state_dict(model, dtype)
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (m.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"native layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if m.config.tie_word_embeddings:
        m.tie_weights()
    m.config.dtype = dtype
    if vllm_note:
        m.config.rtk_vllm_servable = False
        m.config.rtk_vllm_note = vllm_note
    elif hasattr(m.config, "rtk_vllm_servable"):
        del m.config.rtk_vllm_servable
    if generation_config is not None:
        m.generation_config = generation_config
    save_native(m, None, out)


def _reload(out: Path, layout: str):
    """The written folder, loaded the way its users load it (fails on any missing/unexpected weight)."""
    if layout == "standard":
        from transformers import AutoModelForCausalLM as cls
    else:
        cls = RtkDeciLMForCausalLM
    try:
        m, info = cls.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise RtkError(f"export: the written folder does not load ({type(exc).__name__}: {exc})") from None
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RtkError(f"export: the written folder loads with {bad}")
    return m.eval()


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def export_model(model: RtkDeciLMForCausalLM, tokenizer, out: Path, *, dtype: Optional[str] = None,
                 original: Optional[RtkDeciLMForCausalLM] = None, plan: Optional[dict] = None,
                 recipe_yaml: Optional[str] = None, source: Optional[str] = None,
                 transformers_only: bool = False) -> dict:
    """Write `model` (rtk class, any sublayers absent) as a verified safetensors folder at `out`.

    `original`: the model before pruning; it is run with the removed sublayers skipped and must give
    the same logits. `plan` / `recipe_yaml` are copied beside the weights and feed the model card;
    `source` is the folder the model came from (its generation_config.json is kept).
    Returns a summary (layout, params, bytes, verification lines)."""
    out = Path(out)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    if dtype is None:
        dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
    if dtype not in DTYPES:
        raise RtkError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    removed = removed_sublayers(model.config)
    base = standard_base(model.config)
    layout = "standard" if base else "native"
    blocker = vllm_blocker(model.config) if layout == "native" else None
    vllm_note = None
    if blocker:
        vllm_note = (f"stock vLLM {VLLM_VERSION} cannot serve this folder: its first remaining sublayer is "
                     f"{blocker} (an MLP before any attention), and vLLM's DeciLM layer crashes there")
        if not transformers_only:
            raise RtkError(f"plan: {vllm_note}; keep attn.0 (search.protect) or pass --transformers-only "
                           "to write a folder for transformers and rtk only")
    generation_config = None
    if source and (Path(source) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(source)

    tmp = atomic_write_dir(out)
    try:
        if layout == "standard":
            _write_standard(model, base, tdtype, tmp, generation_config)
        else:
            _write_native(model, tdtype, tmp, generation_config, vllm_note)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = _reload(tmp, layout)
        check = verify(reloaded, model, tdtype, original, removed if original is not None else ())
        del reloaded
        check.raise_on_mismatch(f"-o {out}")
        summary = {
            "layout": layout,
            "architecture": STANDARD[base].hf_class if base else "DeciLMForCausalLM",
            "base_model_type": getattr(model.config, "rtk_base_model_type", None),
            "dtype": dtype,
            "removed_sublayers": removed,
            "params": total_params(model),
            "params_before": plan.get("params_total") if plan and "params_total" in plan else
            total_params(original) if original is not None else None,
            "weight_bytes": weight_bytes(tmp),
            "vllm_servable": vllm_note is None,
            "vllm": vllm_note or f"served natively by stock vLLM {VLLM_VERSION}"
                                 + (" (--trust-remote-code)" if layout == "native" else ""),
            "verification": check.lines(),
            "verification_inputs": check.shape,
        }
        if plan is not None:
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "README.md").write_text(model_card(summary, plan, source))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def read_plan(path: Path) -> list[str]:
    """The removed sublayers of a plan.json written by `rtk prune`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RtkError(f"--plan {path}: cannot read it as JSON ({exc})") from None
    names = data.get("removed_sublayers") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RtkError(f"--plan {path}: has no 'removed_sublayers' list (write it with rtk prune)")
    bad = [n for n in names if not re.fullmatch(r"(attn|mlp|layer)\.\d+", n)]
    if bad:
        raise RtkError(f"--plan {path}: '{bad[0]}' is not a sublayer name (attn.N, mlp.N or layer.N)")
    return names


def export_dir(model_dir: str, out: Path, dtype: Optional[str] = None, plan: Optional[Path] = None,
               transformers_only: bool = False) -> dict:
    """`rtk export MODEL_DIR --format safetensors`: (re-)export any folder rtk loads, optionally applying
    a plan.json to it first. A plan.json inside MODEL_DIR must match the model; when it names the
    original model and that folder is here, the export is also checked against the original."""
    from ..load import load_model, resolve
    from ..rewrite import apply_plan

    if dtype is not None and dtype not in DTYPES:
        raise RtkError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if Path(out).exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    path = resolve(str(model_dir))
    if dtype is None:
        dtype = _stored_dtype(path)
    model, tokenizer, path = load_model(path, "float32")
    own_plan = Path(path) / "plan.json"
    plan_data, recipe_yaml, original = None, None, None
    if plan is not None:
        names = read_plan(plan)
        plan_data = json.loads(Path(plan).read_text())
        n = total_params(model)
        if plan_data.get("params_total", n) != n:
            raise RtkError(f"--plan {plan}: was made for a model with {plan_data['params_total']:,} parameters; "
                           f"{model_dir} has {n:,}")
        original, model = model, apply_plan(model, names)
    elif own_plan.is_file():
        plan_data = json.loads(own_plan.read_text())
        want = sorted(expand(plan_data.get("removed_sublayers", [])))
        have = sorted(removed_sublayers(model.config))
        if want != have:
            raise RtkError(f"{own_plan}: removed_sublayers {want} do not match the model's config.json, "
                           f"which lacks {have}")
        base = plan_data.get("model_path")
        if base and Path(base, "config.json").is_file() and not plan_data.get("heal"):  # healed: weights differ
            original = load_model(base, "float32")[0]
            if len(original.model.layers) != len(model.model.layers):
                raise RtkError(f"{own_plan}: model_path {base} has {len(original.model.layers)} layers, "
                               f"the model {len(model.model.layers)}")
    recipe_file = Path(plan).parent / "recipe.yaml" if plan else Path(path) / "recipe.yaml"
    if recipe_file.is_file():
        recipe_yaml = recipe_file.read_text()
    return export_model(model, tokenizer, out, dtype=dtype, original=original, plan=plan_data,
                        recipe_yaml=recipe_yaml, source=path, transformers_only=transformers_only)


def _stored_dtype(path: str) -> str:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        got = data.get("dtype") or data.get("torch_dtype")
        if got in DTYPES:
            return got
    return "float32"
