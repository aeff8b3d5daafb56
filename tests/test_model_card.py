"""The model card: sections users of compressed models know, names instead of machine paths, and
`rtk bench --card` filling Evaluation (lm-eval table with recovery, commands) and Inference performance."""
from __future__ import annotations

from pathlib import Path

import pytest

from rtk.bench.config import BenchConfig
from rtk.bench.metrics import ratios
from rtk.records import card as C
from rtk.records import names as N

SUMMARY = {"layout": "native", "architecture": "DeciLMForCausalLM", "dtype": "float32", "weight_bytes": 1000,
           "params": 80, "params_before": 100, "removed_sublayers": ["attn.3", "mlp.3", "attn.5"],
           "vllm_servable": True, "vllm": "served natively", "vllm_flags": ["--trust-remote-code"], "verification": ["max |diff| 1e-6 vs memory"],
           "verification_inputs": "batch 2, 13 tokens"}


def _plan(tmp_path):
    info = {"source": str(tmp_path / "data" / "wiki.txt"), "file": str(tmp_path / "data" / "wiki.txt"),
            "text": "wiki.txt", "split": "test", "samples": 4, "seq_len": 64, "predicted_tokens": 252}
    return {"model": str(tmp_path / "models" / "Llama-x"), "model_path": str(tmp_path / "models" / "Llama-x"),
            "recipe": {"dtype": "float32"}, "ppl_base": 10.0, "ppl_final": 12.0,
            "calibration": {**info, "split": "valid"}, "eval": {**info, "ppl_base": 11.0, "ppl_final": 13.5}}


def test_card_sections_and_no_machine_paths(tmp_path):
    recipe = f"model: {tmp_path}/models/Llama-x\ndata:\n  calibration: {{source: {tmp_path}/data/wiki.txt}}\n"
    text = C.model_card(SUMMARY, _plan(tmp_path), str(tmp_path / "models" / "Llama-x"), recipe)
    assert str(tmp_path) not in text
    heads = [x for x in text.splitlines() if x.startswith("## ")]
    assert heads == ["## Deployment", "## Creation", "## Evaluation", "## Inference performance",
                     "## How the numbers were measured"]
    assert "vllm serve THIS_FOLDER --trust-remote-code" in text and "model: Llama-x" in text
    assert "| evaluation | 11.000 | 13.500 | wiki.txt, 4 blocks x 64 tokens (252 predicted) |" in text
    assert C.check_fillable(text) and "Not measured yet: `rtk bench" in text
    assert N.base_name("embedded:smollm2").startswith("SmolLM2-135M-Instruct")
    assert N.base_name("meta-llama/Llama-3.1-8B") == "`meta-llama/Llama-3.1-8B`"
    assert N.base_name(str(tmp_path / "m.gguf")) == "`m.gguf` (a local GGUF file)"


def _bench_result(tmp_path, base_dir, cand_dir):
    from rtk.outdir import cache_dir

    inc = str(cache_dir() / "lm_eval" / "tasks")

    def quality(acc, norm, folder):
        cmd = (f"lm_eval --model hf --model_args pretrained={folder},dtype=float32 --tasks rtk_piqa,rtk_boolq "
               f"--include_path {inc} --device cpu --batch_size 8 --limit 20")
        return {"wikitext2": {"ppl": 10.0 if acc > 0.6 else 14.0},
                "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.1, "acc_norm": norm, "acc_norm_stderr": 0.1, "n": 20},
                          "boolq": {"acc": acc - 0.1, "acc_stderr": 0.1, "n": 20}},
                "lm_eval": {"command": cmd, "lm_eval_version": "0.4.13", "include_path": inc,
                            "sources": {"piqa": {"hub": "piqa"}, "boolq": {"hub": "boolq"}}}}

    def speed(tpot, tput, folder):
        return {"c1": {"median_tpot_ms": tpot, "median_ttft_ms": 3 * tpot, "median_itl_ms": tpot,
                       "median_e2el_ms": 40 * tpot, "p99_tpot_ms": tpot, "output_throughput": tput,
                       "request_throughput": tput / 32,
                       "command": f"vllm bench serve --backend vllm --base-url http://127.0.0.1:41234 --model {folder} "
                                  f"--tokenizer {folder}"}}

    cfg = BenchConfig(baseline=str(base_dir), candidates=[str(cand_dir)], backend="vllm", tasks=["piqa", "boolq"],
                             limit=20, concurrency=[1], rounds=2)
    res = {"config": cfg.model_dump(), "serving": True, "machine": "2 CPU cores", "how": ["PPL: x.", "Speed: y."],
           "models": [{"label": "baseline", "path": str(base_dir), "quality": quality(0.8, 0.6, base_dir),
                       "speed": [speed(100.0, 10.0, base_dir), speed(110.0, 9.0, base_dir)]},
                      {"label": "candidate1", "path": str(cand_dir), "quality": quality(0.7, 0.6, cand_dir),
                       "speed": [speed(80.0, 12.5, cand_dir), speed(100.0, 10.0, cand_dir)]}]}
    res["ratios"] = ratios(res, cfg)
    return res


