"""`rtk export --format onnx`: one ONNX graph with a KV cache, validated against torch.

The graph (names as onnxruntime-genai reads them):

- inputs  `input_ids`, `attention_mask`, `position_ids` (int64; the mask spans past + new tokens),
  `past_key_values.{i}.key` / `.value` [batch, kv_heads, past, head_dim] for attention index
  i = 0..n_attn-1, i.e. only the layers that still have attention (`config.json` ->
  `rtk_onnx.attention_layers[i]` is the layer number);
- outputs `logits` [batch, seq, vocab] and `present.{i}.key` / `.value` [batch, kv_heads, past + seq, head_dim].

Prefill is a call with past length 0. Weights live in `model.onnx.data` beside the graph; a tied
embedding is stored once. The folder also holds the tokenizer, `genai_config.json`, and the source folder's
`plan.json` and `recipe.yaml` when it has them.
Every export is checked with ONNX Runtime against torch on shapes not used while exporting; a
mismatch is an error and nothing is left at the output path.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from rtk.errors import RtkError
from rtk.model.modeling_rtk import RtkDeciLMForCausalLM, TensorCache
from rtk.model.sublayer import removed_set
from rtk.plan import PLAN_FILE

GRAPH, DATA = "model.onnx", "model.onnx.data"
KEPT = (PLAN_FILE, "recipe.yaml")  # the source folder's records of how the model was made, copied as they are
ATOL = 1e-3  # max |onnx - torch| allowed for logits and presents (fp32)


def attention_layers(model: RtkDeciLMForCausalLM) -> list[int]:
    """The layers that keep their attention: the graph's KV inputs, in order (config.json's rtk_onnx list)."""
    return removed_set(model.config).attention_layers(model.config.num_hidden_layers)


def kv_shape(model: RtkDeciLMForCausalLM) -> tuple[int, int]:
    """(kv_heads, head_dim), the same for every attention layer (the graph's past inputs need one)."""
    heads = {layer.self_attn.num_kv_heads for layer in model.model.layers if layer.self_attn is not None}
    if len(heads) > 1:
        raise RtkError(f"model: attention layers have different numbers of KV heads {sorted(heads)}; "
                       "ONNX export supports one KV head count")
    return (heads.pop() if heads else model.config.num_key_value_heads), model.config.head_dim


def io_names(n_attn: int) -> tuple[list[str], list[str]]:
    kv = [(i, part) for i in range(n_attn) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{p}" for i, p in kv]
    return inputs, ["logits"] + [f"present.{i}.{p}" for i, p in kv]


class KVWrapper(nn.Module):
    """rtk's model as a function of flat tensors: (ids, mask, positions, past) -> (logits, *presents)."""

    def __init__(self, model: RtkDeciLMForCausalLM):
        super().__init__()
        self.model, self.lm_head = model.model, model.lm_head
        self.n_attn = len(attention_layers(model))

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        t = input_ids.shape[1]
        past_len = past[0].shape[2] if self.n_attn else attention_mask.shape[1] - t
        cache = TensorCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_attn)])
        h, cos, sin, mask = self.model.prepare(input_ids, None, attention_mask, position_ids, past_len)
        h = self.model.run_layers(h, cos, sin, mask, cache=cache)
        logits = self.lm_head(self.model.norm(h))
        return (logits, *[x for kv in cache.kv for x in kv])


