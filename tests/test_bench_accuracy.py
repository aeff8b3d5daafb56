"""Accuracy through lm-eval-harness: the local files converted to the hub datasets' fields (checked with
lm-eval's own doc functions), the task configs rtk writes from the ones it ships, the lm_eval command lines,
results parsing, and the clear errors (task file missing, lm-eval missing or failing)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rtk.bench.accuracy import harness
from rtk.bench.accuracy import tasks as T
from rtk.errors import RtkError

DATA = Path(os.environ["RTK_DATA_DIR"])


def _lm_eval_module(rel: str):
    import importlib.util

    path = T.lm_eval_tasks_dir() / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _convert(name):
    s = T.TASKS[name]
    return s.convert([DATA / f for f in s.files])


def test_conversion_to_hub_fields_counts_and_records():
    piqa = _convert("piqa")
    assert len(piqa) == 1838 and set(piqa[0]) == {"goal", "sol1", "sol2", "label"}
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa[0]["label"] == 0
    assert sum(r["label"] for r in piqa) == 928  # 910 zeros, 928 ones (data README)
    arc = _convert("arc_easy")
    assert len(arc) == 2376 and arc[0]["id"] == "Mercury_417466"
    assert set(arc[0]) == {"id", "question", "choices", "answerKey"} and set(arc[0]["choices"]) == {"text", "label"}
    numeric = [r for r in arc if r["answerKey"].isdigit()]
    assert len(numeric) == 97 and all(r["answerKey"] in r["choices"]["label"] for r in arc)
    assert len(_convert("arc_challenge")) == 1172
    boolq = _convert("boolq")
    assert len(boolq) == 3270 and sum(r["label"] for r in boolq) == 2033 and {r["label"] for r in boolq} == {0, 1}
    hs = _convert("hellaswag")
    assert len(hs) == 10042 and hs[0]["label"] == "3" and len(hs[0]["endings"]) == 4
    wg = _convert("winogrande")
    # TaskSpec.docs, what select.judge's limits are checked against before any work, are the files' counts
    assert {n: s.docs for n, s in T.TASKS.items()} == {
        "piqa": len(piqa), "arc_easy": len(arc), "arc_challenge": 1172, "boolq": len(boolq), "hellaswag": len(hs),
        "winogrande": len(wg)}
    assert len(wg) == 1267 and wg[0] == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah", "option2": "Maria", "answer": "2"}


def test_lm_eval_own_doc_functions_give_the_source_prompts():
    """lm-eval's WinoGrande and HellaSwag functions, run on the converted records, rebuild exactly the texts of
    the source files: the choices and continuation (llm-foundry's partial scoring), the query and endings."""
    wino = _lm_eval_module("winogrande/preprocess_winogrande.py")
    src = [json.loads(x) for x in (DATA / "winogrande/winogrande_dev_llmfoundry.jsonl").read_text().splitlines()]
    for rec, s in zip(_convert("winogrande"), src):
        assert wino.doc_to_choice(rec) == s["context_options"]
        assert wino.doc_to_target(rec) == s["continuation"].strip()
        assert wino.doc_to_text(rec) == s["gold"]
    hs = _lm_eval_module("hellaswag/utils.py")
    lines = (DATA / "hellaswag/hellaswag_val_full.txt").read_text().split("\n")
    recs = _convert("hellaswag")
    import datasets

    docs = hs.process_docs(datasets.Dataset.from_list(recs[:500]))
    same = sum(d["query"] == lines[6 * i] for i, d in enumerate(docs))
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he" and docs[0]["gold"] == 3
    assert same >= 499  # lm-eval's preprocess is idempotent on llama.cpp's text but for rare bracket leftovers


def test_prepare_writes_configs_from_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RTK_CACHE_DIR", str(tmp_path / "cache"))
    ts = T.prepare(["piqa", "arc_challenge"])
    assert ts.lm_eval_names == ("rtk_piqa", "rtk_arc_challenge")
    assert ts.include_path == str(tmp_path / "cache" / "lm_eval" / "tasks")
    cfg = yaml.safe_load((Path(ts.include_path) / "rtk_arc_challenge.yaml").read_text())
    shipped = yaml.safe_load((T.SHIPPED / "rtk_arc_challenge.yaml").read_text())
    assert cfg["include"] == str(T.lm_eval_tasks_dir() / "arc" / "arc_challenge.yaml")
    assert shipped["include"] == "arc/arc_challenge.yaml" and cfg["task"] == shipped["task"] == "rtk_arc_challenge"
    data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data == tmp_path / "cache" / "lm_eval" / "data" / "arc_challenge" / "test.jsonl"
    assert sum(1 for _ in data.open()) == 1172
    assert {k: v for k, v in cfg.items() if k not in ("include", "dataset_kwargs")} == \
        {k: v for k, v in shipped.items() if k not in ("include", "dataset_kwargs")}
    assert ts.sources["piqa"]["files"] == ["valid.jsonl", "valid-labels.lst"] and ts.sources["piqa"]["records"] == 1838
    # a second call reuses the conversion; a changed source file is converted again
    mtime = data.stat().st_mtime_ns
    T.prepare(["arc_challenge"])
    assert data.stat().st_mtime_ns == mtime
    src = tmp_path / "data"
    (src / "arc-challenge").mkdir(parents=True)
    (src / "arc-challenge" / "ARC-Challenge-Test.jsonl").write_text(
        '{"id": "x", "question": {"stem": "2+2?", "choices": [{"text": "4", "label": "1"}]}, "answerKey": "1"}\n')
    T.prepare(["arc_challenge"], data_dir=str(src))
    assert [json.loads(x)["id"] for x in data.read_text().splitlines()] == ["x"]
    # every shipped config includes a task file of the installed lm-eval and names its data file
    for name, spec in T.TASKS.items():
        text = T.task_config(spec, T.lm_eval_tasks_dir(), tmp_path)
        got = yaml.safe_load(text.split("\n", 1)[1])
        assert Path(got["include"]).is_file() and got["task"] == f"rtk_{name}"
        assert list(got["dataset_kwargs"]["data_files"]) == [spec.split]


def test_online_uses_lm_eval_own_tasks(monkeypatch):
    ts = T.prepare(["piqa", "winogrande"], data_dir="")
    assert ts.lm_eval_names == ("piqa", "winogrande") and ts.include_path is None
    cmd = harness.hf_run("/m", ts, 20).command()
    assert "--include_path" not in cmd and "--tasks piqa,winogrande" in cmd


def test_missing_task_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RTK_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(RtkError, match=rf"^--tasks piqa: {tmp_path}/data/piqa/valid-labels.lst not found "):
        T.prepare(["piqa"], data_dir=str(tmp_path / "data"))
    (tmp_path / "data" / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(RtkError, match="valid.jsonl has 1 records but .* 2 labels"):
        T.prepare(["piqa"], data_dir=str(tmp_path / "data"))
    assert T.parse_tasks("arc-easy,piqa") == ["arc_easy", "piqa"] and T.parse_tasks("all") == list(T.TASKS)
    with pytest.raises(RtkError, match="--tasks: unknown task"):
        T.parse_tasks("piqa,mmlu")


def test_commands_hf_and_served(tmp_path):
    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    dense.mkdir()
    pruned.mkdir()
    (dense / "config.json").write_text('{"model_type": "llama"}')
    (pruned / "config.json").write_text('{"model_type": "nemotron-nas", "auto_map": {}}')
    ts = T.TaskSet(("piqa",), ("rtk_piqa",), "/c/lm_eval/tasks", {})
    assert harness.hf_run(str(dense), ts, 20).args() == [
        "--model", "hf", "--model_args", f"pretrained={dense},dtype=float32", "--tasks", "rtk_piqa",
        "--include_path", "/c/lm_eval/tasks", "--device", "cpu", "--batch_size", "8", "--limit", "20"]
    assert f"pretrained={pruned},dtype=float32,trust_remote_code=True" in harness.hf_run(str(pruned), ts, 20).command()
    s = harness.served_run("http://127.0.0.1:8000/", str(pruned), str(pruned), ts, None)
    assert s.command() == (
        f"lm_eval --model local-completions --model_args model={pruned},base_url=http://127.0.0.1:8000/v1/completions,"
        f"tokenizer={pruned},tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=3,"
        "trust_remote_code=True --tasks rtk_piqa --include_path /c/lm_eval/tasks --batch_size 1")


def test_lm_eval_adds_bos_where_the_tokenizer_does(tmp_path, smollm2_dir):
    """A folder whose tokenizer adds BOS (Gemma's) gets add_bos_token=True in both lm-eval commands; one whose
    tokenizer does not (SmolLM2's) gets the arguments of before."""
    import copy
    import shutil

    from transformers import AutoTokenizer

    ts = T.TaskSet(("piqa",), ("rtk_piqa",), None, {})
    plain, bos = tmp_path / "plain", tmp_path / "bos"
    for d in (plain, bos):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "gemma3_text"}')
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, plain / f)
    tok = copy.deepcopy(AutoTokenizer.from_pretrained(smollm2_dir))
    tok.add_bos_token = True
    tok.save_pretrained(bos)
    assert harness.hf_run(str(plain), ts, 20).model_args == {"pretrained": str(plain), "dtype": "float32"}
    assert harness.hf_run(str(bos), ts, 20).model_args == {"pretrained": str(bos), "dtype": "float32",
                                                          "add_bos_token": True}
    assert "add_bos_token" not in harness.served_run("http://h:1", "m", str(plain), ts, None).model_args
    assert harness.served_run("http://h:1", "m", str(bos), ts, None).command().endswith(
        "max_retries=3,add_bos_token=True --tasks rtk_piqa --batch_size 1")


