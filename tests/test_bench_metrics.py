"""Ratios round by round, ideal speedups, and dead / never-healthy endpoints (a wrong one: test_bench_speed)."""
from __future__ import annotations

import socket
import sys
import time

import pytest

from rtk.bench import cost, endpoint
from rtk.model.load import rtk_config_of
from rtk.bench.metrics import ratio_stats
from rtk.errors import RtkError


def test_ratio_stats_round_by_round():
    st = ratio_stats([10.0, 20.0, 10.0], [8.0, 18.0, 9.0])
    assert st["rounds"] == pytest.approx([0.8, 0.9, 0.9])
    assert st["median"] == pytest.approx(0.9) and st["min"] == pytest.approx(0.8)
    assert st["spread_includes_1"] is False
    assert ratio_stats([10.0, 10.0], [9.0, 11.0])["spread_includes_1"] is True
    assert ratio_stats([10.0], [9.0])["spread_includes_1"] is None


def test_ideal_speedup_by_hand(tmp_path):
    """The bench's ideal speedup comes from rtk.model.cost's roofline (hand counts below, 4-byte elements)."""
    from transformers import LlamaConfig

    from rtk.model.arch import rtk_config_from_hf
    from rtk.model.cost import Hardware, model_params, workload_cost
    from rtk.model.rewrite import pruned_config

    hf = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                     vocab_size=10, tie_word_embeddings=True, num_hidden_layers=2)
    dense = rtk_config_from_hf(hf)
    pruned = pruned_config(dense, ["attn.0"])
    # attn: q,o 2*8*8 + k,v 2*8*4 + norm 8 = 200; mlp: 3*8*16 + 8 = 392; embedding 80 (tied); final norm 8
    assert model_params(dense) == 2 * (200 + 392) + 80 + 8 and model_params(pruned) == model_params(dense) - 200
    w = workload_cost(dense, prompt_len=3, output_len=2, batch=1, hw=Hardware(bytes_per_el=4))
    # prefill, 3 tokens: per layer attn 2*3*200 + core 4*2 heads*4*(3*4/2) = 1200 + 192, MLP 2*3*392 = 2352;
    # LM head for the last token 2*80
    assert w["prefill_flops"] == 2 * (1200 + 192 + 2352) + 160
    # decode at contexts 3 and 4, per step bytes: per layer attn 800 + KV 2*C*1*4*4 = 32C, MLP 1568; head 320
    assert w["decode_bytes"] == sum(2 * (800 + 32 * c + 1568) + 320 for c in (3, 4))
    assert w["decode_flops"] == sum(2 * (400 + 32 * c + 784) + 160 for c in (3, 4))
    assert w["kv_bytes_per_token"] == 2 * 32
    i = cost.ideal(dense, pruned, 3, 2, dtype_bytes=4)
    assert i["ideal_prefill_speedup"] == pytest.approx(7648 / (7648 - 1392))
    assert i["ideal_decode_speedup"] == pytest.approx(10560 / (10560 - 1600 - 32 * 7))
    assert i["ideal_decode_flops_speedup"] == pytest.approx(5504 / (5504 - 800 - 32 * 7))
    assert i["kv_bytes_ratio"] == pytest.approx(0.5) and i["param_ratio"] == pytest.approx(1072 / 1272)
    # read from folders: a standard Llama folder and the same config as an rtk (DeciLM) folder
    hf.save_pretrained(tmp_path / "llama")
    pruned.save_pretrained(tmp_path / "deci")
    got = cost.ideal(rtk_config_of(tmp_path / "llama"), rtk_config_of(tmp_path / "deci"), 3, 2, dtype_bytes=4)
    assert got["ideal_decode_speedup"] == pytest.approx(i["ideal_decode_speedup"])
    assert rtk_config_of(tmp_path) is None  # no config.json


def test_model_params_equals_loaded_model():
    from rtk.model.arch import rtk_config_from_hf
    from rtk.model.cost import model_params
    from rtk.model.rewrite import apply_plan
    from rtk.model.params import total_params

    from conftest import tiny_hf, tiny_rtk

    for arch, tie in (("llama", True), ("qwen2", False), ("qwen3", False), ("gemma3", True), ("gemma3", False)):
        m = tiny_rtk(arch, tie=tie)
        assert model_params(rtk_config_from_hf(tiny_hf(arch, tie=tie).config)) == total_params(m)
        p = apply_plan(m, ["attn.1", "mlp.2", "layer.3"])
        assert model_params(p.config) == total_params(p)


