"""Served speed through vLLM's own benchmark (vllm.benchmarks.serve, driven in process) against a scripted
streaming server: the numbers and JSON it keeps, an endpoint that dies mid-run (one clear error, no bench.json,
backends closed), and the sweep's parsing and plot."""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner

from rtk.bench.speed import sweep, vllm_serve
from rtk.errors import RtkError


class _Streaming(http.server.BaseHTTPRequestHandler):
    """/v1/models and a streaming /v1/completions: `max_tokens` text chunks 20 ms apart, usage, [DONE]
    (HTTP/1.1 chunked, as vLLM sends). After `die_after` completions it drops every connection."""

    protocol_version = "HTTP/1.1"
    served = 0
    die_after = 10 ** 9
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        body = json.dumps({"data": [{"id": "scripted"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with _Streaming.lock:
            _Streaming.served += 1
            dead = _Streaming.served > _Streaming.die_after
        if dead:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        assert req["stream"] and req["ignore_eos"] and req["temperature"] == 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(req["max_tokens"]):
            time.sleep(0.02)
            self._chunk(b"data: " + json.dumps({"choices": [{"index": 0, "text": "x"}]}).encode() + b"\n\n")
        usage = {"prompt_tokens": 8, "completion_tokens": req["max_tokens"]}
        self._chunk(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
        self._chunk(b"")


@pytest.fixture
def streaming_server():
    _Streaming.served, _Streaming.die_after = 0, 10 ** 9
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Streaming)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_wrong_endpoint_is_one_clear_error(streaming_server):
    from rtk.bench import endpoint

    assert endpoint.served_model(streaming_server) == "scripted"
    with pytest.raises(RtkError, match="answered HTTP 404; not an OpenAI-compatible server"):
        endpoint.served_model(streaming_server + "/v1")


def test_vllm_bench_serve_in_process(streaming_server, tiny_folder, tmp_path):
    args = vllm_serve.bench_args(streaming_server, "scripted", str(tiny_folder), num_prompts=4, input_len=8,
                                 output_len=3, concurrency=2, seed=7)
    assert vllm_serve.command(args).startswith(
        f"vllm bench serve --backend vllm --base-url {streaming_server} --endpoint /v1/completions --model scripted ")
    res = vllm_serve.run(args, tmp_path / "r" / "c2.json", tmp_path / "vb.log")
    assert res["completed"] == 4 and res["failed"] == 0 and res["total_output_tokens"] == 12
    assert res["max_concurrency"] == 2 and _Streaming.served == 1 + 1 + 4  # ready check, warm-up, prompts
    s = vllm_serve.summary(res)
    # 3 chunks, each sent 20 ms after the last: TTFT >= 20 ms and E2EL >= 60 ms whatever the load; the gaps
    # (ITL, TPOT) read about 20 ms, but shorter on a busy machine, where a late chunk and the next arrive together
    assert 15 < s["median_ttft_ms"] < s["median_e2el_ms"] and s["median_e2el_ms"] > 55
    assert 0 < s["median_itl_ms"] < 200 and 0 < s["median_tpot_ms"] < 200 and s["p99_e2el_ms"] >= s["median_e2el_ms"]
    saved = json.loads((tmp_path / "r" / "c2.json").read_text())  # vLLM's own JSON, per-request samples kept
    assert saved["completed"] == 4 and len(saved["ttfts"]) == 4 and saved["num_prompts"] == 4
    smp = vllm_serve.samples_ms(res)
    assert len(smp["ttft"]) == 4 and len(smp["tpot"]) == 4 and len(smp["itl"]) == 8
    assert "Serving Benchmark Result" in (tmp_path / "vb.log").read_text()


def test_endpoint_dying_mid_run_is_one_clear_error(streaming_server, tiny_folder, tmp_path):
    """The server answers the baseline's run, then drops every connection while the candidate's requests run:
    one line, exit 1, OUT never written, OUT.partial without bench.json."""
    from rtk.cli import main

    _Streaming.die_after = 6 + 2  # baseline: ready check + warm-up + 4 prompts; candidate: ready check + warm-up
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_folder), "--candidate", str(tiny_folder),
                                  "--backend", "openai", "--endpoint", streaming_server, "--endpoint", streaming_server,
                                  "-o", str(out), "--skip", "quality", "--rounds", "1", "--concurrency", "1",
                                  "--num-prompts", "4", "--input-len", "8", "--output-len", "3"])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: vllm bench serve against {streaming_server}: 4 of 4 requests failed (first: ")
    assert last.endswith(f"is the server still up? (log: {out}.partial/logs/vllm_bench-candidate1.log)")
    assert not out.exists() and not (tmp_path / "b.partial" / "bench.json").exists()
    assert (tmp_path / "b.partial" / "vllm_bench" / "baseline-round1-c1.json").is_file()


def test_served_backends_are_stopped_when_a_speed_round_fails(monkeypatch, tmp_path):
    from rtk.bench import pool as bench_pool
    from rtk.bench import run as runner
    from rtk.bench.config import BenchConfig

    closed = []

    class Served:
        serving = True

        def __init__(self, m):
            self.m = self.model_name = m

        def serve_load(self, *a, **k):
            raise RtkError("vllm bench serve against X: 4 of 4 requests failed")

        def close(self):
            closed.append(self.m)

    monkeypatch.setattr(bench_pool, "open_backend", lambda kind, m, *a, **k: Served(m))
    cfg = BenchConfig(baseline="a", candidates=["b"], backend="vllm", quality=False, keep_servers=True)
    with pytest.raises(RtkError, match="4 of 4 requests failed"):
        runner.run_bench_to(cfg, tmp_path / "out", echo=lambda s: None)
    assert closed == ["a"] and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial" / "bench.json").exists()


def test_guidellm_report_points_and_one_plot_for_all_models(tmp_path):
    def bench(kind, rate, rps, tps, ttft, itl):
        strat = {"type_": kind, **({"rate": rate} if rate else {})}
        stat = lambda v: {"successful": {"mean": v, "median": v}}  # noqa: E731
        return {"config": {"strategy": strat}, "metrics": {
            "requests_per_second": stat(rps), "output_tokens_per_second": stat(tps),
            "time_to_first_token_ms": stat(ttft), "inter_token_latency_ms": stat(itl),
            "request_totals": {"successful": 10, "errored": 0}}}

    report = {"benchmarks": [bench("synchronous", None, 1.0, 30.0, 100.0, 30.0),
                             bench("throughput", None, 3.0, 80.0, 900.0, 45.0),
                             bench("constant", 2.0, 2.0, 60.0, 300.0, 38.0)]}
    pts = sweep.guidellm_points(report)
    assert [p["name"] for p in pts] == ["synchronous", "throughput", "constant@2.00"]
    assert pts[2] == {"name": "constant@2.00", "request_rate": 2.0, "output_throughput": 60.0, "median_ttft_ms": 300.0,
                      "median_itl_ms": 38.0, "completed": 10, "failed": 0, "incomplete": 0}
    flooded = bench("throughput", None, 0.0, 0.0, 0.0, 0.0)
    flooded["metrics"]["request_totals"] = {"successful": 0, "errored": 0, "incomplete": 512}
    assert sweep.guidellm_points({"benchmarks": [flooded]})[0]["median_ttft_ms"] is None  # nothing completed
    sweep.plot({"baseline": pts, "candidate1": pts[:2]}, tmp_path / "sweep.png", "t")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    scen = sweep.guidellm_scenario("http://h:1/", "m", "/tok", 128, 32, 20, 6, tmp_path / "g.json", 8)["spec"]
    assert scen["profile"] == {"kind": "sweep", "sweep_size": 6, "max_concurrency": 8}
    assert scen["backend"]["target"] == "http://h:1"
    assert scen["data"] == [{"kind": "synthetic_text", "prompt_tokens": 128, "output_tokens": 32}]
    assert scen["constraints"] == [{"kind": "max_duration", "seconds": 20}]


def test_rate_sweep_runs_vllm_bench_at_fractions_of_the_maximum(tmp_path):
    from rtk.bench.run import BenchConfig

    calls = []

    class B:
        def serve_load(self, n, i, o, c, seed, result_file, log=None, request_rate=None, chat=False):
            assert chat is False  # as the run's --chat
            calls.append((n, c, request_rate))
            rps = 4.0 if request_rate == float("inf") else request_rate
            return {"request_throughput": rps, "output_throughput": 32 * rps, "median_ttft_ms": 10 * rps,
                    "median_itl_ms": 5 + rps, "completed": n, "failed": 0, "command": "vllm bench serve ..."}

    cfg = BenchConfig(baseline="a", candidates=["b"], backend="openai", sweep="rates")
    pts, cmd = sweep.run_rates(B(), cfg, "baseline", tmp_path)
    assert [c[2] for c in calls] == [float("inf"), 1.0, 2.0, 3.0, 3.6] and all(c[1] is None for c in calls)
    assert [p["request_rate"] for p in pts] == [1.0, 2.0, 3.0, 3.6, 4.0] and cmd == "vllm bench serve ..."


def test_bench_args_request_rate_and_remote_code():
    a = vllm_serve.bench_args("http://h:1", "m", "/t", num_prompts=8, input_len=128, output_len=32, concurrency=None,
                              seed=1, request_rate=2.5, trust_remote_code=True)
    assert "--max-concurrency" not in a and a[a.index("--request-rate") + 1] == "2.5" and a[-1] == "--trust-remote-code"
    a = vllm_serve.bench_args("http://h:1", "m", "/t", num_prompts=8, input_len=128, output_len=32, concurrency=4,
                              seed=1, request_rate=float("inf"))
    assert "--request-rate" not in a and a[a.index("--max-concurrency") + 1] == "4"
    ns = vllm_serve._parser().parse_args(a)
    assert (ns.random_input_len, ns.random_output_len, ns.num_prompts, ns.seed) == (128, 32, 8, 1)
    assert ns.dataset_name == "random" and ns.ignore_eos and ns.temperature == 0