def positions(mask: torch.Tensor, t: int) -> torch.Tensor:
    """Position ids of the last t tokens from a [B, P+T] 0/1 mask (left padding allowed)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]


def _keep_shared_transposes(node) -> Optional[bool]:
    """Don't fold Transpose(weight) when the weight has other uses (a tied embedding): folding
    would store it twice. ONNX Runtime folds it in memory when the session starts."""
    if node.op_type == "Transpose" and node.inputs and node.inputs[0] is not None:
        x = node.inputs[0]
        if x.is_initializer() and len(x.uses()) > 1:
            return False
    return None


def export_graph(model: RtkDeciLMForCausalLM, path: Path) -> None:
    """Write `path` (+ `path`.data) for the KV-cache graph of `model` (fp32, eval mode)."""
    from onnxscript.optimizer import optimize_ir
    from torch.export import Dim

    wrapper = KVWrapper(model).eval()
    kv_heads, head_dim = kv_shape(model)
    b, t, p = 2, 5, 3  # validation uses other shapes
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=gen)
    mask = torch.ones(b, p + t, dtype=torch.long)
    past = [torch.randn(b, kv_heads, p, head_dim, generator=gen) for _ in range(2 * wrapper.n_attn)]
    batch, seq = Dim("batch", min=1), Dim("sequence_length", min=1)
    past_seq, total = Dim("past_sequence_length", min=0), Dim("total_sequence_length", min=1)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_seq} for _ in past]}
    in_names, out_names = io_names(wrapper.n_attn)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (ids, mask, positions(mask, t), past), dynamic_shapes=shapes,
                                        input_names=in_names, output_names=out_names, dynamo=True,
                                        optimize=False, external_data=True, verbose=False)
            optimize_ir(program.model, should_fold=_keep_shared_transposes)
            program.save(str(path), external_data=True)
    except RtkError:
        raise
    except Exception as exc:  # torch.export / onnxscript raise many kinds
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise RtkError(f"onnx export failed ({type(exc).__name__}: {first})") from None
    finally:
        quiet.setLevel(level)


def _validation_steps(vocab: int, prompt_len: int = 11, pad: int = 4, decode_steps: int = 3):
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab, (2, prompt_len), generator=gen)
    mask = torch.ones(2, prompt_len, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask, decode_steps


@torch.no_grad()
def validate(folder: Path, model: RtkDeciLMForCausalLM, atol: float = ATOL, provider: Optional[str] = None) -> dict:
    """Run ONNX Runtime and torch side by side on fresh shapes (batch 2, prompt of 11 with 4 tokens
    of left padding in one row, then greedy decode steps) and return {output: max |diff|}.
    Raises RtkError naming the first output over `atol`, presents in layer order first (the earliest
    diverging layer names the culprit), then logits. Logits at padded positions are ignored."""
    from rtk.export.onnx_runtime import OrtLM

    lm = OrtLM(folder, provider=provider)
    wrapper = KVWrapper(model).eval()
    kv_heads, head_dim = kv_shape(model)
    ids, mask, steps = _validation_steps(model.config.vocab_size)
    past_t = [torch.zeros(2, kv_heads, 0, head_dim) for _ in range(2 * wrapper.n_attn)]
    past_o = [x.numpy() for x in past_t]
    _, out_names = io_names(wrapper.n_attn)
    worst = {name: 0.0 for name in out_names}
    for step in range(steps + 1):
        pos = positions(mask, ids.shape[1])
        ref = wrapper(ids, mask, pos, past_t)
        got = lm.run(ids.numpy(), mask.numpy(), pos.numpy(), past_o)
        live = mask[:, -ids.shape[1]:].bool()
        order = list(range(1, len(out_names))) + [0]
        for name, r, g in ((out_names[j], ref[j], got[j]) for j in order):
            diff = (r - torch.from_numpy(g)).abs()
            if name == "logits":
                diff = diff[live]
            d = float(diff.max()) if diff.numel() else 0.0
            worst[name] = max(worst[name], d)
            if not d <= atol:  # catches NaN too
                raise RtkError(f"onnx validation: output '{name}' differs from torch by {d:.3g} "
                               f"(tolerance {atol:g}) at {'prefill' if step == 0 else f'decode step {step}'}")
        past_t, past_o = list(ref[1:]), got[1:]
        ids = ref[0][:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    return worst


@torch.no_grad()
def torch_greedy(model: RtkDeciLMForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The torch reference for `OrtLM.greedy`: the same KV-cache loop on rtk's model."""
    wrapper = KVWrapper(model).eval()
    kv_heads, head_dim = kv_shape(model)
    ids = torch.tensor([prompt_ids])
    n, new = ids.shape[1], []
    past = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * wrapper.n_attn)]
    for _ in range(max_new_tokens):
        pos = torch.arange(n - ids.shape[1], n)[None]
        logits, *past = wrapper(ids, torch.ones(1, n, dtype=torch.long), pos, past)
        new.append(int(logits[0, -1].argmax()))
        ids, n = torch.tensor([[new[-1]]]), n + 1
    return new


