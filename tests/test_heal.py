"""Healing (rtk.heal): distillation on tiny in-process models, and `rtk heal` / `rtk prune` with `heal:` as a
user runs them: outputs, resume, and every bad input -> one line, exit != 0, nothing written."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_rtk
from rtk.cli import main
from rtk.heal.adapters import enable_checkpointing, make_trainable
from rtk.heal.schedule import DataOrder, lr_factor
from rtk.heal.trainer import HealPaused, distill
from rtk.heal.config import HealConfig
from rtk.model.rewrite import apply_plan

PLAN = ["attn.1", "mlp.1", "mlp.2", "attn.3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread (two threads spin against each other on a shared 2-core machine: 50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def teacher_student(seed: int = 0):
    """A tiny teacher with peaked next-token distributions and a pruned student that owns its weights."""
    teacher = tiny_rtk(layers=4, seed=seed)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6)
    return teacher, copy.deepcopy(apply_plan(teacher, PLAN))


def tiny_blocks(n: int = 16, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(0))


def cfg(**kw) -> HealConfig:
    # KL only, embeddings trained: the mechanics under test, independent of the shipped defaults
    base = dict(tokens=16 * 16 * 4, micro_batch=4, lr=1e-3, warmup=0.1, checkpoint_every=2,
                kl_weight=1.0, ce_weight=0.0, hidden_weight=0.0, train_embeddings=True,
                data={"source": "unused.txt", "samples": 16, "seq_len": 16})
    if kw.get("method") == "lora":
        base["lr"] = 1e-2
        del base["train_embeddings"]
    return HealConfig(**{**base, **kw})


@pytest.mark.heal
@pytest.mark.parametrize("method", ["full", "lora"])
def test_distillation_loss_falls(method):
    teacher, student = teacher_student()
    healed, rec = distill(student, teacher, tiny_blocks(), cfg(method=method, tokens=16 * 16 * 6), None, "fp",
                          progress=False)
    losses = [s["loss"] for s in rec["history"]["steps"]]
    assert rec["steps"] == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses
    # same shapes as the student: nothing added, nothing trainable left
    assert {k: v.shape for k, v in healed.state_dict().items()} == \
        {k: v.shape for k, v in apply_plan(teacher, PLAN).state_dict().items()}
    assert not any(p.requires_grad for p in healed.parameters())


def reference_loss(s_logits, t_logits, ids, kl_w, ce_w, temp):
    """The loss written the plain way (autograd through full float32 logits)."""
    v = s_logits.shape[-1]
    log_ps = torch.log_softmax(s_logits.float() / temp, -1).reshape(-1, v)
    log_pt = torch.log_softmax(t_logits.float() / temp, -1).reshape(-1, v)
    kl = torch.nn.functional.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temp ** 2
    ce = torch.nn.functional.cross_entropy(s_logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))
    return kl_w * kl + ce_w * ce, kl, ce


@pytest.mark.parametrize("kl_w,ce_w,temp", [(1.0, 0.0, 1.0), (0.7, 0.3, 2.0), (0.0, 1.0, 1.0)])
def test_fused_chunked_loss_equals_the_plain_loss_and_gradients(monkeypatch, kl_w, ce_w, temp):
    import rtk.heal.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 128 * 5)  # 5 tokens per chunk: chunk edges are exercised
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    w = (torch.randn(128, 16, generator=g) * 0.5).requires_grad_()
    th, tw = torch.randn(2, 7, 12, generator=g), torch.randn(128, 12, generator=g)
    ids = torch.randint(0, 128, (2, 7), generator=g)
    got, kl, ce = loss_mod.distill_loss(h, w, th, tw, ids, kl_w, ce_w, temp)
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want, kl_ref, ce_ref = reference_loss(h @ w.T, th @ tw.T, ids, kl_w, ce_w, temp)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    if kl_w:
        assert kl == pytest.approx(kl_ref.item(), rel=1e-5)
    if ce_w:
        assert ce == pytest.approx(ce_ref.item(), rel=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


@pytest.mark.heal
def test_ce_term_and_frozen_embeddings():
    teacher, student = teacher_student()
    emb = student.model.embed_tokens.weight.clone()
    healed, rec = distill(student, teacher, tiny_blocks(), cfg(ce_weight=0.5, kl_weight=0.5, train_embeddings=False),
                          None, "fp", progress=False)
    s0 = rec["history"]["steps"][0]
    assert s0["ce"] > 0 and s0["loss"] == pytest.approx(0.5 * s0["kl"] + 0.5 * s0["ce"], rel=1e-6)
    _, rec2 = distill(copy.deepcopy(student), teacher, tiny_blocks(), cfg(tokens=256, max_grad_norm=None), None,
                      "fp", progress=False)
    assert rec2["history"]["steps"][0]["ce"] is None and rec2["history"]["steps"][0]["grad_norm"] is None
    assert torch.equal(healed.model.embed_tokens.weight, emb)
    assert rec["trainable_params"] < sum(p.numel() for p in healed.parameters())


def plain_kl(teacher, student, ids) -> float:
    """KL(teacher || student) per token, from the models' own logits (no fused loss involved)."""
    with torch.no_grad():
        lt = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
        ls = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


