"""Healing on several processes (rtk.heal.distributed): torchrun + FSDP2 on the CPU with gloo, 2 processes, the tiny
Llama with SmolLM2's tokenizer; streamed healing text (rtk.heal.blocks); the memory check (rtk.heal.memory).

The N-process runs start real torchrun processes (`python -m torch.distributed.run ... -m rtk heal`), as a user
would; a 2-process healing of the tiny model takes ~15 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from rtk.cli import main
from rtk.errors import RtkError

pytestmark = pytest.mark.heal

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def keys(heal_text: Path, **over) -> dict:
    """12 steps of 2 x 2 blocks of 32 tokens: a global batch of 4 that 2 processes split."""
    return {"data": {"source": str(heal_text), "seq_len": 32}, "tokens": 12 * 4 * 32, "micro_batch": 2,
            "grad_accum": 2, "lr": 1e-3, "checkpoint_every": 2, "eval_every": 0, **over}


def conf(tmp_path: Path, data: dict, name: str = "heal.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args, nproc: int = 2, timeout: int = 300, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *extra, "-m", "rtk", "heal",
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def rtk_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("rtk", "Error"))]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pruned_out, heal_text) -> Path:
    """The 1-process healing at keys() (full): the reference of the N-process runs."""
    d = tmp_path_factory.mktemp("one")
    res = cli("heal", pruned_out, "-o", d / "out", "--config", conf(d, keys(heal_text)), "--quiet")
    assert res.exit_code == 0, res.output
    return d / "out"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_heal_as_one(tmp_path, pruned_out, heal_text, one_process, method):
    extra = {"method": "lora", "lr": 1e-2, "lora": {"rank": 2}} if method == "lora" else {}
    c = conf(tmp_path, keys(heal_text, **extra))
    one, two = one_process, tmp_path / "two"
    if method == "lora":
        one = tmp_path / "one"
        res = cli("heal", pruned_out, "-o", one, "--config", c, "--quiet")
        assert res.exit_code == 0, res.output
    p = torchrun(pruned_out, "-o", two, "--config", c, "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x 2 processes (FSDP2)" in p.stdout and p.stdout.count("rtk: healed") == 1  # rank 0 reports
    a, b = weights(one), weights(two)
    assert any(not torch.equal(a[k], weights_of(pruned_out)[k]) for k in a)  # it trained
    assert_close(a, b)
    h1, h2 = (json.loads((d / "plan.json").read_text())["heal"] for d in (one, two))
    assert h2["processes"] == 2 and h2["micro_batch_per_process"] == 2 and h2["grad_accum_per_process"] == 1
    assert [s["loss"] for s in h2["history"]["steps"]] == pytest.approx([s["loss"] for s in h1["history"]["steps"]],
                                                                          rel=1e-5)
    assert h2["eval"]["ppl_after"] == pytest.approx(h1["eval"]["ppl_after"], rel=1e-5)
    assert not (tmp_path / "two.partial").exists() and (two / "model" / "config.json").is_file()


def weights_of(pruned_out: Path) -> dict:
    return load_file(str(pruned_out / "model" / "model.safetensors"))


def test_paused_under_two_processes_resumes_under_one(tmp_path, pruned_out, heal_text, one_process):
    c = conf(tmp_path, keys(heal_text))
    part = tmp_path / "part"
    res = cli("heal", pruned_out, "-o", part, "--config", c, "--quiet", "--nproc", "2", "--max-steps", "5")
    assert res.exit_code == 0, res.output
    state = tmp_path / "part.partial" / "heal"
    assert not part.exists() and json.loads((state / "heal_state.json").read_text())["processes"] == 2
    assert len(list((state / "checkpoint").glob("*.distcp"))) == 2  # one shard file per process
    res = cli("heal", pruned_out, "-o", part, "--config", c, "--quiet")
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "at step 5 of 12 (saved by 2 processes)" in res.output
    assert_close(weights(one_process), weights(part))


def test_two_nodes_on_localhost(tmp_path, pruned_out, heal_text, one_process):
    """The README's multi-node command: two torchrun agents (--nnodes 2, one process each) meeting at a c10d
    rendezvous on localhost, as two machines would."""
    c = conf(tmp_path, keys(heal_text))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = lambda rank: [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",  # noqa: E731
                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=rtk-test", "-m", "rtk",
                        "heal", str(pruned_out), "-o", str(tmp_path / "out"), "--config", str(c), "--quiet"]
    procs = [subprocess.Popen(cmd(r), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["heal"]["processes"] == 2
    assert_close(weights(one_process), weights(tmp_path / "out"))


def test_killed_process_stops_the_others_and_the_rerun_resumes(tmp_path, pruned_out, heal_text):
    import psutil

    c = conf(tmp_path, keys(heal_text, tokens=40 * 4 * 32, checkpoint_every=1))
    out = tmp_path / "out"
    p = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "rtk", "heal", str(pruned_out), "-o",
                          str(out), "--config", str(c), "--quiet"], env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "out.partial" / "heal" / "heal_state.json"
    t0 = time.time()
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 3):
        assert p.poll() is None and time.time() - t0 < 240, p.communicate()[0]
        time.sleep(0.05)
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "heal" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    p.communicate(timeout=120)
    assert p.returncode != 0 and not out.exists()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # torchrun stopped both
    step = json.loads(state.read_text())["step"]
    assert 3 <= step < 40
    rarely = conf(tmp_path, keys(heal_text, tokens=40 * 4 * 32, checkpoint_every=100), "rarely.yaml")  # same healing
    r = torchrun(pruned_out, "-o", out, "--config", rarely, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {tmp_path / 'out.partial' / 'heal'} at step {step} of 40" in r.stdout
    assert json.loads((out / "plan.json").read_text())["heal"]["steps"] == 40


# ---- bad input: one line, exit != 0, nothing written ------------------------------------------------------------
def test_a_process_count_that_does_not_split_the_global_batch(tmp_path, pruned_out, heal_text, monkeypatch):
    c = conf(tmp_path, keys(heal_text))
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", c, "--nproc", "3")
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "the global batch of 4 blocks (micro_batch 2 x grad_accum 2) does not split over 3 processes" in res.output
    # under torchrun: the same line from every rank before any work (WORLD_SIZE 3, as torchrun sets it)
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", c)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "does not split over 3 processes" in res.output
    assert not list(tmp_path.glob("o*"))


def test_an_incomplete_torchrun_environment(tmp_path, pruned_out, heal_text, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", conf(tmp_path, keys(heal_text)))
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert ("torchrun environment incomplete: RANK, WORLD_SIZE set, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"
            in res.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_nproc_beyond_the_gpus(tmp_path, pruned_out, heal_text, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", conf(tmp_path, keys(heal_text)), "--nproc", "4",
              "--device", "cuda")
    assert res.exit_code == 1 and res.output.strip() == \
        "Error: --nproc: 4 processes on this node but 2 CUDA devices; use at most 2 (one per GPU)"
    from rtk.heal.distributed import current_world

    e = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "x",
         "MASTER_PORT": "1"}
    with pytest.raises(RtkError, match="4 processes on this node but 2 CUDA devices"):
        current_world("cuda", e)
    assert not list(tmp_path.glob("o*"))


def test_memory_refused_before_loading_naming_what_fits(tmp_path, pruned_out, heal_text, monkeypatch):
    import rtk.heal.memory as memory
    import rtk.model.load as load

    monkeypatch.setattr(memory, "available_memory", lambda device: 100 * 2 ** 20)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", conf(tmp_path, keys(heal_text, micro_batch=4,
                                                                                      grad_accum=1)))
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "GiB per process on cpu (1 process, full, gradient checkpointing on), 0.1 GiB free; would fit: " \
        "micro_batch: 1 (with more grad_accum)" in res.output  # the logits of 4 x 32 tokens x 49k dominate here
    assert not list(tmp_path.glob("o*"))
    # on GPUs more processes, LoRA, or the shards in CPU memory make room: Llama-3.1-8B on 40 GiB GPUs
    from transformers import LlamaConfig

    from rtk.heal.config import HealConfig
    from rtk.model.arch import rtk_config_from_hf

    monkeypatch.setattr(memory, "available_memory", lambda device: 40 * 2 ** 30)
    c = rtk_config_from_hf(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    h = HealConfig(micro_batch=1, data={"source": "x.jsonl", "seq_len": 2048})
    with pytest.raises(RtkError, match=r"heal: needs about 121.8 GiB per process on cuda:0 \(1 process, full, gradient "
                                       r"checkpointing on\), 40.0 GiB free; would fit: 4 processes, or method: lora, "
                                       r"or cpu_offload: true$"):
        memory.check_fits(c, c, h, 2, "cuda:0", 1, 1, 1)
    assert memory.check_fits(c, c, h, 2, "cuda:0", 4, 4, 1).device < 40 * 2 ** 30


def test_memory_estimate_shrinks_with_processes():
    from rtk.heal.config import HealConfig
    from rtk.heal.memory import estimate
    from transformers import LlamaConfig

    from rtk.model.arch import rtk_config_from_hf

    c = rtk_config_from_hf(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    cfg = HealConfig(micro_batch=1, data={"source": "wikitext2", "seq_len": 2048})
    one, two = (estimate(c, c, cfg, 2048, 2, processes=n, checkpointing=True) for n in (1, 8))
    # both models' weights (2 x 16.1 GB in bf16); the 7.0B non-embedding weights' gradients, AdamW moments and
    # update temporary (14 + 56 + 28 GB): 130.8 GB = 121.8 GiB in one process; over 8, a share of that plus what
    # is gathered whole (both models' embeddings and heads, 4.2 GB; two layers)
    assert one.device / 2 ** 30 == pytest.approx(121.8, rel=0.01) and two.device < one.device / 5
    off = estimate(c, c, cfg, 2048, 2, processes=8, checkpointing=True, cpu_offload=True)
    assert off.device < 6 * 2 ** 30 and off.offloaded == pytest.approx(two.device - off.device, rel=1e-6)


# ---- streamed text ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir) -> Path:
    """WikiText-2 valid's first 30k characters as .jsonl records, one paragraph each."""
    text = (data_dir / "wikitext-2-raw" / "valid.txt").read_text()[:30000]
    p = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in text.split("\n \n") if t.strip()))
    return p


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from rtk.model.load import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def test_streamed_jsonl_gives_the_in_memory_blocks_in_the_same_order(corpus, tokenizer):
    from rtk.heal.blocks import BlockStream, Pool
    from rtk.heal.config import HealData
    from rtk.heal.run import heal_blocks

    blocks, _ = heal_blocks(tokenizer, HealData(source=str(corpus), seq_len=32), 10 ** 6, seed=3)
    n = blocks.shape[0]
    assert 100 < n < 4096  # the text is used whole and fits one shuffle window
    stream, info = heal_blocks(tokenizer, HealData(source=str(corpus), seq_len=32, stream=True, repeat=True), 10 ** 6,
                               seed=3)
    assert isinstance(stream, BlockStream) and info["stream"] is True
    assert torch.equal(Pool(blocks, 3).batch(0, 2 * n + 7), stream.batch(0, 2 * n + 7))  # two passes and more


