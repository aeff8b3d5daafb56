"""Gemma 3 end to end: BOS before every token block where the tokenizer adds it (and exactly the blocks of
before where it does not), a Gemma checkpoint without BOS refused, and the real 270M through rtk's class."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from conftest import tiny_hf
from rtk.data import DataSpec, adds_bos, read_text, token_blocks, token_spans
from rtk.errors import RtkError


def _old_blocks(tok, spec: DataSpec) -> torch.Tensor:
    """The blocks rtk cut before BOS was known: seq_len text tokens, evenly spaced over the text."""
    ids = tok(read_text(spec, "x")[0], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    grid = [k * spec.seq_len for k in range(ids.numel() // spec.seq_len)]
    starts = [grid[i] for i in torch.linspace(0, len(grid) - 1, spec.samples).round().long().tolist()]
    return torch.stack([ids[s: s + spec.seq_len] for s in starts])


def test_blocks_start_with_bos_only_where_the_tokenizer_adds_it(smollm2_dir, data_dir):
    from transformers import AutoTokenizer

    spec = DataSpec(source="wikitext2", split="test", samples=5, seq_len=64)
    plain = AutoTokenizer.from_pretrained(smollm2_dir)
    assert not adds_bos(plain)  # SmolLM2's tokenizer adds no BOS: its blocks are exactly those of before
    blocks, info = token_blocks(plain, spec, "e")
    assert torch.equal(blocks, _old_blocks(plain, spec)) and "bos" not in info
    # the same tokenizer told to add BOS (as Gemma's config says): BOS + the first 63 tokens of the same blocks
    bos = copy.deepcopy(plain)
    bos.add_bos_token = True
    assert adds_bos(bos)
    got, info = token_blocks(bos, spec, "e")
    assert got.shape == (5, 64) and (got[:, 0] == bos.bos_token_id).all() and info["bos"]
    assert torch.equal(got[:, 1:], blocks[:, :63])
    ids = plain(read_text(spec, "x")[0], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    spans = token_spans(bos, spec, "e")
    assert all(b - a == 63 for a, b in spans) and torch.equal(got[:, 1:], torch.stack([ids[a:b] for a, b in spans]))
    # held-out spans are avoided
    again, _ = token_blocks(bos, DataSpec(source="wikitext2", split="test", samples=3, seq_len=64), "e", spans)
    assert not {tuple(r.tolist()) for r in again[:, 1:]} & {tuple(r.tolist()) for r in got[:, 1:]}


def test_gemma_checkpoint_whose_tokenizer_adds_no_bos_is_one_line(tmp_path, smollm2_dir):
    from rtk.model.load import load_model

    hf = tiny_hf("gemma3")
    hf.save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer that adds no BOS
        shutil.copy(smollm2_dir / f, tmp_path / "m" / f)
    with pytest.raises(RtkError) as e:
        load_model(str(tmp_path / "m"))
    assert str(e.value) == (f"model: {tmp_path / 'm'}: Gemma needs BOS at the start of every sequence, but its "
                            "tokenizer adds none (tokenizer_config.json / tokenizer.json: a bos_token, added before "
                            "the text)")
    load_model(str(smollm2_dir))  # a Llama without BOS is fine


@pytest.mark.e2e
def test_real_gemma3_270m_ppl_through_rtk_equals_transformers(gemma3_dir, data_dir):
    """WikiText-2 test, 8 blocks of BOS + 255 tokens: rtk's class (rtk.model.ppl) gives transformers' own
    Gemma3ForCausalLM PPL, the issue's 35.0 (plain transformers on the same blocks; 147.9 without BOS)."""
    from transformers import AutoModelForCausalLM

    from rtk.model.load import load_model
    from rtk.model.ppl import model_ppl

    model, tok, _ = load_model(str(gemma3_dir))
    assert model.config.rtk_base_model_type == "gemma3_text" and len(model.model.layers) == 18
    blocks, info = token_blocks(tok, DataSpec(source="wikitext2", split="test", samples=8, seq_len=256), "e")
    assert info["bos"] and (blocks[:, 0] == 2).all()
    ours = model_ppl(model, blocks, batch_size=2)
    del model
    hf = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for ids in blocks.split(2):
            logits = hf(ids).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
    theirs = float(torch.exp(torch.tensor(nll / (8 * 255), dtype=torch.float64)))
    print(f"Gemma 3 270M WikiText-2 test PPL, 8 x (BOS + 255): rtk {ours:.4f}, transformers {theirs:.4f}")
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours == pytest.approx(35.0, abs=0.05)  # the number


@pytest.mark.e2e
def test_real_gemma3_270m_small_prune(tmp_path, gemma3_dir, data_dir):
    """`rtk prune` (one-shot: one scoring pass over the 262k-wide head) on the real 270M with a non-embedding
    target: BOS-led blocks, 35 candidates (attn.0 protected), the plan counted over the 100M non-embedding
    parameters, and a verified export in rtk's plugin format that keeps every layer's type."""
    import json

    import yaml
    from click.testing import CliRunner

    from rtk.cli import main

    r = {"model": "embedded:gemma3-270m", "scoring": {"batch_size": 2},
         "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2, "seq_len": 64},
                  "evaluation": {"source": "wikitext2", "split": "test", "samples": 4, "seq_len": 128}},
         "search": {"method": "one-shot", "target": {"params_removed": 0.05, "count": "non_embedding"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    res = CliRunner().invoke(main, ["prune", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["params_total"] == 268_098_176
    assert plan["params_counted"]["total"] == 268_098_176 - 262_144 * 640
    assert plan["params_counted"]["removed_fraction"] >= 0.05
    assert plan["calibration"]["bos"] and plan["eval"]["bos"]
    assert len(plan["steps"][0]["scores"]) == 35  # 18 MLPs + 17 attentions
    assert 10 < plan["eval"]["ppl_base"] < 100 and plan["eval"]["ppl_final"] > plan["eval"]["ppl_base"]
    cfg = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    removed = plan["removed_sublayers"]
    whole = all(f"{k}.{n.split('.')[1]}" in removed for n in removed for k in ("attn", "mlp"))
    assert cfg["model_type"] == "gemma3_text"
    if whole:  # only whole layers gone: a standard folder, the types of the layers kept
        assert cfg["architectures"] == ["Gemma3ForCausalLM"] and len(cfg["layer_types"]) == 18 - len(removed) // 2
    else:  # rtk's plugin format, every layer's type kept
        assert cfg["architectures"] == ["RtkForCausalLM"] and len(cfg["layer_types"]) == 18
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "max |logit difference| vs the original model run with the removed sublayers skipped" in card
    assert "Gemma 3 270M" in card and "non-embedding parameters" in card
    print(f"real Gemma 3 270M, small prune: removed {plan['removed_sublayers']}; eval PPL "
          f"{plan['eval']['ppl_base']:.2f} -> {plan['eval']['ppl_final']:.2f}; layout {cfg['architectures']}")
