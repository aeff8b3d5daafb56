"""Serving-metric arithmetic on scripted token streams, ratios, ideal speedups, the SSE client
against a scripted local server, and dead / never-healthy endpoints."""
from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time

import pytest

from rtk.bench import cost, endpoint
from rtk.bench.metrics import RequestRecord, ratio_stats, serving_metrics
from rtk.errors import RtkError


def test_scripted_stream_metrics_by_hand():
    # request 1: sent at 0, tokens at 100, 150, 250, 300 ms; request 2: sent at 0, tokens at 200, 400 ms
    r1 = RequestRecord(start=0.0, chunk_times=[0.100, 0.150, 0.250, 0.300], output_tokens=4, prompt_tokens=10)
    r2 = RequestRecord(start=0.0, chunk_times=[0.200, 0.400], output_tokens=2, prompt_tokens=10)
    bad = RequestRecord(start=0.0, error="HTTP 500")
    m = serving_metrics([r1, r2, bad], duration=0.5)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_output_tokens"] == 6 and m["total_input_tokens"] == 20
    assert m["output_throughput"] == pytest.approx(12.0)    # 6 tokens / 0.5 s
    assert m["request_throughput"] == pytest.approx(4.0)    # 2 requests / 0.5 s
    assert m["mean_ttft_ms"] == pytest.approx(150.0)        # (100 + 200) / 2
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["p99_ttft_ms"] == pytest.approx(199.0)         # 100 + 0.99 * (200 - 100)
    # TPOT = (E2E - TTFT) / (n - 1): r1 (300-100)/3 = 66.67 ms, r2 (400-200)/1 = 200 ms
    assert m["mean_tpot_ms"] == pytest.approx((200 / 3 + 200) / 2)
    assert m["p99_tpot_ms"] == pytest.approx(200 / 3 + 0.99 * (200 - 200 / 3))
    # ITLs: 50, 100, 50 (r1) and 200 (r2) -> sorted 50, 50, 100, 200
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["median_itl_ms"] == pytest.approx(75.0)
    assert m["p99_itl_ms"] == pytest.approx(100 + 0.97 * 100)  # rank 0.99*3 = 2.97
    assert m["mean_e2el_ms"] == pytest.approx(350.0)


def test_single_token_output_has_no_tpot():
    r = RequestRecord(start=1.0, chunk_times=[1.25], output_tokens=1)
    assert r.tpot is None and r.itls == [] and r.ttft == pytest.approx(0.25)


def test_ratio_stats_round_by_round():
    st = ratio_stats([10.0, 20.0, 10.0], [8.0, 18.0, 9.0])
    assert st["rounds"] == pytest.approx([0.8, 0.9, 0.9])
    assert st["median"] == pytest.approx(0.9) and st["min"] == pytest.approx(0.8)
    assert st["spread_includes_1"] is False
    assert ratio_stats([10.0, 10.0], [9.0, 11.0])["spread_includes_1"] is True
    assert ratio_stats([10.0], [9.0])["spread_includes_1"] is None


def test_ideal_speedup_by_hand(tmp_path):
    """The bench's ideal speedup comes from rtk.cost's roofline (hand counts below, 4-byte elements)."""
    from transformers import LlamaConfig

    from rtk.arch import rtk_config_from_hf
    from rtk.cost import Hardware, model_params, workload_cost
    from rtk.rewrite import pruned_config

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
    got = cost.ideal(cost.read_config(tmp_path / "llama"), cost.read_config(tmp_path / "deci"), 3, 2, dtype_bytes=4)
    assert got["ideal_decode_speedup"] == pytest.approx(i["ideal_decode_speedup"])
    assert cost.read_config(tmp_path) is None  # no config.json


def test_model_params_equals_loaded_model():
    from rtk.arch import rtk_config_from_hf
    from rtk.cost import model_params
    from rtk.rewrite import apply_plan
    from rtk.scoring import total_params

    from conftest import tiny_hf, tiny_rtk

    for arch, tie in (("llama", True), ("qwen2", False), ("qwen3", False)):
        m = tiny_rtk(arch, tie=tie)
        assert model_params(rtk_config_from_hf(tiny_hf(arch, tie=tie).config)) == total_params(m)
        p = apply_plan(m, ["attn.1", "mlp.2", "layer.3"])
        assert model_params(p.config) == total_params(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Scripted(http.server.BaseHTTPRequestHandler):
    """A /v1/completions that streams 3 text chunks 50 ms apart, then usage, then [DONE]
    (HTTP/1.1 chunked transfer encoding, as vLLM's server sends)."""

    protocol_version = "HTTP/1.1"

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "scripted"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert req["stream"] and req["ignore_eos"] and req["prompt"] == [5, 6, 7]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for text in ("a", "", "b", "c"):  # an empty chunk is not a token arrival
            time.sleep(0.05)
            self._chunk(b"data: " + json.dumps({"choices": [{"text": text}]}).encode() + b"\n\n")
        self._chunk(b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3}}).encode()
                    + b"\n\ndata: [DONE]\n\n")
        self._chunk(b"")


@pytest.fixture
def scripted_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_stream_client_times_chunks(scripted_server):
    assert endpoint.served_model(scripted_server) == "scripted"
    records, duration = endpoint.run_load(scripted_server, "scripted", [[5, 6, 7]] * 2, 3, concurrency=2)
    for r in records:
        assert r.ok and r.output_tokens == 3 and len(r.chunk_times) == 3
        assert 0.04 < r.ttft < 1.0
        assert all(0.09 < x < 1.0 for x in r.itls[:1])  # the empty chunk's 50 ms is inside the first gap
    assert duration < 2.0


def test_dead_endpoint_is_one_clear_error_quickly():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RtkError, match=rf"--endpoint http://127.0.0.1:{port}: no answer \(ConnectionError\) "
                                       r"after 3 tries; is the server running\?"):
        endpoint.served_model(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


def test_wrong_endpoint_is_one_clear_error(scripted_server):
    with pytest.raises(RtkError, match="answered HTTP 404; not an OpenAI-compatible server"):
        endpoint.served_model(scripted_server + "/v1")


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