def test_stream_resumes_mid_pass_and_holds_one_window(corpus, tokenizer):
    from rtk.heal.blocks import BlockStream
    from rtk.heal.config import HealData

    spec = HealData(source=str(corpus), seq_len=32, stream=True, shuffle_blocks=50, repeat=True)
    a = BlockStream(tokenizer, spec, seed=1)
    a.batch(0, 130)
    state = a.state()
    assert state["k"] == 2 and state["pos"] == 100 and a._window.shape == (50, 32)
    rest = a.batch(133, 300)  # samples are passed over, into the next pass
    b = BlockStream(tokenizer, spec, seed=1)
    b.restore(state)
    assert torch.equal(b.batch(133, 300), rest)
    assert a.epoch >= 1


def test_a_stream_that_ends_before_the_budget(tmp_path, corpus, pruned_out):
    c = conf(tmp_path, {"data": {"source": str(corpus), "seq_len": 256, "stream": True}, "tokens": 10 ** 6,
                        "micro_batch": 4, "checkpoint_every": 1000})  # ~29 blocks: the stream ends at step 8
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", c, "--quiet")
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: heal.data: ") and "ended after" in line and "set heal.data.repeat: true" in line
    assert not (tmp_path / "o").exists()


def test_streamed_healing_from_a_folder_of_shards(tmp_path, corpus, pruned_out):
    """A folder of .jsonl and .txt shards (sorted), streamed without repeat through rtk heal: the stream's position is
    in the checkpoint, and a paused run resumes to the uninterrupted result."""
    shards = tmp_path / "shards"
    shards.mkdir()
    lines = corpus.read_text().splitlines(keepends=True)
    (shards / "a.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (shards / "b.txt").write_text("\n".join(json.loads(x)["text"] for x in lines[len(lines) // 2:]))
    data = {"source": str(shards), "seq_len": 32, "shuffle_blocks": 16}
    c = conf(tmp_path, keys(tmp_path, data=data, tokens=10 * 4 * 32))
    full, part = tmp_path / "full", tmp_path / "part"
    res = cli("heal", pruned_out, "-o", full, "--config", c, "--quiet")
    assert res.exit_code == 0, res.output
    h = json.loads((full / "plan.json").read_text())["heal"]
    assert h["data"]["stream"] is True and h["passes"] is None and "(streamed)" in h["data"]["text"]
    assert cli("heal", pruned_out, "-o", part, "--config", c, "--quiet", "--max-steps", "5").exit_code == 0
    meta = torch.load(tmp_path / "part.partial" / "heal" / "checkpoint" / "meta.pt", weights_only=False)
    assert meta["stream"]["pos"] > 0
    res = cli("heal", pruned_out, "-o", part, "--config", c, "--quiet")
    assert res.exit_code == 0 and "resuming" in res.output, res.output
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_settings_are_checked():
    from rtk.heal.config import HealConfig
    from rtk.heal.config import load_heal_config

    with pytest.raises(RtkError, match="heal: data: shuffle_blocks: applies to stream: true"):
        load_heal_config({"data": {"source": "wikitext2", "shuffle_blocks": 8}})
    with pytest.raises(RtkError, match="samples: a stream reads as many blocks"):
        load_heal_config({"data": {"source": "x.jsonl", "stream": True, "samples": 4}})
    # the new settings at their defaults leave the fingerprints of in-memory healings as they were before them
    assert HealConfig().fingerprint() == "9af3608c3135e5fe"
    assert HealConfig(method="lora", data={"source": "x.jsonl"}, cpu_offload=True).fingerprint() == "9646b63332a16aa3"
    assert HealConfig(data={"source": "x.jsonl", "stream": True, "repeat": True}).fingerprint() == \
        HealConfig(data={"source": "x.jsonl", "stream": True}).fingerprint()


def test_rtk_prune_under_torchrun_says_how_to_heal_distributed(tmp_path, monkeypatch, tiny_folder):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    recipe = conf(tmp_path, {"model": str(tiny_folder), "search": {"target": {"sublayers": 2}}, "heal": {"tokens": 64}},
                  "recipe.yaml")
    res = cli("prune", recipe, "-o", tmp_path / "o")
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "rtk prune runs as one process" in res.output
    assert "torchrun --nproc-per-node N -m rtk heal OUT -o HEALED --config RECIPE" in res.output
    assert not list(tmp_path.glob("o*"))


def test_nproc_checks_before_starting_torchrun(tmp_path, pruned_out, heal_text, monkeypatch):
    """--nproc runs every weight-free check of a healing as for N processes first: one line, no torchrun."""
    import rtk.heal.distributed as distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("started torchrun"))
    res = cli("heal", tmp_path / "nowhere", "-o", tmp_path / "o", "--nproc", "2")
    assert res.exit_code == 1 and res.output.strip() == f"Error: PRUNED_DIR: {tmp_path / 'nowhere'}: no such folder"
    eval_text = conf(tmp_path, keys(heal_text, data={"source": "wikitext2", "split": "test", "seq_len": 32}))
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", eval_text, "--nproc", "2")
    assert res.exit_code == 1 and "is the evaluation text" in res.output
    (tmp_path / "o").mkdir()
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", conf(tmp_path, keys(heal_text)), "--nproc", "2")
    assert res.exit_code == 1 and "folder exists and is not an rtk healing" in res.output