def test_results_and_printed_table_are_read(tmp_path):
    ts = T.TaskSet(("piqa", "boolq"), ("rtk_piqa", "rtk_boolq"), None, {})
    f = tmp_path / "results_x.json"
    f.write_text(json.dumps({"results": {
        "rtk_piqa": {"acc,none": 0.6, "acc_stderr,none": 0.11, "acc_norm,none": 0.55, "acc_norm_stderr,none": 0.12},
        "rtk_boolq": {"acc,none": 0.4, "acc_stderr,none": 0.1}},
        "n-samples": {"rtk_piqa": {"effective": 20}, "rtk_boolq": {"effective": 20}}, "versions": {"rtk_piqa": 1.0}}))
    got = harness.parse_results(f, ts)
    samples = [{"doc_id": 1, "acc": 0.0, "acc_norm": 1.0}, {"doc_id": 0, "acc": 1.0, "acc_norm": 1.0}]
    for t in ("rtk_piqa", "rtk_boolq"):
        (tmp_path / f"samples_{t}_x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    assert harness.per_document(f, ts)["piqa"] == {"doc_id": [0, 1], "acc": [1.0, 0.0], "acc_norm": [1.0, 1.0],
                                                   "file": "samples_rtk_piqa_x.jsonl"}
    with pytest.raises(RtkError, match="no per-document results samples_rtk_arc_easy_x.jsonl"):
        harness.per_document(f, T.TaskSet(("arc_easy",), ("rtk_arc_easy",), None, {}))
    assert got["piqa"] == {"acc": 0.6, "acc_stderr": 0.11, "acc_norm": 0.55, "acc_norm_stderr": 0.12, "n": 20,
                           "lm_eval_task": "rtk_piqa", "version": 1.0}
    assert "acc_norm" not in got["boolq"]
    log = tmp_path / "log"
    log.write_text("|a|b|\n|--|--|\nnoise\n|Tasks|Value|\n|rtk_piqa|0.6|\n\n")
    assert harness.table_lines(log) == ["|Tasks|Value|", "|rtk_piqa|0.6|"]
    ts2 = T.TaskSet(("arc_easy",), ("rtk_arc_easy",), None, {})
    with pytest.raises(RtkError, match="has no results for task rtk_arc_easy"):
        harness.parse_results(f, ts2)


