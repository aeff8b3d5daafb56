"""Safetensors export: a physically smaller checkpoint that transformers and vLLM load.

Four layouts; `rtk export` picks the first of the first three that fits, `--format per-layer-config`
asks for the fourth:
- **standard**: only whole layers are gone (or nothing): the original architecture
  (Llama / Mistral / Qwen2 / Qwen3, from `rtk_base_model_type`) with fewer, renumbered layers; no remote code.
- **native**: some layer lacks only its attention or only its MLP, and stock vLLM's DeciLM serves it:
  DeciLM / nemotron-nas, one `block_configs` entry per layer, `modeling_rtk.py` beside the weights (`auto_map`).
- **plugin**: what DeciLM cannot express or stock vLLM cannot run (Qwen3's q/k norms; an MLP before any
  attention, e.g. `attn.0` removed): the base architecture's standard config with a `per_layer_config`
  whose `skip` lists name the removed modules, `architectures: ["RtkForCausalLM"]` (rtk's vLLM plugin,
  rtk.vllm_plugin) and `modeling_rtk.py` (`auto_map`) for transformers.
- **per-layer-config**: the same config with the standard `architectures` (`LlamaForCausalLM`, ...), for
  the day transformers' and vLLM's own modeling code reads `per_layer_config`; until then it loads
  through `modeling_rtk.py` (trust_remote_code) and rtk's plugin (`--hf-overrides`).

Every export is written into a temp folder next to the target, reloaded and verified (see verify.py),
and only then renamed into place.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import RtkError
from ..load import DTYPES
from ..modeling_rtk import BASE_ARCHS, RtkDeciConfig, RtkDeciLMForCausalLM, config_from_standard
from ..rewrite import MODELING_FILE, atomic_write_dir, expand
from ..vllm_plugin import ARCHITECTURE as PLUGIN_ARCH
from ..scoring import total_params
from ..serve import folder_flags
from .card import model_card
from .shards import SHARD_BYTES, write_shards
from .verify import verify

VLLM_VERSION = "0.32"
LAYOUTS = ("standard", "native", "plugin", "per-layer-config")
PER_LAYER = ("plugin", "per-layer-config")  # the layouts written as a standard config + per_layer_config
SKIP = {"attn": "attention", "mlp": "mlp"}  # rtk sublayer kind -> per_layer_config skip entry


def removed_sublayers(config: RtkDeciConfig) -> list[str]:
    out = []
    for i, b in enumerate(config.block_configs):
        out += [f"attn.{i}"] * bool(b.attention.no_op) + [f"mlp.{i}"] * bool(b.ffn.no_op)
    return out


def standard_config(config: RtkDeciConfig, base: str, n_layers: int, dtype: torch.dtype,
                    per_layer_config: Optional[dict] = None):
    """The transformers config of architecture `base` with rtk config `config`'s dimensions."""
    from transformers import AutoConfig

    c, spec = config, BASE_ARCHS[base]
    kw = {} if per_layer_config is None else {"per_layer_config": per_layer_config}
    cfg = AutoConfig.for_model(
        base, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=bool(c.tie_word_embeddings),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        **spec.fixed, **spec.standard(c), **kw)
    cfg.architectures = [spec.hf_class]
    cfg.dtype = dtype
    return cfg