def test_a_folder_holding_the_evaluation_text_is_refused(data_dir):
    from rtk.data import DataConfig
    from rtk.heal.config import HealConfig, check_heal_text

    with pytest.raises(RtkError, match=r"heal.data: is the evaluation text \(wikitext2 \[test\], test.txt in that "
                                       r"folder\)"):
        check_heal_text(HealConfig(data={"source": str(data_dir / "wikitext-2-raw")}), DataConfig().evaluation)
    check_heal_text(HealConfig(data={"source": str(data_dir / "piqa")}), DataConfig().evaluation)  # another folder


def test_parquet_streams_the_blocks_of_the_same_jsonl(tmp_path, corpus, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rtk.heal.blocks import BlockStream
    from rtk.heal.config import HealData

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "c.parquet",
                   row_group_size=7)
    spec = dict(seq_len=32, shuffle_blocks=40, repeat=True)
    a = BlockStream(tokenizer, HealData(source=str(corpus), stream=True, **spec), seed=2)
    b = BlockStream(tokenizer, HealData(source=str(tmp_path / "c.parquet"), **spec), seed=2)  # streams by default
    assert torch.equal(a.batch(0, 300), b.batch(0, 300))
    state = b.state()
    c = BlockStream(tokenizer, HealData(source=str(tmp_path / "c.parquet"), **spec), seed=2)
    c.restore(state)
    assert torch.equal(c.batch(300, 50), b.batch(300, 50))
    with pytest.raises(RtkError, match="heal.data.field: 'body' is not a column of c.parquet"):
        BlockStream(tokenizer, HealData(source=str(tmp_path / "c.parquet"), field="body", **spec), seed=2).batch(0, 1)


