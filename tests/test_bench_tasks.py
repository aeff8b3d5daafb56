"""Zero-shot task loading (real files), lm-eval-style scoring with scripted log-likelihoods,
the torch backend's log-probs and PPL, and cleanup of backends when a run fails."""
from __future__ import annotations

import math

import pytest

from rtk.bench import runner
from rtk.bench.tasks import Doc, load_task, loglikelihoods, parse_tasks, score, split_tokens
from rtk.errors import RtkError


class CharTok:
    """One token per character (ids = code points)."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_split_moves_trailing_context_space():
    ctx, cont = split_tokens(CharTok(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]


def test_scoring_with_scripted_loglikelihoods():
    # continuation -> its scripted log-likelihood; the fake backend puts it on the continuation's
    # last token and a large (ignored) value on the context tokens
    script = {" a": -1.0, " bbbb": -2.0, " yes": -3.0, " no": -1.0, " c1.": -4.0, " c2.": -2.0}
    docs = [Doc(("Q1",) * 2, (" a", " bbbb"), gold=1),        # acc picks 0 (-1 > -2); acc_norm picks 1 (-0.4 > -0.5)
            Doc(("Q2",) * 2, (" yes", " no"), gold=1),        # both pick 1
            Doc(("ctx A", "ctx B"), (" c1.", " c1."), gold=0)]  # partial scoring: contexts differ
    script_ctx = {"ctx A": -5.0, "ctx B": -1.0}

    def token_logprobs(seqs):
        out = []
        for s in seqs:
            text = "".join(map(chr, s))
            lp = [-100.0] * (len(s) - 1)
            cont = next(c for c in script if text.endswith(c))
            ctx = text[: -len(cont)]
            lp[-1] = script_ctx.get(ctx, script[cont])  # the only continuation token with a value
            for k in range(len(cont) - 1):
                lp[-2 - k] = 0.0
            out.append(lp)
        return out

    lls = loglikelihoods(token_logprobs, CharTok(), docs, batch=2)
    assert lls == [[-1.0, -2.0], [-3.0, -1.0], [-5.0, -1.0]]
    s = score(docs, lls)
    assert s["n"] == 3
    assert s["acc"] == pytest.approx(1 / 3)        # only doc 2
    assert s["acc_norm"] == pytest.approx(2 / 3)   # docs 1 and 2
    assert s["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))


def test_backend_returning_wrong_lengths_is_an_error():
    with pytest.raises(RtkError, match="returned 1 log-probs for a sequence of"):
        loglikelihoods(lambda seqs: [[0.0] for _ in seqs], CharTok(), [Doc(("ab",), (" c",), 0)])


def test_task_files_and_prompt_formats():
    piqa = load_task("piqa")
    assert len(piqa) == 1838 and piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig")
    assert piqa[0].contexts[0].endswith("\nAnswer:") and piqa[0].continuations[0].startswith(" Provide")
    arc_e, arc_c = load_task("arc_easy"), load_task("arc_challenge")
    assert (len(arc_e), len(arc_c)) == (2376, 1172)
    assert {len(d.continuations) for d in arc_e} == {3, 4, 5}
    hs = load_task("hellaswag", limit=2)
    assert hs[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. he" and hs[0].gold == 3
    assert hs[0].continuations[3] == " starts pulling up roofing on a roof."
    bq = load_task("boolq", limit=1)[0]
    assert bq.contexts[0].endswith("?\nAnswer:") and bq.continuations == (" no", " yes")
    wg = load_task("winogrande", limit=1)[0]
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1
    assert len(load_task("winogrande")) == 1267 and len(load_task("boolq")) == 3270


def test_arc_numeric_labels(tmp_path, monkeypatch):
    (tmp_path / "arc-easy").mkdir()
    (tmp_path / "arc-easy" / "ARC-Easy-Test.jsonl").write_text(
        '{"id": "x", "question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, '
        '{"text": "4", "label": "2"}, {"text": "5", "label": "3"}]}, "answerKey": "2"}\n')
    monkeypatch.setenv("RTK_DATA_DIR", str(tmp_path))
    d = load_task("arc_easy")[0]
    assert d.gold == 1 and d.continuations == (" 3", " 4", " 5") and d.contexts[0] == "Question: 2+2?\nAnswer:"


def test_parse_tasks():
    assert parse_tasks("all") == list(runner.load_task.__globals__["TASKS"])
    assert parse_tasks("arc-easy,piqa") == ["arc_easy", "piqa"]
    with pytest.raises(RtkError, match="--tasks: unknown task"):
        parse_tasks("piqa,mmlu")


class _Fake:
    serving = False

    def __init__(self, log):
        self.log = log

    def close(self):
        self.log.append("closed")


def test_backends_are_closed_when_a_run_is_interrupted(monkeypatch, tmp_path):
    log = []
    monkeypatch.setattr(runner, "open_backend", lambda *a, **k: _Fake(log))

    def interrupted(b, cfg, echo):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "measure_quality", interrupted)
    cfg = runner.BenchConfig(baseline=str(tmp_path), candidates=[str(tmp_path)], keep_servers=True)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(cfg, tmp_path / "out", echo=lambda s: None)
    assert log == ["closed"]


@pytest.mark.e2e
def test_torch_backend_logprobs_and_ppl(smollm2_dir, data_dir):
    """Padded batches give the same log-probs as single sequences; PPL agrees with rtk's scorer."""
    from rtk.bench.backends import TorchBackend, ppl
    from rtk.data import token_blocks
    from rtk.recipe import DataSpec
    from rtk.scoring import ModelScorer

    b = TorchBackend(str(smollm2_dir))
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    both = b.token_logprobs(seqs)
    assert [len(x) for x in both] == [5, 2]
    for s, lp in zip(seqs, both):
        assert lp == pytest.approx(b.token_logprobs([s])[0], abs=1e-4)
    blocks, _ = token_blocks(b.tokenizer, DataSpec(split="test", samples=2, seq_len=64), "t")
    assert ppl(b, blocks)["ppl"] == pytest.approx(ModelScorer(b.model, blocks, progress=False).ppl(), rel=1e-4)
    sp = b.speed(batch=2, prompt_len=8, gen_len=3, repeats=2)
    assert sp["prefill"]["tokens_per_s"] > 0 and sp["decode"]["repeats"] == 2


def test_loaded_pruned_folder_has_rope_frequencies(tmp_path):
    """A nemotron-nas folder loaded by rtk.load.load_model computes RoPE (inv_freq is a
    non-persistent buffer that from_pretrained leaves uninitialized), so torch and vLLM agree."""
    import torch
    from conftest import tiny_rtk
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from rtk.load import load_model
    from rtk.modeling_rtk import RtkModel
    from rtk.rewrite import apply_plan, save_native

    model = tiny_rtk("llama")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    save_native(apply_plan(model, ["attn.1"]), tok, tmp_path / "m")
    loaded, _, _ = load_model(str(tmp_path / "m"))
    torch.testing.assert_close(loaded.model.inv_freq, RtkModel._rope(loaded.config)[0])
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        want = model(input_ids=ids, skip=frozenset({"attn.1"}), use_cache=False).logits
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