def _base_fits(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type whose standard config expresses `config`'s biases and norms, else None
    (checked by the round trip rtk config -> standard config -> rtk config)."""
    base = getattr(config, "rtk_base_model_type", None)
    if base not in BASE_ARCHS:
        return None
    back = config_from_standard(standard_config(config, base, config.num_hidden_layers, torch.float32))
    flags = ("qkv_bias", "attention_bias", "mlp_bias", "qk_norm")
    same = all(bool(getattr(back, k)) == bool(getattr(config, k, False)) for k in flags)
    return base if same and (back.head_dim, back.num_key_value_heads) == (config.head_dim,
                                                                          config.num_key_value_heads) else None


def _uniform_sizes(config: RtkDeciConfig) -> bool:
    """Every present sublayer has the global KV-head count and MLP width (rtk only removes sublayers)."""
    group = config.num_attention_heads // config.num_key_value_heads
    return all((b.attention.no_op or b.attention.n_heads_in_group == group)
               and (b.ffn.no_op or b.ffn.intermediate_size == config.intermediate_size) for b in config.block_configs)


def standard_base(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type when the model is expressible as a standard checkpoint, else None."""
    base = _base_fits(config)
    if base is None or not _uniform_sizes(config):
        return None
    if any(bool(b.attention.no_op) != bool(b.ffn.no_op) for b in config.block_configs):
        return None
    return base


def per_layer_base(config: RtkDeciConfig) -> Optional[str]:
    """The base model_type when the model is expressible as a standard config + per_layer_config skips."""
    base = _base_fits(config)
    return base if base is not None and _uniform_sizes(config) else None


def per_layer_skips(config: RtkDeciConfig) -> dict:
    """{layer: {"skip": [...]}} for every layer with a removed sublayer (transformers' schema)."""
    out: dict[int, dict] = {}
    for name in removed_sublayers(config):
        kind, i = name.split(".")
        out.setdefault(int(i), {"skip": []})["skip"].append(SKIP[kind])
    return out


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


def choose_layout(config: RtkDeciConfig, requested: Optional[str] = None) -> str:
    """standard, else native (stock vLLM's DeciLM), else plugin (rtk's vLLM plugin); `requested`
    ('per-layer-config', or 'plugin') forces that layout. A model no layout serves is an RtkError saying what
    each serves."""
    base = getattr(config, "rtk_base_model_type", None) or "none"
    if requested in PER_LAYER:
        if per_layer_base(config) is None:
            raise RtkError(f"--format {requested}: the model (base model_type '{base}') is not expressible as a "
                           f"standard {', '.join(BASE_ARCHS)} config with per_layer_config skips")
        return requested
    if standard_base(config):
        return "standard"
    why = ("Qwen3's per-head q/k norms" if getattr(config, "qk_norm", False) else
           f"its first remaining sublayer is {vllm_blocker(config)} (an MLP before any attention), and vLLM's "
           "DeciLM layer crashes there" if vllm_blocker(config) else None)
    if why is None:
        return "native"
    if per_layer_base(config):
        return "plugin"
    raise RtkError(f"plan: no vLLM format serves this model: stock vLLM {VLLM_VERSION}'s DeciLM cannot ({why}), and "
                   f"rtk's vLLM plugin serves standard {', '.join(BASE_ARCHS)} configs whose removed modules "
                   f"are listed per layer, which this model (base model_type '{base}') is not")


def vllm_line(layout: str, architecture: str) -> str:
    """How vLLM serves a folder of this layout (the model card and `rtk export` say it)."""
    if layout == "standard":
        return f"served natively by stock vLLM {VLLM_VERSION} ({architecture})"
    if layout == "native":
        return f"served natively by stock vLLM {VLLM_VERSION} (DeciLMForCausalLM, --trust-remote-code)"
    if layout == "plugin":
        return (f"served by rtk's vLLM plugin ({PLUGIN_ARCH}): `pip install rtk` next to vLLM {VLLM_VERSION} "
                "(or build the image in deploy/README.md)")
    return (f"{architecture} + per_layer_config: no vLLM release reads per_layer_config yet; today rtk's vLLM plugin "
            f"serves it: `pip install rtk` next to vLLM and pass --hf-overrides "
            f"'{{\"architectures\": [\"{PLUGIN_ARCH}\"]}}'")


def write_layout(config: RtkDeciConfig, layout: str, dtype: torch.dtype, out: Path, generation_config,
                 tensor: Callable[[str], torch.Tensor], shard_bytes: int = SHARD_BYTES) -> None:
    """Write the folder of `layout` for a model whose rtk config is `config`: config.json (+ modeling_rtk.py),
    generation_config.json and the weights. `tensor(name)` gives the weight rtk's class calls `name` (original
    layer numbering); it is asked for one tensor at a time, so the source may be a model in memory or the
    shards of a checkpoint on disk (rtk.export.streamed).

    standard: the base architecture with the removed layers gone and the rest renumbered; native: DeciLM /
    nemotron-nas; plugin / per-layer-config: the base architecture's config + per_layer_config skips, weights
    under their original names and layer numbers."""
    from transformers import GenerationConfig

    if layout == "standard":
        from transformers import AutoModelForCausalLM

        keep = [i for i, b in enumerate(config.block_configs) if not b.attention.no_op]
        cfg = standard_config(config, standard_base(config), len(keep), dtype)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg, dtype=dtype)

        def source_name(k: str) -> str:
            m = re.match(r"^model\.layers\.(\d+)\.(.*)$", k)
            return f"model.layers.{keep[int(m.group(1))]}.{m.group(2)}" if m else k
    else:
        with torch.device("meta"):
            skeleton = RtkDeciLMForCausalLM(RtkDeciConfig(**config.to_dict()))

        def source_name(k: str) -> str:
            return k
        if layout == "native":
            cfg = RtkDeciConfig(**config.to_dict())
            for stale in ("rtk_vllm_servable", "rtk_vllm_note"):  # marks of older rtk releases
                if hasattr(cfg, stale):
                    delattr(cfg, stale)
            cfg.architectures = ["DeciLMForCausalLM"]  # what vLLM dispatches on
            cfg.auto_map = {"AutoConfig": "modeling_rtk.RtkDeciConfig",
                            "AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
        else:
            base = per_layer_base(config)
            cfg = standard_config(config, base, config.num_hidden_layers, dtype, per_layer_skips(config))
            cfg.architectures = [PLUGIN_ARCH if layout == "plugin" else BASE_ARCHS[base].hf_class]
            cfg.auto_map = {"AutoModelForCausalLM": "modeling_rtk.RtkDeciLMForCausalLM"}
        shutil.copy(MODELING_FILE, out / "modeling_rtk.py")
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    (generation_config or GenerationConfig.from_model_config(cfg)).save_pretrained(out)
    tied = bool(cfg.tie_word_embeddings)
    specs = [(k, dtype if v.is_floating_point() else v.dtype, tuple(v.shape))
             for k, v in skeleton.state_dict().items() if not (tied and k == "lm_head.weight")]
    write_shards(out, specs, lambda k: tensor(source_name(k)).detach().to("cpu", dtype), shard_bytes)


def summary_of(config: RtkDeciConfig, layout: str, dtype: str, params: int, params_before: Optional[int],
               folder: Path, check) -> dict:
    """What an export wrote and how it verified (rtk export prints it; the model card is made from it)."""
    base = standard_base(config) if layout == "standard" else per_layer_base(config)
    architecture = {"native": "DeciLMForCausalLM", "plugin": PLUGIN_ARCH}.get(layout) or BASE_ARCHS[base].hf_class
    return {
        "layout": layout,
        "architecture": architecture,
        "base_model_type": getattr(config, "rtk_base_model_type", None),
        "dtype": dtype,
        "removed_sublayers": removed_sublayers(config),
        "params": params,
        "params_before": params_before,
        "weight_bytes": weight_bytes(folder),
        "vllm": vllm_line(layout, architecture),
        "vllm_plugin": layout in PER_LAYER,  # the server needs `pip install rtk` next to vLLM
        "vllm_flags": folder_flags(folder),  # read from the written config.json, as rtk deploy reads it
        "verification": check.lines(),
        "verification_inputs": check.shape,
    }


def finish(tmp: Path, out: Path, summary: dict, plan: Optional[dict], recipe_yaml: Optional[str],
           source: Optional[str]) -> None:
    """plan.json, recipe.yaml and the model card beside the weights; then the folder is moved into place."""
    if plan is not None:
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
    if recipe_yaml is not None:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "README.md").write_text(model_card(summary, plan, source, recipe_yaml))
    tmp.rename(out)


