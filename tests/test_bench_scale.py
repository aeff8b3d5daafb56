"""bench/scale scripts, exercised at tiny scale (the real runs need a GPU or a long quiet machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs a script with some packages made unimportable, as on a bare GPU machine.
RUNNER = """
import sys, importlib.abc
BLOCKED = set(sys.argv[1].split(','))
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'blocked: {name}')
        return None
sys.meta_path.insert(0, _Block())
sys.argv = sys.argv[2:]
import runpy
runpy.run_path(sys.argv[0], run_name='__main__')
"""
# torch and transformers (and their dependencies) only, not rtk's CLI stack
BARE = "click,pydantic,matplotlib,ray,peft,lm_eval,vllm"
# the lent H200's image (device tool's KINDS.md): it has peft, click and matplotlib, not pydantic
H200_IMAGE = "pydantic,ray,lm_eval,vllm"


def run_script(name: str, blocked: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "toolchain")}
    return subprocess.run([sys.executable, "-c", RUNNER, blocked, str(REPO / "bench" / "scale" / name), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_gpu_step_script_runs_with_torch_and_transformers_only(tmp_path):
    out = tmp_path / "step.json"
    r = run_script("gpu_step.py", BARE, "--tiny", "--device", "cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["candidates"] == 7 and res["step_pflop"] > 0
    assert set(res["engines"]) == {"layer-major", "per-candidate"}
    for row in res["engines"].values():
        assert row["seconds"] > 0 and row["max_rel_ppl_diff_vs_first_engine"] < 1e-5
    assert res["engines"]["layer-major"]["groups"] == 1


@pytest.mark.heal
def test_gpu_heal_script_runs_on_the_h200_image(tmp_path):
    out = tmp_path / "heal.json"
    r = run_script("gpu_heal.py", H200_IMAGE, "--tiny", "--device", "cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"full", "lora"} and res["timed_steps"] == 6
    assert res["student_params"] < res["teacher_params"] and 0.1 < res["params_removed"] < 0.3
    full, lora = res["methods"]["full"], res["methods"]["lora"]
    # full trains every weight but the (frozen) embeddings and LM head: 4 layers of a 64-wide model, minus one
    # attention and one MLP; LoRA trains only its adapters (rank 64 on the 7 projections that remain)
    assert 0 < full["trainable_params"] < res["student_params"] and lora["trainable_params"] > 0
    assert full["trainable_params"] != lora["trainable_params"]
    for row in (full, lora):
        assert row["tokens_per_s"] > 0 and row["seconds_per_step"] > 0 and row["model_tflops"] >= 0
        assert len(row["loss"]) == 6 and all(0 < x < 20 for x in row["loss"])
        assert row["gradient_checkpointing"] is False  # a tiny model fits: auto leaves it off


@pytest.mark.heal
def test_gpu_heal_script_runs_under_torchrun(tmp_path):
    """The same script on 2 processes (gloo on the CPU): FSDP2 heals; the losses are the one-process run's."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "toolchain"), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "bench" / "scale" / "gpu_heal.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = subprocess.run([sys.executable, script, "--tiny", "--device", "cpu", "-o", str(one)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
                        "--tiny", "--device", "cpu", "-o", str(two)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and len(b["peak_rss_gib_process"]) == 2
    for m in ("full", "lora"):
        row = b["methods"][m]
        assert len(row["per_process"]) == 2 and all(p["peak_rss_gib_training"] > 0 for p in row["per_process"])
        assert row["tokens_per_s"] > 0 and row["memory_estimate_gib"] >= 0
        assert len(row["loss"]) == 6 and all(0 < x < 20 for x in row["loss"])  # the warm-up step left out
        # the starting loss is the one-process run's (same random models and tokens, same first global batch)
        assert row["loss"][0] == pytest.approx(a["methods"][m]["loss"][0], rel=0.05)


def test_gpu_heal_settings_are_the_recipes(tmp_path):
    """The bench's plain settings (no pydantic on the GPU machine) stay equal to rtk's heal defaults and to the
    8B recipe's LoRA healing, and its 8B plan removes about 20% of the parameters."""
    import torch
    import yaml

    sys.path.insert(0, str(REPO / "bench" / "scale"))
    try:
        import gpu_heal
    finally:
        sys.path.remove(str(REPO / "bench" / "scale"))
    from rtk.model.modeling_rtk import RtkDeciConfig, RtkDeciLMForCausalLM
    from rtk.heal.config import HealConfig, LoraSpec
    from rtk.model.rewrite import pruned_config
    from rtk.model.params import total_params

    defaults = HealConfig()
    for k, v in gpu_heal.HEAL_DEFAULTS.items():
        assert getattr(defaults, k) == v, k
    assert gpu_heal.LORA_TARGETS == LoraSpec().targets
    heal = yaml.safe_load((REPO / "recipes" / "llama-8b-gpu.yaml").read_text())["heal"]
    lora = gpu_heal.heal_config("lora", 1, 4, 8)
    assert (lora.lr, lora.lora.rank, lora.lora.alpha) == (heal["lr"], heal["lora"]["rank"], heal["lora"]["alpha"])
    assert (heal["micro_batch"], heal["grad_accum"]) == (4, 8) and heal["method"] == "lora"

    c = RtkDeciConfig(**gpu_heal.LLAMA_8B, tie_word_embeddings=False)
    with torch.device("meta"):
        teacher = RtkDeciLMForCausalLM(c)
        student = RtkDeciLMForCausalLM(pruned_config(c, gpu_heal.REMOVED["Llama-3.1-8B"]))
    assert 8.0e9 < total_params(teacher) < 8.1e9
    assert 0.19 < 1 - total_params(student) / total_params(teacher) < 0.21