def test_sliding_layers_cost_their_window():
    """A Gemma 3 sliding layer reads and attends to at most its window of cached tokens; a global one to all."""
    from rtk.model.arch import rtk_config_from_hf
    from rtk.model.cost import Hardware, sublayer_kernels

    from conftest import GEMMA3_WINDOW as W, tiny_gemma3_config

    cfg = rtk_config_from_hf(tiny_gemma3_config())  # layer 0 sliding, layer 1 global; 4 heads, 2 KV heads, d 24
    hw = Hardware(bytes_per_el=1)
    for c in (W - 1, 10):
        sliding, full = (sublayer_kernels(cfg, "attn", i, 1, c, "decode", hw)[1] for i in (0, 1))
        assert (full.bytes, sliding.bytes) == (2 * c * 2 * 24, 2 * min(c, W) * 2 * 24)
        assert (full.flops, sliding.flops) == (4 * 4 * 24 * c, 4 * 4 * 24 * min(c, W))
    # prefill of 10 tokens: query t attends to min(t, 4) keys
    assert sublayer_kernels(cfg, "attn", 0, 1, 10, "prefill", hw)[1].flops == 4 * 4 * 24 * (1 + 2 + 3 + 4 * 7)
    assert sublayer_kernels(cfg, "attn", 1, 1, 10, "prefill", hw)[1].flops == 4 * 4 * 24 * 55


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_endpoint_is_one_clear_error_quickly():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RtkError, match=rf"--endpoint http://127.0.0.1:{port}: no answer \(ConnectionError\) "
                                       r"after 3 tries; is the server running\?"):
        endpoint.served_model(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


_NEVER_HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.mark.parametrize("kind", ["503", "sleep"])
def test_server_that_never_becomes_healthy(tmp_path, kind):
    from rtk.bench.backends import VLLMBackend

    port = _free_port()
    cmd = ([sys.executable, "-c", _NEVER_HEALTHY, str(port)] if kind == "503"
           else [sys.executable, "-c", "import time; time.sleep(600)"])
    (tmp_path / "m").mkdir()
    t0 = time.monotonic()
    with pytest.raises(RtkError, match=r"vLLM did not become healthy within 4 s \(log: "):
        VLLMBackend(str(tmp_path / "m"), log_dir=tmp_path, startup_timeout=4,
                    server_kw={"port": port, "command": cmd})
    assert time.monotonic() - t0 < 40
    # the process group was stopped: nothing listens on the port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bench_cli_dead_endpoint(tmp_path):
    from click.testing import CliRunner

    from rtk.cli import main

    smollm2_dir = tmp_path / "m"  # never loaded: the endpoint check comes first
    smollm2_dir.mkdir()
    (smollm2_dir / "config.json").write_text("{}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    r = CliRunner().invoke(main, ["bench", "--baseline", str(smollm2_dir), "--candidate", str(smollm2_dir),
                                  "--backend", "openai", "--endpoint", url, "--endpoint", url,
                                  "-o", str(tmp_path / "b"), "--tasks", "none"])
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: --endpoint {url}: no answer (ConnectionError) after 3 tries; is the server running?"
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_bench_cli_accepts_embedded_specs_for_every_model(tmp_path, smollm2_dir):
    """`--baseline embedded:smollm2` (and a candidate spec) resolve to the cached folder, as the help says; the
    dead endpoint is then the one error."""
    from click.testing import CliRunner

    from rtk.cli import main

    url = f"http://127.0.0.1:{_free_port()}"
    r = CliRunner().invoke(main, ["bench", "--baseline", "embedded:smollm2", "--candidate", "embedded:smollm2",
                                  "--backend", "openai", "--endpoint", url, "--endpoint", url,
                                  "-o", str(tmp_path / "b"), "--tasks", "none"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (f"Error: --endpoint {url}: no answer (ConnectionError) after 3 "
                                                 "tries; is the server running?")