def generation_config_of(source: Optional[str]):
    """The source folder's generation config, kept in the export (None: one is made from the config)."""
    if source and (Path(source) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(source)
    return None


def _reload(out: Path, layout: str):
    """The written folder, loaded the way its users load it (fails on any missing/unexpected weight):
    standard and per_layer_config folders by AutoModelForCausalLM (the latter with the folder's own
    modeling_rtk.py, trust_remote_code), DeciLM folders by rtk's class."""
    from transformers import AutoModelForCausalLM

    cls, kw = (AutoModelForCausalLM, {}) if layout == "standard" else \
        (AutoModelForCausalLM, {"trust_remote_code": True}) if layout in PER_LAYER else (RtkDeciLMForCausalLM, {})
    try:
        m, info = cls.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True, **kw)
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
                 layout: Optional[str] = None) -> dict:
    """Write `model` (rtk class, any sublayers absent) as a verified safetensors folder at `out`.

    `original`: the model before pruning; it is run with the removed sublayers skipped and must give
    the same logits. `plan` / `recipe_yaml` are copied beside the weights and feed the model card;
    `source` is the folder the model came from (its generation_config.json is kept). `layout`:
    None picks standard / native / plugin (choose_layout); 'per-layer-config' asks for that one.
    Returns a summary (layout, architecture, how vLLM serves it, params, bytes, verification lines)."""
    out = Path(out)
    if out.exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    if dtype is None:
        dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
    if dtype not in DTYPES:
        raise RtkError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    removed = removed_sublayers(model.config)
    layout = choose_layout(model.config, layout)
    generation_config = generation_config_of(source)
    tmp = atomic_write_dir(out)
    try:
        sd = model.state_dict()
        write_layout(model.config, layout, tdtype, tmp, generation_config, sd.__getitem__)
        del sd
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = _reload(tmp, layout)
        check = verify(reloaded, model, tdtype, original, removed if original is not None else ())
        del reloaded
        check.raise_on_mismatch(f"-o {out}")
        before = plan.get("params_total") if plan and "params_total" in plan else \
            total_params(original) if original is not None else None
        summary = summary_of(model.config, layout, dtype, total_params(model), before, tmp, check)
        finish(tmp, out, summary, plan, recipe_yaml, source)
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
               layout: Optional[str] = None) -> dict:
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
                        recipe_yaml=recipe_yaml, source=path, layout=layout)


def export_per_layer_config(model_dir: str, out: Path, dtype: Optional[str] = None,
                            plan: Optional[Path] = None) -> dict:
    """`rtk export MODEL_DIR --format per-layer-config`: the standard architecture (LlamaForCausalLM,
    Qwen3ForCausalLM, ...) whose per_layer_config `skip` lists name the removed modules."""
    return export_dir(model_dir, out, dtype=dtype, plan=plan, layout="per-layer-config")


def _stored_dtype(path: str) -> str:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        got = data.get("dtype") or data.get("torch_dtype")
        if got in DTYPES:
            return got
    return "float32"
