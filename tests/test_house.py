"""The house: imports run downward between stages, and each shared concept (sublayer names, plan.json, the layout
table, PPL, fingerprints, bench defaults) has one home that behaves as the code before it did."""
from __future__ import annotations

import ast
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_rtk

RTK = REPO / "toolchain" / "rtk"
# Each stage and the floor it stands on: a module may import its own floor or lower ones only.
FLOORS = {
    "errors": 0, "settings": 0, "outdir": 0, "paired": 0,
    "data": 1,
    "model": 2,
    "records": 3, "plan": 3, "vllm_plugin": 3,
    "export": 4,
    "serve": 5, "heal": 5,
    "prune": 6, "bench": 6, "quantize": 6,  # quantize serves and compares what it wrote, with bench's backends
    "ablate": 7,
    "cli": 8,
    "__main__": 9,  # python -m rtk (torchrun's -m rtk heal): the command line
}
RECORDS_MAY_IMPORT = {"records", "outdir", "errors"}  # documents import no stage


def room(module: str) -> str:
    """rtk.<room>... -> room ('rtk' itself for rtk/__init__)."""
    parts = module.removesuffix(".__init__").split(".")
    return parts[1] if len(parts) > 1 else "rtk"


def rtk_imports(path: Path, root: Path) -> set[str]:
    """Every rtk module a file imports, at module level or inside functions (relative imports resolved)."""
    mod = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "rtk" or name.startswith("rtk."):
                out.add(name)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rtk.")}
    return out


def violations(root: Path) -> list[str]:
    """Imports of a stage above the importer's floor, and imports of a stage by records/."""
    bad = []
    for f in root.rglob("*.py"):
        src = room(".".join(f.relative_to(root.parent).with_suffix("").parts))
        for target in rtk_imports(f, root):
            dst = room(target)
            if src == "rtk" or dst == "rtk":
                continue  # the package face, rtk.__version__
            if FLOORS[dst] > FLOORS[src] or (src == "records" and dst not in RECORDS_MAY_IMPORT):
                bad.append(f"{f.relative_to(root)} -> {target}")
    return bad