def test_bench_never_reports_on_the_documents_that_chose_the_model(tmp_path, tiny_folder):
    """A candidate that select: chose by judging PIQA's last 200 documents (its plan.json) is refused a report that
    reads them, in one line before any work; stopping before them is accepted (the check passes)."""
    import shutil

    from rtk.bench.run import check_judged_documents
    from rtk.cli import main

    cand = tmp_path / "cand"
    shutil.copytree(tiny_folder, cand)
    judge = {"kind": "tasks", "tasks": {"piqa": {"judge_documents": [1638, 1837], "of": 1838}}}
    (cand / "plan.json").write_text(json.dumps({"removed_sublayers": [], "selection": {"judge": judge}}))
    for limit, shown in (["--limit", "1700"], "1700"), ([], "none (all documents)"):
        r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(cand), "-o",
                                      str(tmp_path / "b"), "--tasks", "piqa,boolq", "--skip", "speed", *limit])
        assert r.exit_code == 1 and r.output == (
            f"Error: --limit {shown}: {cand} was chosen by judging piqa documents 1638-1837 (its plan.json); the "
            "documents that judge never report: --limit 1638 or less\n")
        assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    check_judged_documents(cand, ["piqa"], 1638)
    check_judged_documents(cand, ["boolq"], None)  # not judged on BoolQ: all of it may report


