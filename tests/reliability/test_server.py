"""`llada serve` as a process under hostile traffic (a bounded version of bench/server_load.py):
fuzzed requests are 4xx JSON errors while good clients get their solo answers, slow clients are
timed out, SIGTERM drains within the grace period even with stalled clients, and a busy port is
one line."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "llada-tiny-instruct"
READ_TIMEOUT = 1.0
MAX_CONNECTIONS = 48

# The fuzzer, the request mix and the fault drivers are the benchmark's own (one copy).
_spec = importlib.util.spec_from_file_location("server_load", ROOT / "bench" / "server_load.py")
bench = sys.modules.setdefault("server_load", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="the shipped model is not here")


@pytest.fixture(scope="module")
def server():
    flags = [*bench.SERVER_FLAGS, "--request-read-timeout", str(READ_TIMEOUT)]
    flags += ["--max-connections", str(MAX_CONNECTIONS)]
    process = bench.ServerProcess(MODEL, flags)
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.slow
def test_fuzzed_requests_get_4xx_json_while_good_clients_get_their_solo_answers(server):
    requests = bench.load_requests(6)
    with httpx.Client(timeout=60, headers=bench.JSON_TYPE) as client:
        solo = [bench.send(client, server.url, r).answer for r in requests]
    assert all(answer is not None for answer in solo)
    cases = bench.fuzz_cases(300)
    fuzz: dict = {}
    fuzzer = threading.Thread(
        target=lambda: fuzz.update(bench.run_fuzz(server.url, cases, timeout=30, workers=4))
    )
    fuzzer.start()

    def good(i: int):
        with httpx.Client(timeout=60, headers=bench.JSON_TYPE) as client:
            return bench.send(client, server.url, requests[i])

    with ThreadPoolExecutor(len(requests)) as pool:
        outcomes = list(pool.map(good, range(len(requests))))
    fuzzer.join(120)
    assert [o.answer for o in outcomes] == solo, [o.error for o in outcomes]
    assert fuzz["requests"] == 300
    assert fuzz["server_errors_5xx"] == 0, fuzz["examples"]
    assert fuzz["hangs"] == 0 and fuzz["transport_errors"] == 0, fuzz["examples"]
    assert fuzz["error_bodies_not_json"] == 0, fuzz["examples"]
    assert fuzz["invalid_accepted"] == 0, fuzz["examples"]
    assert sum(n for status, n in fuzz["statuses"].items() if 400 <= status < 500) > 200
    assert server.alive() and server.healthy()


def test_throughput_round_of_the_benchmark_counts_calls_and_checks_answers(server):
    """The throughput phase's measuring round, small: closed-loop clients with settings that
    vary per request (seeds, temperatures, thresholds) get their solo answers, and the
    sampler calls are counted from /metrics (fewer calls than requests: they shared)."""
    requests = bench.load_requests(8)
    assert len({json.dumps(r.body.get("seed")) for r in requests}) > 2  # mixed settings
    with httpx.Client(timeout=60, headers=bench.JSON_TYPE) as client:
        solo = {i: bench.send(client, server.url, r).answer for i, r in enumerate(requests)}
    result = bench._throughput_round(server, requests, solo, clients=4, each=2, timeout=60)
    assert result["requests"] == result["answered"] == 8
    assert result["differ_from_solo"] == 0
    assert 1 <= result["sampler_calls"] <= 8 and len(result["latencies"]) == 8
    assert result["forward_passes"] >= result["sampler_calls"]  # a call runs one forward or more


M = [{"role": "user", "content": "Sort: 3 1 2"}]
BAD = [
    # (path, raw JSON body, param the error names)
    (bench.CHAT, {"messages": M, "seed": 2**63}, "seed"),
    (bench.CHAT, {"messages": M, "seed": -(2**63) - 1}, "seed"),
    (bench.COMPLETIONS, {"prompt": "x", "seed": 2**64}, "seed"),
    (bench.CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    (bench.CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
    (bench.COMPLETIONS, '{"prompt": ["ok", "\\ud800"]}', "prompt.1"),
    (bench.COMPLETIONS, '{"prompt": "x", "stop": "\\ud800"}', "stop"),
    (bench.CHAT, {"messages": M, "max_tokens": 1, "block_length": 960}, "block_length"),
    (bench.COMPLETIONS, {"prompt": "x", "max_tokens": 50, "block_length": 40}, "block_length"),
    (bench.CHAT, {"messages": M, "gen_length": 64, "block_length": 65}, "block_length"),
    (bench.CHAT, {"messages": M, "max_tokens": 4, "temperature": 1e39}, "temperature"),
    (bench.CHAT, '{"messages": [], "max_tokens": 4, "temperature": 1e400}', "temperature"),
    (bench.CHAT, {"messages": M, "max_tokens": 4, "cfg_scale": 1e39}, "cfg_scale"),
]


@pytest.mark.parametrize("path, body, param", BAD)
def test_out_of_range_values_are_400s_naming_the_field(server, path, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    with httpx.Client(timeout=10, headers=bench.JSON_TYPE) as client:
        response = client.post(server.url + path, content=content.encode())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        # The connection stays usable (a 500 used to close it).
        good = {"messages": M, "max_tokens": 4}
        assert client.post(server.url + bench.CHAT, json=good).status_code == 200


@pytest.mark.slow
def test_slow_clients_are_timed_out_and_connections_are_capped(server):
    extra = MAX_CONNECTIONS + 8
    socks = [
        bench._stalled_connection(server.port, ("headers", "body")[i % 2]) for i in range(extra)
    ]
    try:
        limit = READ_TIMEOUT * 3 + 3
        with ThreadPoolExecutor(extra) as pool:
            results = list(pool.map(lambda s: bench._seconds_until_closed(s, limit), socks))
    finally:
        for sock in socks:
            sock.close()
    assert all(seconds is not None for seconds, _ in results)  # none is left open
    refused = [data for _, data in results if data.startswith(b"HTTP/1.1 503 ")]
    timed_out = [data for _, data in results if data.startswith(b"HTTP/1.1 408 ")]
    assert len(refused) >= extra - MAX_CONNECTIONS and len(refused) + len(timed_out) == extra
    assert b"request_timeout" in timed_out[0] and b"too_many_connections" in refused[0]
    reply = httpx.post(server.url + bench.CHAT, json={"messages": M, "max_tokens": 4}, timeout=30)
    assert reply.status_code == 200


def test_malformed_http_gets_a_json_400(server):
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(raw)
            seconds, data = bench._seconds_until_closed(sock, 10)
        assert seconds is not None and data.startswith(b"HTTP/1.1 400 "), data
        body = json.loads(data.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "bad_http"


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_despite_stalled_clients():
    grace = 6.0
    result = bench.run_sigterm(MODEL, bench.SERVER_FLAGS, grace, in_flight=3, stalled=2)
    assert result["in_flight_answered_200"] == 3, result
    # The client stalled in its body is answered 503 when the grace ends, the one stalled in
    # its headers is closed when the drain starts; the process then exits.
    assert result["stalled_answered_503"] == 1, result
    assert result["stalled_in_headers_closed_after_s"] < 1, result
    assert grace - 0.5 < result["stalled_in_body_closed_after_s"] < grace + 2, result
    assert result["exit_s"] is not None and result["exit_s"] < grace + 4, result


@pytest.mark.slow
def test_a_busy_port_is_one_line_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "llada.cli.main", "serve", "--model", str(MODEL)]
        command += ["--port", str(port), "--api-key", "sk-visible"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"llada: error: port {port} is in use: pass --port N (another port)"
    assert "Traceback" not in out.stderr and "http://" not in out.stderr
    assert "LLADA_API_KEY" in out.stderr  # the warning about --api-key in `ps`
    assert time.monotonic() - started < 60