def test_every_stage_has_a_floor_and_imports_run_downward():
    stages = {p.stem if p.is_file() else p.name for p in RTK.iterdir()
              if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert stages == set(FLOORS), "a new room needs its floor in FLOORS"
    assert violations(RTK) == []
    assert not rtk_imports(RTK / "model" / "modeling_rtk.py", RTK)  # shipped beside weights: self-contained


def test_the_floor_rule_can_fail(tmp_path):
    root = tmp_path / "rtk"
    (root / "export").mkdir(parents=True)
    (root / "records").mkdir()
    (root / "export" / "x.py").write_text("def f():\n    from rtk.prune.run import run_prune\n")
    (root / "records" / "y.py").write_text("from ..model.load import read_config\n")
    assert sorted(violations(root)) == ["export/x.py -> rtk.prune.run", "records/y.py -> rtk.model.load"]


# ---- sublayer names ---------------------------------------------------------------------------------------------
def test_sublayer_names_parse_expand_and_own_their_weights():
    from rtk.errors import RtkError
    from rtk.model.sublayer import KINDS, Sublayer, expand, model_order, owner_prefixes, sublayer_name

    assert Sublayer.parse("attn.3") == Sublayer(3, "attn") and str(Sublayer(12, "mlp")) == "mlp.12"
    assert Sublayer.parse("layer.2").parts == ("attn.2", "mlp.2")
    assert expand(["layer.1", "mlp.4"]) == {"attn.1", "mlp.1", "mlp.4"}
    assert model_order(["mlp.10", "attn.2", "mlp.2", "attn.10"]) == ["attn.2", "mlp.2", "attn.10", "mlp.10"]
    llama, gemma = tiny_rtk("llama", layers=1).config, tiny_rtk("gemma3", layers=1).config
    assert owner_prefixes("attn.3", llama) == ("model.layers.3.self_attn.", "model.layers.3.input_layernorm.")
    assert owner_prefixes("mlp.3", gemma) == ("model.layers.3.mlp.", "model.layers.3.pre_feedforward_layernorm.",
                                              "model.layers.3.post_feedforward_layernorm.")
    for bad in ("attn3", "ffn.1", "attn.-1", "mlp.x"):
        with pytest.raises(RtkError, match="is not a sublayer name"):
            Sublayer.parse(bad, "search.protect")
    # every weight of the tiny model belongs to exactly one sublayer, or to the embedding / final norm / head
    for arch in ("qwen3", "gemma3"):
        model = tiny_rtk(arch, layers=3)
        names = [sublayer_name(k, i) for i in range(3) for k in KINDS]
        for key in model.state_dict():
            owners = [n for n in names if key.startswith(owner_prefixes(n, model.config))]
            assert len(owners) == (1 if key.startswith("model.layers.") else 0), key


def test_skip_lists_and_block_configs_are_one_codec():
    """removed set -> per_layer_config skips -> modeling_rtk's reader gives the same removed set back."""
    from types import SimpleNamespace

    from rtk.model.modeling_rtk import config_from_standard
    from rtk.model.rewrite import pruned_config
    from rtk.model.sublayer import removed_set

    model = tiny_rtk("llama", layers=4)
    cfg = pruned_config(model.config, ["attn.1", "mlp.1", "mlp.3", "attn.2"])
    assert removed_set(cfg).names == ["attn.1", "mlp.1", "attn.2", "mlp.3"]
    skips = removed_set(cfg).skip_lists()
    assert skips == {1: {"skip": ["attention", "mlp"]}, 2: {"skip": ["attention"]}, 3: {"skip": ["mlp"]}}
    std = SimpleNamespace(model_type="llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96, hidden_act="silu", max_position_embeddings=256,
                          rms_norm_eps=1e-6, vocab_size=128, is_heterogeneous=True,
                          per_layer_config={i: SimpleNamespace(**skips.get(i, {})) for i in range(4)})
    assert removed_set(config_from_standard(std)) == removed_set(cfg)


# ---- plan.json ------------------------------------------------------------------------------------------------
def test_plan_schema_checks_and_writes_whole_files(tmp_path):
    from rtk.errors import RtkError
    from rtk.plan import check_plan, read_plan, write_plan

    good = {"removed_sublayers": ["attn.1", "mlp.7"], "model": "m", "params_total": 10, "extra": {"kept": 1}}
    write_plan(tmp_path / "plan.json", good)
    assert read_plan(tmp_path / "plan.json") == good  # unknown keys survive
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left
    cases = [({"model": "m"}, "has no 'removed_sublayers' list"),
             ({"removed_sublayers": "attn.1"}, "has no 'removed_sublayers' list"),
             ({"removed_sublayers": ["attn.1", "ffn.2"]}, "'ffn.2' is not a sublayer name"),
             ({"removed_sublayers": [], "params_total": "many"}, "params_total: Input should be a valid integer"),
             ({"removed_sublayers": [], "removed": [{"name": "attn.1"}]}, "removed.0.layer: Field required"),
             ([1, 2], "not a plan written by rtk")]
    for data, msg in cases:
        with pytest.raises(RtkError, match=msg):
            check_plan(data, "p.json")
        with pytest.raises(RtkError, match="nothing"):  # an invalid plan is never written
            try:
                write_plan(tmp_path / "bad.json", data)
            except RtkError:
                assert not (tmp_path / "bad.json").exists()
                raise RtkError("nothing written")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RtkError, match="--plan x: cannot read it as JSON"):
        read_plan(tmp_path / "broken.json", "--plan x")


# ---- the layout table -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("removed,asked,layout", [([], None, "standard"), (["attn.1", "mlp.2"], None, "native"),
                                                  (["attn.0"], None, "plugin"),
                                                  (["attn.1"], "per-layer-config", "per-layer-config")])
def test_each_layout_reads_back_as_itself_with_its_row_of_flags(tmp_path, removed, asked, layout):
    """What export writes, serve reads: layout_of(config.json) names the layout written, and the folder's vLLM
    flags, its plugin need and how it reloads are that layout's row."""
    from rtk.export.layouts import LAYOUTS, layout_of
    from rtk.export.safetensors import export_model
    from rtk.model.load import read_config, transformers_remote_code
    from rtk.model.rewrite import apply_plan
    from rtk.serve.flags import folder_flags, needs_remote_code, plugin_args

    model = tiny_rtk("llama", layers=3)
    s = export_model(apply_plan(model, removed), None, tmp_path / "m", original=model, layout=asked)
    row = LAYOUTS[layout]
    assert s["layout"] == layout == layout_of(read_config(tmp_path / "m"))
    assert folder_flags(tmp_path / "m") == list(row.vllm_flags) == s["vllm_flags"]
    assert (plugin_args(tmp_path / "m") is not None) == row.plugin == s["vllm_plugin"]
    assert needs_remote_code(tmp_path / "m") == ("--trust-remote-code" in row.vllm_flags)
    assert (tmp_path / "m" / "modeling_rtk.py").is_file() == row.modeling_file
    assert transformers_remote_code(tmp_path / "m") == bool(row.auto_map)
    if row.architecture:
        assert read_config(tmp_path / "m")["architectures"] == [row.architecture]