def test_lm_eval_missing_is_one_clear_error(monkeypatch, tmp_path, tiny_folder):
    import importlib.util

    from rtk.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "-o", str(tmp_path / "b"), "--tasks", "piqa", "--skip", "speed"])
    assert r.exit_code == 1
    assert r.output == ("Error: --tasks: lm-eval is not installed (pip install 'rtk-prune[eval]', i.e. lm-eval[api]==0.4.13); "
                        "or pass --tasks none\n")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_lm_eval_failing_is_one_clear_error_and_no_bench_json(tmp_path, tiny_folder, monkeypatch):
    """lm_eval exits non-zero (a folder transformers cannot load): one line naming the log; OUT is not written,
    OUT.partial keeps the logs but no bench.json."""
    from rtk.bench import measure
    from rtk.cli import main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')  # no weights
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((Path(tiny_folder) / f).read_bytes())
    # through rtk bench: lm_eval fails on the baseline (rtk's own PPL of it went through)
    real = measure.lm_eval_spec

    def spec(b, cfg, taskset):
        s = real(b, cfg, taskset)
        s.model_args["pretrained"] = str(bad)
        return s

    monkeypatch.setattr(measure, "lm_eval_spec", spec)
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "-o", str(out), "--tasks", "piqa", "--limit", "2", "--skip", "speed",
                                  "--ppl-samples", "1", "--ppl-seq-len", "16"])
    assert r.exit_code == 1, r.output
    assert "WikiText-2 test PPL" in r.output and r.output.strip().splitlines()[-1].startswith(
        "Error: lm_eval failed for baseline (exit 1): ")
    assert f"nothing written to {out}; logs and raw results so far in {out}.partial/" in r.output
    assert not out.exists() and not (tmp_path / "b.partial" / "bench.json").exists()
    log = tmp_path / "b.partial" / "logs" / "lm_eval-baseline.log"
    assert r.output.strip().endswith(f"(log: {log})") and log.stat().st_size > 0
    assert sum(x.startswith("Error: ") for x in r.output.splitlines()) == 1 and "Traceback" not in r.output


def test_bench_torch_backend_runs_lm_eval_on_a_tiny_model(tmp_path, tiny_folder):
    """The in-process path end to end on a tiny random model: lm-eval's hf model, its metrics in bench.json,
    its table and the command in bench.md."""
    from rtk.cli import main

    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "-o", str(tmp_path / "b"), "--tasks", "piqa,boolq", "--limit", "3", "--skip", "speed",
                                  "--ppl-samples", "1", "--ppl-seq-len", "16"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    q0, q1 = (m["quality"] for m in res["models"])
    assert q0["tasks"] == q1["tasks"]  # the same folder twice
    assert q0["tasks"]["piqa"]["n"] == 3 and set(q0["tasks"]["piqa"]) >= {"acc", "acc_stderr", "acc_norm"}
    assert "acc_norm" not in q0["tasks"]["boolq"]  # lm-eval's boolq reports acc only
    assert q0["lm_eval"]["command"].startswith(f"lm_eval --model hf --model_args pretrained={tiny_folder},dtype=float32 ")
    assert (tmp_path / "b" / q0["lm_eval"]["results_file"]).is_file()
    md = (tmp_path / "b" / "bench.md").read_text()
    assert q0["lm_eval"]["command"] in md and "|rtk_piqa" in md.replace(" ", "")
    assert "piqa.acc_norm" in res["ratios"]["candidate1"] and "boolq.acc_norm" not in res["ratios"]["candidate1"]
    # per-document scores kept (lm-eval's samples file beside its results), paired to the baseline's
    per = q0["per_doc"]["piqa"]
    assert per["doc_id"] == [0, 1, 2] and len(per["acc"]) == len(per["acc_norm"]) == 3
    assert (tmp_path / "b" / q0["lm_eval"]["results_file"]).with_name(per["file"]).is_file()
    p = res["paired"]["candidate1"]
    assert set(p) == {"wikitext2.ppl", "piqa.acc", "piqa.acc_norm", "boolq.acc", "mean.acc"}
    assert all(v["diff"] == v["low"] == v["high"] == 0 and v["verdict"] == "no difference shown" for v in p.values())
    assert len(q0["wikitext2"]["block_nll"]) == 1 and q0["wikitext2"]["block_tokens"] == [15]
    assert "| mean of 2 tasks | acc | | | | +0.000 [+0.000, +0.000] | **no difference shown** |" in md


def test_lm_eval_subprocess_is_stopped_on_interrupt(tmp_path, monkeypatch):
    import subprocess

    started = []
    real_popen = subprocess.Popen

    class Popen(real_popen):
        def __init__(self, argv, **kw):
            super().__init__([sys.executable, "-c", "import time; time.sleep(600)"], **kw)
            started.append(self)

        def wait(self, timeout=None):
            if timeout is None:
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    ts = T.TaskSet(("piqa",), ("piqa",), None, {})
    with pytest.raises(KeyboardInterrupt):
        harness.run(harness.hf_run("/m", ts, 2), tmp_path, "x", echo=lambda s: None)
    assert started and started[0].poll() is not None