def test_cpu_offload_is_for_gpu_processes(tmp_path, pruned_out, heal_text):
    c = conf(tmp_path, keys(heal_text, cpu_offload=True))
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", c)
    assert res.exit_code == 1 and res.output.strip() == \
        "Error: heal.cpu_offload: applies to healing on several processes (torchrun, --nproc)"
    res = cli("heal", pruned_out, "-o", tmp_path / "o", "--config", c, "--nproc", "2")
    assert res.exit_code == 1 and "on the CPU they are there already" in res.output
    assert not list(tmp_path.glob("o*"))


def test_rtk_prune_no_heal_leaves_the_heal_section_for_later(tmp_path, tiny_folder, heal_text):
    recipe = conf(tmp_path, {"model": str(tiny_folder), "search": {"target": {"sublayers": 2}},
                             "data": {"calibration": {"source": "wikitext2", "split": "valid", "samples": 2,
                                                      "seq_len": 32},
                                      "evaluation": {"source": "wikitext2", "split": "test", "samples": 2,
                                                     "seq_len": 32}},
                             "heal": {"data": {"source": str(heal_text), "seq_len": 32}, "tokens": 64}}, "recipe.yaml")
    res = cli("prune", recipe, "-o", tmp_path / "o", "--no-heal", "--quiet")
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert "heal" not in plan and "rtk: healed" not in res.output
    from rtk.heal.config import load_heal_config

    assert load_heal_config(recipe).tokens == 64  # the recipe's heal: section, for rtk heal --config RECIPE