def test_one_vllm_release():
    """One home per install path's release (rtk.settings; tests/test_install.py checks them against pyproject):
    the layouts name the CPU one the tests run, the deploy image is the GPU install's."""
    from rtk.export.layouts import VLLM_RELEASE, VLLM_VERSION
    from rtk.serve.deploy import PLUGIN_DOCKERFILE, VLLM_IMAGE
    from rtk.settings import VLLM_CPU_RELEASE, VLLM_CUDA_RELEASE

    assert VLLM_IMAGE == f"vllm/vllm-openai:v{VLLM_CUDA_RELEASE}"
    assert PLUGIN_DOCKERFILE.startswith(f"FROM {VLLM_IMAGE}\n")
    assert VLLM_RELEASE == VLLM_CPU_RELEASE and VLLM_RELEASE.startswith(VLLM_VERSION + ".")
    from conftest import installed_vllm

    dist, version = installed_vllm()  # the release this install runs: make install's, or make install GPU=1's
    assert version.startswith({"vllm-cpu": VLLM_CPU_RELEASE, "vllm": VLLM_CUDA_RELEASE}[dist])


# ---- perplexity -------------------------------------------------------------------------------------------------
def test_one_perplexity_everywhere():
    from rtk.bench.backends import ppl as backend_ppl
    from rtk.model.ppl import logprobs_ppl, model_ppl, ppl_of
    from rtk.prune.scoring import ModelScorer

    assert ppl_of(2.0, 2) == pytest.approx(math.e) and ppl_of(1e6, 1) == math.inf
    model = tiny_rtk("llama", layers=2)
    blocks = torch.randint(3, 128, (5, 17), generator=torch.Generator().manual_seed(0))
    # the same operations in the same order: bit for bit
    assert model_ppl(model, blocks, 2) == ModelScorer(model, blocks, 2, progress=False).ppl()

    class Broken:  # a backend whose log-probs overflow exp(): +inf, not an OverflowError (it was one before)
        def token_logprobs(self, seqs):
            return [[-1000.0] * (len(s) - 1) for s in seqs]

    assert backend_ppl(Broken(), blocks)["ppl"] == math.inf
    assert logprobs_ppl([[-1.0, -3.0]])["nll_per_token"] == 2.0


# ---- fingerprints and defaults ----------------------------------------------------------------------------------
def test_one_fingerprint_scheme():
    """sha256 of sorted JSON, 16 hex digits, as every fingerprint rtk wrote before (an OUT.partial/ from before the
    house still resumes; tests/test_search_speed.py holds the demo recipe's recorded value)."""
    from rtk.heal.config import HealConfig
    from rtk.outdir import fingerprint

    d = {"b": 1, "a": [2, {"c": None}]}
    assert fingerprint(d) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint({"a": [2, {"c": None}], "b": 1}) == fingerprint(d)
    h = HealConfig().model_dump(mode="json")
    for k in ("checkpoint_every", "cpu_offload"):  # how often it saves and where shards live change no result
        h.pop(k)
    for k in ("stream", "shuffle_blocks", "repeat"):  # an in-memory text's, left out: fingerprints from before them
        h["data"].pop(k)
    assert HealConfig().fingerprint() == hashlib.sha256(json.dumps(h, sort_keys=True).encode()).hexdigest()[:16]


def test_bench_cli_defaults_are_bench_config_defaults():
    from rtk.bench.config import csv, default
    from rtk.cli.bench import bench

    shown = {p.name: p.default for p in bench.params}
    for name in ("ppl_samples", "ppl_seq_len", "rounds", "prompt_len", "gen_len", "repeats", "num_prompts",
                 "input_len", "output_len", "sweep_seconds"):
        assert shown[name] == default(name), name
    assert shown["batch_sizes"] == csv(default("batch_sizes")) and shown["concurrency"] == csv(default("concurrency"))


def test_one_evaluation_default():
    """rtk prune's evaluation and rtk bench's PPL read the same text, cut the same way, unless told otherwise
    (tests/test_api.py: the same PPLs)."""
    from rtk.bench.config import bench_config
    from rtk.data import EVALUATION, DataConfig
    from rtk.prune.config import parse_recipe

    assert parse_recipe({"model": "m"}).data.evaluation == DataConfig().evaluation == EVALUATION
    assert bench_config(baseline="a", candidates=["b"]).evaluation() == EVALUATION
    assert (EVALUATION.source, EVALUATION.split, EVALUATION.samples, EVALUATION.seq_len) == ("wikitext2", "test", 32,
                                                                                             256)  # plan.json's eval
    assert bench_config(baseline="a", candidates=["b"], ppl_samples=4).evaluation().samples == 4