@pytest.mark.parametrize("arch,tie,train_embeddings", [("llama", True, False), ("llama", False, False),
                                                        ("qwen2", True, False), ("qwen2", False, False),
                                                        ("qwen2", False, True), ("gemma3", True, False)])
@pytest.mark.heal
def test_noisy_student_comes_back_to_its_teacher(tmp_path, arch, tie, train_embeddings):
    """Issue 24: the loop must pull a student that is its teacher plus noise back toward it, for tied and untied
    heads, with and without q/k/v biases, and the exported folder, reloaded by plain transformers, must be that
    healed student: KL(teacher || student) on held-out tokens, plain transformers on both sides."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_hf
    from rtk.export.safetensors import export_model
    from rtk.model.load import from_hf

    teacher = tiny_hf(arch, layers=4, tie=tie, seed=0)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6)  # peaked next-token distributions
    noisy = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights and biases: 30% of their own spread; embeddings and head only if they train
        for n, p in noisy.named_parameters():
            if (p.dim() == 2 and (train_embeddings or not n.startswith(("model.embed_tokens.", "lm_head."))))\
                    or n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    held = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(99))
    before, head = plain_kl(teacher, noisy, held), noisy.lm_head.weight.clone()
    # lr 3e-4: Adam moves every weight by ~lr per step whatever its size, and these weights are N(0, 0.02):
    # at 1e-3 (5% of a weight per step) the random tiny Llama's KL rises instead (issue 24: no defect, the step)
    c = cfg(tokens=32 * 4 * 32, lr=3e-4, train_embeddings=train_embeddings,
            data={"source": "unused.txt", "samples": 64, "seq_len": 32})
    healed, rec = distill(from_hf(noisy), from_hf(teacher), tiny_blocks(64, 32), c, None, "fp", progress=False)
    export_model(healed, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    after = plain_kl(teacher, reloaded, held)
    assert after < 0.75 * before, (before, after)
    assert after == pytest.approx(plain_kl(from_hf(teacher), healed, held), rel=1e-4)  # the folder is what trained
    if tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    else:  # untied: the head written is the head trained (or kept) in memory, not the embeddings
        assert torch.equal(reloaded.lm_head.weight, healed.lm_head.weight)
        assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
        assert torch.equal(healed.lm_head.weight, head) != train_embeddings


@pytest.mark.heal
def test_intermediate_state_loss():
    """hidden_weight: each layer's residual stream matched to the teacher's; by hand, and it teaches."""
    from rtk.heal.loss import LayerOutputs, hidden_loss

    teacher, student = teacher_student()
    ids = tiny_blocks(2, 16)
    rec_t, rec_s = LayerOutputs(teacher), LayerOutputs(student)
    with torch.no_grad():
        teacher.model(input_ids=ids)  # not recording: nothing kept
        assert rec_t.take() == []
        rec_t.start(), rec_s.start()
        teacher.model(input_ids=ids), student.model(input_ids=ids)
    ts, ss = rec_t.take(), rec_s.take()
    rec_t.remove(), rec_s.remove()
    assert len(ts) == len(ss) == 4 and ts[0].shape == (2, 16, teacher.config.hidden_size)
    by_hand = sum((((s_ - t_) ** 2).sum(-1) / (t_ ** 2).sum(-1)).mean() for s_, t_ in zip(ss, ts)) / 4
    assert float(hidden_loss(ss, ts)) == pytest.approx(float(by_hand), rel=1e-6) and float(by_hand) > 0
    assert float(hidden_loss(ts, ts)) == 0.0
    assert float(hidden_loss(ss, ts)) > 0
    with pytest.raises(Exception, match="intermediate states need the same layer count"):
        hidden_loss(ss[:3], ts)
    # hidden loss alone (no logits) lowers itself; with KL it is added to the loss
    healed, rec = distill(copy.deepcopy(student), teacher, tiny_blocks(), cfg(kl_weight=0, hidden_weight=1.0,
                          tokens=16 * 16 * 6), None, "fp", progress=False)
    h = [s_["hidden"] for s_ in rec["history"]["steps"]]
    assert sum(h[-4:]) < 0.6 * sum(h[:4]), h
    _, rec = distill(copy.deepcopy(student), teacher, tiny_blocks(), cfg(hidden_weight=0.5, tokens=256), None,
                     "fp", progress=False)
    s0 = rec["history"]["steps"][0]
    assert s0["loss"] == pytest.approx(s0["kl"] + 0.5 * s0["hidden"], rel=1e-5)
    assert not any(m._forward_hooks for m in healed.model.layers)  # hooks removed at the end


def test_merged_lora_equals_unmerged_adapter():
    teacher, student = teacher_student()
    c = cfg(method="lora", lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]})
    tr = make_trainable(student, c)
    with torch.no_grad():  # an adapter that changes the output (B starts at 0)
        for n, p in tr.params.items():
            p.normal_(std=0.2)
    ids = tiny_blocks(3, 11)
    tr.forward.eval()
    with torch.no_grad():
        unmerged = tr.forward(input_ids=ids, use_cache=False).logits
        plain = apply_plan(teacher, PLAN)(input_ids=ids, use_cache=False).logits
    merged = tr.finish()
    assert "lora" not in " ".join(merged.state_dict())
    with torch.no_grad():
        got = merged(input_ids=ids, use_cache=False).logits
    assert (unmerged - plain).abs().max() > 1e-2  # the adapter matters
    assert torch.allclose(got, unmerged, atol=1e-5, rtol=1e-5), (got - unmerged).abs().max()


@pytest.mark.heal
@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_equals_uninterrupted(tmp_path, method):
    extra = {"lora": {"rank": 4, "dropout": 0.1}} if method == "lora" else {}
    c = cfg(method=method, grad_accum=2, micro_batch=2, tokens=16 * 16 * 4, checkpoint_every=3, **extra)
    teacher, student = teacher_student()
    ref, rec_ref = distill(copy.deepcopy(student), teacher, tiny_blocks(), c, None, "fp", progress=False)
    state = tmp_path / "state"
    with pytest.raises(HealPaused):
        distill(copy.deepcopy(student), teacher, tiny_blocks(), c, state, "fp", progress=False, max_steps=4)
    torch.manual_seed(1234)  # a resumed process starts from other RNG state: the checkpoint restores it
    logs = []
    got, rec = distill(copy.deepcopy(student), teacher, tiny_blocks(), c, state, "fp", progress=False,
                       echo=logs.append)
    assert any("resuming" in line and "at step 4 of 16" in line for line in logs)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [s["loss"] for s in rec["history"]["steps"]] == [s["loss"] for s in rec_ref["history"]["steps"]]
    with pytest.raises(Exception, match="holds an unfinished healing with other settings"):
        distill(copy.deepcopy(student), teacher, tiny_blocks(), c, state, "other", progress=False)


@pytest.mark.heal
def test_gradient_checkpointing_gives_the_same_gradients():
    teacher, student = teacher_student()
    ids = tiny_blocks(2, 16)
    grads = []
    for ck in (False, True):
        s = copy.deepcopy(student).train()
        if ck:
            enable_checkpointing(s)
        s(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    _, rec = distill(copy.deepcopy(student), teacher, tiny_blocks(), cfg(tokens=256, gradient_checkpointing="on"),
                     None, "fp", progress=False)
    assert rec["gradient_checkpointing"] is True


def test_schedule_and_data_order():
    f = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0 and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1)
    o = DataOrder(10, seed=3)
    first, second = o.indices(0, 10), o.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert DataOrder(10, seed=3).indices(7, 6) == (first + second)[7:13]


def test_heal_config_validation():
    from rtk.prune.config import parse_recipe
    from rtk.errors import RtkError

    def err(heal):
        with pytest.raises(RtkError) as e:
            parse_recipe({"model": "x", "heal": heal})
        return e.value.message

    assert err({"tokens": 0}) == "recipe: heal.tokens: Input should be greater than 0"
    assert "heal.data and data.evaluation use the same text (wikitext2 [test])" in \
        err({"data": {"source": "wikitext2", "split": "test"}})
    assert err({"lora": {"rank": 4}}).endswith("heal: lora: applies to method: lora")
    assert err({"kl_weight": 0, "ce_weight": 0}).endswith("kl_weight, ce_weight and hidden_weight are all 0: nothing to learn from")
    assert err({"methd": "full"}) == "recipe: heal.methd: unknown key"
    assert err({"method": "lora", "lora": {"targets": ["qkv"]}}).startswith("recipe: heal.lora.targets: qkv: not a")
    r = parse_recipe({"model": "x", "heal": {}})
    assert r.fingerprint() == parse_recipe({"model": "x"}).fingerprint()  # healing does not change the plan


# ---- the commands ------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def heal_keys(heal_text: Path, **over) -> dict:
    return {"data": {"source": str(heal_text), "seq_len": 32}, "tokens": 6 * 2 * 32, "micro_batch": 2,
            "lr": 1e-3, "checkpoint_every": 2, "eval_every": 3, **over}


def tensors(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.heal
def test_rtk_heal_writes_a_smaller_verified_servable_folder(tmp_path, pruned_out, heal_text):
    conf = write_yaml(tmp_path / "heal.yaml", heal_keys(heal_text))
    out = tmp_path / "healed"
    res = run("heal", pruned_out, "-o", out, "--config", conf, "--quiet")
    assert res.exit_code == 0, res.output
    assert "evaluation PPL" in res.output and "healed" in res.output
    for f in ("plan.json", "report.md", "loss_curve.png", "model/config.json", "model/model.safetensors",
              "model/modeling_rtk.py", "model/README.md", "model/plan.json"):
        assert (out / f).is_file(), f
    assert not (tmp_path / "healed.partial").exists() and not (out / "heal").exists()
    plan = json.loads((out / "plan.json").read_text())
    h = plan["heal"]
    assert h["method"] == "full" and h["tokens"] == 6 * 2 * 32 and h["steps"] == 6
    assert h["data"]["file"] == str(heal_text) and h["blocks"] == 12
    assert len(h["history"]["steps"]) == 6 and [e["step"] for e in h["history"]["evals"]] == [3, 6]
    assert h["eval"]["ppl_after"] == pytest.approx(h["history"]["evals"][-1]["ppl"], rel=1e-5)
    assert h["eval"]["split"] == "test" and h["teacher"]["path"] == plan["model_path"]
    # PPLs rtk prune measured on the same blocks are reused, not measured again
    assert h["eval"]["ppl_before"] == plan["eval"]["ppl_final"] and h["teacher"]["ppl"] == plan["eval"]["ppl_base"]
    # same shapes and format as the pruned folder, different weights
    before, after = tensors(pruned_out / "model"), tensors(out / "model")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    cfg_json = json.loads((out / "model" / "config.json").read_text())
    assert cfg_json["architectures"] == ["DeciLMForCausalLM"] and "rtk_vllm_servable" not in cfg_json
    assert cfg_json["block_configs"] == json.loads((pruned_out / "model" / "config.json").read_text())["block_configs"]
    assert h["export"]["verification"] and "vs the in-memory pruned model" in h["export"]["verification"][0]
    # it reloads to the PPL recorded (the export verified its logits against the in-memory healed model)
    from rtk.data import token_blocks
    from rtk.model.load import load_model
    from rtk.data import DataSpec
    from rtk.prune.scoring import ModelScorer

    m, tok, _ = load_model(str(out / "model"))
    evalb, _ = token_blocks(tok, DataSpec(source="wikitext2", split="test", samples=3, seq_len=32), "e")
    assert ModelScorer(m, evalb, 4, progress=False).ppl() == pytest.approx(h["eval"]["ppl_after"], rel=1e-4)
    # each evaluation block's NLL, from the same pass as the PPL: what paired intervals between healings resample
    nll = h["eval"]["block_nll"]
    assert len(nll) == 3 and math.exp(sum(nll) / (3 * 31)) == pytest.approx(h["eval"]["ppl_after"], rel=1e-6)
    card = (out / "model" / "README.md").read_text()
    assert "## Healing" in card and "Evaluation PPL" in card
    # the card is published with the model: the teacher by the name plan.json gives, not this machine's path
    assert h["teacher"]["model"] == plan["model"] and plan["model_path"] not in card
    assert "## Healing" in (out / "report.md").read_text()
    # the same command again: nothing to do; re-exporting the healed folder works (no check against the original)
    res = run("heal", pruned_out, "-o", out, "--config", conf, "--quiet")
    assert res.exit_code == 0 and "already holds this healing" in res.output
    res = run("export", out / "model", "-o", tmp_path / "re")
    assert res.exit_code == 0, res.output


@pytest.mark.heal
def test_rtk_heal_lora_and_resume_through_the_cli(tmp_path, pruned_out, heal_text):
    conf = write_yaml(tmp_path / "heal.yaml", heal_keys(heal_text, method="lora", lr=1e-2, eval_every=0,
                                                      lora={"rank": 2, "dropout": 0.1}))
    full, part = tmp_path / "full", tmp_path / "part"
    assert run("heal", pruned_out, "-o", full, "--config", conf, "--quiet").exit_code == 0
    res = run("heal", pruned_out, "-o", part, "--config", conf, "--quiet", "--max-steps", "3")
    assert res.exit_code == 0 and "paused after 3 step(s) at step 3 of 6" in res.output, res.output
    assert not part.exists() and (tmp_path / "part.partial" / "heal" / "checkpoint" / "meta.pt").is_file()
    res = run("heal", pruned_out, "-o", part, "--config", conf, "--quiet")
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    a, b = tensors(full / "model"), tensors(part / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "plan.json").read_text())["heal"]["method"] == "lora"
    # other settings into a used folder are refused
    res = run("heal", pruned_out, "-o", part, "--config", conf, "--quiet", "--tokens", "64")
    assert res.exit_code == 1 and "holds a healing of another model or other heal settings" in res.output


def _bad(tmp_path, *args) -> str:
    out = tmp_path / "bad-out"
    res = run("heal", *args, "-o", out, "--quiet")
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert not out.exists() and not (tmp_path / "bad-out.partial").exists()
    msg = res.output.strip()
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_inputs_one_line_nothing_written(tmp_path, pruned_out, heal_text, tiny_folder, smollm2_dir):
    # the heal text is the evaluation split
    conf = write_yaml(tmp_path / "c1.yaml", {"heal": {"data": {"source": "wikitext2", "split": "test"}}})
    assert _bad(tmp_path, pruned_out, "--config", conf) == \
        "Error: heal.data: is the evaluation text (wikitext2 [test]); heal on other text than the evaluation PPL is measured on"
    # a budget of 0
    assert _bad(tmp_path, pruned_out, "--tokens", "0") == "Error: heal: tokens: Input should be greater than 0"
    # a teacher with another vocabulary
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / f, other / f)
    assert _bad(tmp_path, pruned_out, "--teacher", other) == \
        f"Error: --teacher {other}: vocabulary of 1,000 tokens, the student's 49,152; distillation needs the same tokenizer"
    # a teacher with the same vocabulary size but another tokenizer (two token ids swapped)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_folder, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    v["the"], v["and"] = v["and"], v["the"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    msg = _bad(tmp_path, pruned_out, "--teacher", swapped)
    assert msg.startswith(f"Error: --teacher {swapped}: its tokenizer differs from the student's (4 token/id pairs")
    # a folder without plan.json and without --teacher
    bare = tmp_path / "bare"
    shutil.copytree(pruned_out / "model", bare)
    (bare / "plan.json").unlink()
    assert _bad(tmp_path, bare) == \
        f"Error: PRUNED_DIR: {bare} has no plan.json naming the original model; give --teacher MODEL"
    assert _bad(tmp_path, tmp_path / "nope") == f"Error: PRUNED_DIR: {tmp_path / 'nope'}: no such folder"
    bad_yaml = write_yaml(tmp_path / "c2.yaml", {"tokens": 10, "metod": "full"})
    assert _bad(tmp_path, pruned_out, "--config", bad_yaml) == f"Error: {bad_yaml}: heal: metod: unknown key"


@pytest.mark.heal
def test_prune_with_heal_section(tmp_path, tiny_folder, heal_text):
    r = {"model": str(tiny_folder), "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 3, "seq_len": 32}},
         "search": {"target": {"sublayers": 3}}, "heal": heal_keys(heal_text, eval_every=0)}
    out = tmp_path / "out"
    res = run("prune", write_yaml(tmp_path / "r.yaml", r), "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "healed (full, 384 tokens" in res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["heal"]["eval"]["ppl_before"] == plan["eval"]["ppl_final"]
    assert plan["heal"]["teacher"]["ppl"] == plan["eval"]["ppl_base"]
    assert (out / "loss_curve.png").is_file() and "## Healing" in (out / "report.md").read_text()
    assert "## Healing" in (out / "model" / "README.md").read_text() and not (out / "heal").exists()
    # the same recipe with other healing into the finished folder is refused; without healing too
    r["heal"]["tokens"] = 128
    res = run("prune", write_yaml(tmp_path / "r2.yaml", r), "-o", out, "--quiet")
    assert res.exit_code == 1 and "holds this recipe's plan healed differently" in res.output
    # heal text = evaluation text is refused before any work
    r["heal"]["data"] = {"source": "wikitext2", "split": "test"}
    res = run("prune", write_yaml(tmp_path / "r3.yaml", r), "-o", tmp_path / "o3", "--quiet")
    assert res.exit_code == 1 and "heal.data and data.evaluation use the same text" in res.output
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o3.partial").exists()


def test_ablate_heal_takes_the_recipes_heal_section_and_heal_tokens_over_its_tokens(tmp_path, tiny_folder, heal_text,
                                                                                       monkeypatch):
    """--heal heals with the recipe's heal: section (its tokens and lr), --heal-tokens replacing only the tokens.
    Before, the recipe's tokens were dropped for rtk heal's default 61,440 when --heal-tokens was not given."""
    import rtk.ablate.run as ablate_run

    got = []
    monkeypatch.setattr(ablate_run, "run_ablation", lambda *a, heal=None, **kw: got.append(heal) or
                        {"rows": [], "variants": {}})
    r = {"model": str(tiny_folder), "heal": heal_keys(heal_text, tokens=384, lr=2e-4)}
    rec = write_yaml(tmp_path / "abl.yaml", r)
    for extra, tokens in (([], 384), (["--heal-tokens", "128"], 128)):
        res = run("ablate", rec, "-o", tmp_path / "abl", "--variants", "params-oneshot", "--quiet", "--heal", *extra)
        assert res.exit_code == 0, res.output
        assert (got[-1].tokens, got[-1].lr, got[-1].micro_batch) == (tokens, 2e-4, 2)


@pytest.mark.heal
def test_ablate_heal_heals_every_model_once_with_one_budget(tmp_path, tiny_folder, heal_text, monkeypatch):
    import rtk.heal.run as heal_run

    r = {"model": str(tiny_folder), "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 32},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 3, "seq_len": 32}},
         "heal": heal_keys(heal_text, eval_every=0), "cost": {"batch": 4, "context": 256}}
    rec, out = write_yaml(tmp_path / "abl.yaml", r), tmp_path / "abl"
    args = ["ablate", rec, "-o", out, "--targets", "0.01,0.03", "--variants", "params-oneshot,blocks-bi", "--quiet",
            "--heal", "--heal-tokens", "128"]
    real, calls = heal_run.heal_model, []

    def crash_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(heal_run, "heal_model", crash_on_second)
    res = run(*args)
    assert isinstance(res.exception, RuntimeError) and not out.exists(), res.output
    saved = json.loads((tmp_path / "abl.partial" / "state" / "heal.json").read_text())
    assert len(saved["models"]) == 1
    res = run(*args)
    assert res.exit_code == 0, res.output
    abl = json.loads((out / "ablation.json").read_text())
    dirs = {r["model_dir"] for r in abl["rows"]}
    assert len(calls) == 2 + len(dirs) - 1  # each distinct model healed once in all
    for row in abl["rows"]:
        h = row["healed"]
        assert h["tokens"] == 128 and h["eval_ppl_before"] == row["eval_ppl"]
        folder = out / h["model_dir"]
        assert json.loads((folder / "config.json").read_text()) == \
            json.loads((out / row["model_dir"] / "config.json").read_text())  # same shapes, same format
        assert "## Healing" in (folder / "README.md").read_text()
    md = (out / "ablation.md").read_text()
    assert "PPL after healing" in md and "## After healing (rtk ablate --heal)" in md and "Kendall's tau" in md
    assert (out / "ppl_after_healing.png").stat().st_size > 0
    assert set(abl["winners"]["healed_ranking"]) == {"0.01", "0.03"}
    assert not list((out / "state").glob("heal-*"))  # checkpoints gone once a model is healed
    # a complete OUT: nothing to heal again; other heal settings are refused
    res = run(*args)
    assert res.exit_code == 0 and len(calls) == 2 + len(dirs) - 1
    res = run(*args[:-1], "256")
    assert res.exit_code == 1 and "holds healings made with other settings" in res.output
    res = run(*args[:-2], "--heal-tokens", "0")
    assert res.exit_code == 1 and res.output.strip() == "Error: heal: tokens: Input should be greater than 0"