GENAI_SEARCH = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")  # as onnxruntime-genai names them


def genai_config(model: RtkDeciLMForCausalLM, tokenizer=None, generation=None) -> Optional[dict]:
    """onnxruntime-genai's config for this folder (KV names by attention index), or None when the
    model has no attention layer left. `generation`: the source's GenerationConfig; its stop tokens (a chat
    model's end-of-turn) and the sampling defaults it sets are onnxruntime-genai's, as transformers' generate
    uses them."""
    cfg = model.config
    n_attn = len(attention_layers(model))
    if n_attn == 0:
        return None
    kv_heads, head_dim = kv_shape(model)
    given = generation.to_diff_dict() if generation is not None else {}
    eos = given.get("eos_token_id", cfg.eos_token_id)
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    pad = given.get("pad_token_id", cfg.pad_token_id)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    in_names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    out_names = {"logits": "logits", "present_key_names": "present.%d.key",
                 "present_value_names": "present.%d.value"}
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else 0,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GRAPH, "head_size": head_dim, "hidden_size": cfg.hidden_size,
                "inputs": in_names, "outputs": out_names,
                "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": n_attn,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else 0,
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   **{k: given[k] for k in GENAI_SEARCH if given.get(k) is not None}},
    }


def write_folder(model: RtkDeciLMForCausalLM, tokenizer, folder: Path, atol: float = ATOL,
                 echo: Callable[[str], None] = lambda s: None, generation=None) -> dict:
    """Export, describe and validate into an existing (temporary) folder; returns the report. `generation`: the
    source's GenerationConfig, kept as generation_config.json (None: one made from the config)."""
    t0 = time.perf_counter()
    export_graph(model, folder / GRAPH)
    export_s = time.perf_counter() - t0
    echo(f"rtk: exported the ONNX graph in {export_s:.1f}s; validating with ONNX Runtime")
    t1 = time.perf_counter()
    diffs = validate(folder, model, atol=atol)
    report = {"export_seconds": round(export_s, 2), "validate_seconds": round(time.perf_counter() - t1, 2),
              "attention_layers": attention_layers(model), "atol": atol, "max_abs_diff": diffs,
              "validation": "ONNX Runtime CPU vs torch fp32: batch 2, prompt 11 (4 left-padded), 3 decode steps"}
    config = model.config.to_dict()
    config["rtk_onnx"] = report
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    from transformers import GenerationConfig

    (generation or GenerationConfig.from_model_config(model.config)).save_pretrained(folder)
    gcfg = genai_config(model, tokenizer, generation)
    if gcfg is not None:
        (folder / "genai_config.json").write_text(json.dumps(gcfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return report


def export_onnx(model_dir: str, out_dir, atol: float = ATOL, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Export the model at `model_dir` (any model rtk loads) to `out_dir` and validate it.
    Nothing is left at `out_dir` unless the export validated."""
    from rtk.model.load import load_model
    from rtk.outdir import temp_dir_beside

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RtkError(f"out: {out} already exists and is not an empty folder")
    if not str(model_dir).startswith("embedded:") and not Path(model_dir).expanduser().exists():
        raise RtkError(f"model: {model_dir}: no such folder")
    from rtk.export.safetensors import generation_config_of

    model, tokenizer, path = load_model(str(model_dir), dtype="float32")
    tmp = temp_dir_beside(out)
    try:
        report = write_folder(model, tokenizer, tmp, atol=atol, echo=echo, generation=generation_config_of(path))
        for name in KEPT:
            if (Path(path) / name).is_file():
                shutil.copy2(Path(path) / name, tmp / name)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


__all__ = ["export_onnx", "export_graph", "validate", "torch_greedy", "KVWrapper", "io_names", "genai_config",
           "GRAPH", "DATA"]