def test_card_says_no_difference_shown_where_the_paired_interval_does(tmp_path):
    """The candidate is right on a subset of the documents the baseline is right on (PIQA 14 of its 16, BoolQ 12 of
    its 14): recovery 87.5% / 85.7%, yet 20 documents of a task cannot tell them apart, and the card says so."""
    from rtk.bench.metrics import paired_quality

    res = _bench_result(tmp_path, tmp_path / "base", tmp_path / "cand")
    right = lambda k: [1.0] * k + [0.0] * (20 - k)  # noqa: E731
    for m, (p, b) in zip(res["models"], ((16, 14), (14, 12))):
        m["quality"]["per_doc"] = {"piqa": {"doc_id": list(range(20)), "acc": right(p), "acc_norm": right(12)},
                                   "boolq": {"doc_id": list(range(20)), "acc": right(b)}}
    res["paired"] = {"candidate1": paired_quality(res["models"][1]["quality"], res["models"][0]["quality"])}
    ev = "\n".join(C.bench_sections(res, "candidate1", str(tmp_path / "cand"))["evaluation"])
    assert "| PIQA (n=20) | acc | 0.800 ± 0.100 | 0.700 ± 0.100 | 87.5% | -0.100 [-0.250, +0.000] | no difference shown |" in ev
    assert "| PIQA (n=20) | acc_norm | 0.600 ± 0.100 | 0.600 ± 0.100 | 100.0% | +0.000 [+0.000, +0.000] | no difference shown |" in ev
    # over both tasks (40 documents) the same drop is outside the interval: the mean says worse
    assert "| mean of 2 tasks | acc | | | | -0.100 [-0.200, -0.025] | **worse** |" in ev


def test_bench_fills_evaluation_and_performance(tmp_path):
    base_dir, cand_dir = tmp_path / "base", tmp_path / "runs" / "model"
    res = _bench_result(tmp_path, base_dir, cand_dir)
    text = C.model_card(SUMMARY, _plan(tmp_path), None)
    parts = C.bench_sections(res, "candidate1", str(cand_dir))
    filled = C.fill_bench(text, parts)
    assert str(tmp_path) not in filled and "127.0.0.1" not in filled
    assert "| PIQA (n=20) | acc | 0.800 ± 0.100 | 0.700 ± 0.100 | 87.5% |" in filled
    assert "| PIQA (n=20) | acc_norm | 0.600 ± 0.100 | 0.600 ± 0.100 | 100.0% |" in filled
    assert "| BoolQ (n=20) | acc | 0.700 ± 0.100 | 0.600 ± 0.100 | 85.7% |" in filled
    assert "| BoolQ (n=20) | acc_norm" not in filled
    assert ("lm_eval --model hf --model_args pretrained=THIS_FOLDER,dtype=float32 --tasks rtk_piqa,rtk_boolq "
            "--include_path ~/.cache/rtk/lm_eval/tasks" in filled) or "$RTK_CACHE_DIR/lm_eval/tasks" in filled
    assert "pretrained=BASE_MODEL" in filled and "`--tasks piqa,boolq` and no `--include_path`" in filled
    # TPOT ratios per round: 80/100 = 0.8 and 100/110 = 0.909, median 0.855 -> speedup 1/0.855 = 1.17,
    # spread 1/0.909 = 1.10 .. 1/0.8 = 1.25; values: the upper median of the 2 rounds
    assert "| TPOT (median), concurrency 1 | 110.0 ms | 100.0 ms | **1.17x** [1.10, 1.25] |" in filled
    assert "| output tokens/s, concurrency 1 | 10.0 | 12.5 | **1.18x** [1.11, 1.25] |" in filled
    assert "vllm bench serve --backend vllm --base-url http://localhost:8000 --model THIS_FOLDER" in filled
    assert "- PPL: x.\n- Speed: y." in filled
    # refilling replaces the blocks, it does not add to them
    again = C.fill_bench(filled, parts)
    assert again == filled and again.count("<!-- rtk-bench:evaluation -->") == 1
    with pytest.raises(ValueError):
        C.fill_bench("no markers", parts)


def test_cli_card_must_be_a_fillable_candidate(tmp_path, tiny_folder):
    from click.testing import CliRunner

    from rtk.cli import main

    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "-o", str(tmp_path / "b"), "--tasks", "none", "--card", str(tmp_path)])
    assert r.exit_code == 1 and r.output == f"Error: --card {tmp_path}: not one of the --candidate folders\n"
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "-o", str(tmp_path / "b"), "--tasks", "none", "--card", str(tiny_folder)])
    assert r.exit_code == 1 and "README.md has no rtk-bench sections to fill" in r.output
    assert not (tmp_path / "b").exists() and not Path(str(tmp_path / "b") + ".partial").exists()
