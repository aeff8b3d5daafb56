"""Safetensors export: a physically smaller checkpoint that transformers and vLLM load.

Four layouts (their table, with what loads and serves each, is rtk.export.layouts); `rtk export` picks the
first of the first three that fits, `--format per-layer-config` asks for the fourth:
- **standard**: only whole layers are gone (or nothing): the original architecture
  (Llama / Mistral / Qwen2 / Qwen3 / Gemma 3, from `rtk_base_model_type`) with fewer, renumbered layers; no
  remote code.
- **native**: some layer lacks only its attention or only its MLP, and stock vLLM's DeciLM serves it:
  DeciLM / nemotron-nas, one `block_configs` entry per layer, `modeling_rtk.py` beside the weights (`auto_map`).
- **plugin**: what DeciLM cannot express or stock vLLM cannot run (Qwen3's q/k norms; Gemma 3's norms after
  each sublayer; an MLP before any attention, e.g. `attn.0` removed): the base architecture's standard config
  with a `per_layer_config` whose `skip` lists name the removed modules, `architectures: ["RtkForCausalLM"]`
  (rtk's vLLM plugin, rtk.vllm_plugin) and `modeling_rtk.py` (`auto_map`) for transformers.
- **per-layer-config**: the same config with the standard `architectures` (`LlamaForCausalLM`, ...), for
  the day transformers' and vLLM's own modeling code reads `per_layer_config`; until then it loads
  through `modeling_rtk.py` (trust_remote_code) and rtk's plugin (`--hf-overrides`).

Every export is written into a temp folder next to the target, reloaded and verified (see verify.py),
and only then renamed into place.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from rtk.errors import RtkError
from rtk.model.load import DTYPES
from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM
from rtk.model.load import read_config
from rtk.model.params import total_params
from rtk.model.rewrite import MODELING_FILE
from rtk.model.sublayer import RemovedSet, removed_set
from rtk.outdir import temp_dir_beside
from rtk.export.layouts import LAYOUTS, layout_of, vllm_line
from rtk.plan import PLAN_FILE, read_plan, write_plan
from rtk.records.card import model_card
from rtk.export.configs import architecture_of, choose_layout, per_layer_base, standard_base, standard_config
from rtk.export.shards import SHARD_BYTES, write_shards
from rtk.export.verify import check_removed, reload_written, verify

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

    removed = removed_set(config)
    if layout == "standard":
        from transformers import AutoModelForCausalLM

        keep = removed.attention_layers(config.num_hidden_layers)  # only whole layers are gone
        cfg = standard_config(config, standard_base(config), keep, dtype)
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
        lay = LAYOUTS[layout]
        if lay.per_layer_config:
            base = per_layer_base(config)
            cfg = standard_config(config, base, list(range(config.num_hidden_layers)), dtype, removed.skip_lists())
        else:
            cfg = RtkDeciConfig(**config.to_dict())
            for stale in ("rtk_vllm_servable", "rtk_vllm_note"):  # marks of older rtk releases
                if hasattr(cfg, stale):
                    delattr(cfg, stale)
        cfg.architectures = [architecture_of(config, layout)]
        cfg.auto_map = dict(lay.auto_map)
    if LAYOUTS[layout].modeling_file:
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
    architecture = architecture_of(config, layout)
    return {
        "layout": layout,
        "architecture": architecture,
        "base_model_type": getattr(config, "rtk_base_model_type", None),
        "dtype": dtype,
        "removed_sublayers": removed_set(config).names,
        "params": params,
        "params_before": params_before,
        "weight_bytes": weight_bytes(folder),
        "vllm": vllm_line(layout, architecture),
        "vllm_plugin": LAYOUTS[layout].plugin,  # the server needs rtk installed next to vLLM
        "vllm_flags": list(LAYOUTS[layout_of(read_config(folder))].vllm_flags),  # as rtk deploy reads the folder
        "verification": check.lines(),
        "verification_inputs": check.shape,
    }


def finish(tmp: Path, out: Path, summary: dict, plan: Optional[dict], recipe_yaml: Optional[str],
           source: Optional[str]) -> None:
    """plan.json, recipe.yaml and the model card beside the weights; then the folder is moved into place."""
    if plan is not None:
        write_plan(tmp / PLAN_FILE, plan)
    if recipe_yaml is not None:
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "README.md").write_text(model_card(summary, plan, source, recipe_yaml))
    tmp.rename(out)


def generation_config_of(source: Optional[str]):
    """The source model's generation config (a chat model's stop tokens and sampling defaults), kept in the
    export: its folder's generation_config.json, or a hub id's from the hub cache. None where it has none (one
    is then made from the config)."""
    if not source:
        return None
    from transformers import GenerationConfig

    if Path(source).is_dir():
        return GenerationConfig.from_pretrained(source) if (Path(source) / "generation_config.json").is_file() \
            else None
    try:  # a hub id: the model was loaded from it, so the file, when the model has one, is in the cache
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return None


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
    removed = removed_set(model.config)
    layout = choose_layout(model.config, layout)
    generation_config = generation_config_of(source)
    tmp = temp_dir_beside(out)
    try:
        sd = model.state_dict()
        write_layout(model.config, layout, tdtype, tmp, generation_config, sd.__getitem__)
        del sd
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        check_removed(tmp, removed, layout)
        reloaded = reload_written(tmp, layout)
        check = verify(reloaded, model, tdtype, original, removed)
        del reloaded
        check.raise_on_mismatch(f"-o {out}")
        before = plan.get("params_total") if plan and "params_total" in plan else \
            total_params(original) if original is not None else None
        summary = summary_of(model.config, layout, dtype, total_params(model), before, tmp, check)
        finish(tmp, out, summary, plan, recipe_yaml, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def export_dir(model_dir: str, out: Path, dtype: Optional[str] = None, plan: Optional[Path] = None,
               layout: Optional[str] = None) -> dict:
    """`rtk export MODEL_DIR --format safetensors`: (re-)export any folder rtk loads, optionally applying
    a plan.json to it first. A plan.json inside MODEL_DIR must match the model; when it names the
    original model and that folder is here, the export is also checked against the original."""
    from rtk.model.load import load_model, resolve
    from rtk.model.rewrite import apply_plan

    if dtype is not None and dtype not in DTYPES:
        raise RtkError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if Path(out).exists():
        raise RtkError(f"-o {out}: already exists; choose a new folder (rtk never overwrites an export)")
    path = resolve(str(model_dir))
    if dtype is None:
        dtype = _stored_dtype(path)
    model, tokenizer, path = load_model(path, "float32")
    own_plan = Path(path) / PLAN_FILE
    plan_data, recipe_yaml, original = None, None, None
    if plan is not None:
        plan_data = read_plan(plan, f"--plan {plan}")
        names = plan_data["removed_sublayers"]
        n = total_params(model)
        if plan_data.get("params_total", n) != n:
            raise RtkError(f"--plan {plan}: was made for a model with {plan_data['params_total']:,} parameters; "
                           f"{model_dir} has {n:,}")
        original, model = model, apply_plan(model, names)
    elif own_plan.is_file():
        plan_data = read_plan(own_plan)
        want, have = RemovedSet.of(plan_data["removed_sublayers"]), removed_set(model.config)
        if want != have:
            raise RtkError(f"{own_plan}: removed_sublayers {want.names} do not match the model's config.json, "
                           f"which lacks {have.names}")
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
    data = read_config(path)
    got = data.get("dtype") or data.get("torch_dtype")
    return got if got in DTYPES else "float32"
