"""`llada serve` under load, fuzzing and faults, measured against a real server process.

Starts `llada serve` (the shipped models/llada-tiny-instruct, float32, small answers) on a free
loopback port, then:

1. load: N concurrent clients (--clients, default 64 and 128), mixing chat and text
   completions, streamed or not, seeded (temperature 0.8) or greedy, each with its own prompt.
   Every request was first sent alone; a concurrent answer must equal its solo answer. Figures:
   answered, lost (no complete 200 answer after retrying 429s), duplicated (a response id seen
   twice), cross-wired (another request's solo answer), differing from solo otherwise, 429s,
   p50/p99 latency (first send to complete answer, retries included), server RSS before/after.
2. fuzz: --fuzz requests (default 2,000) over every request field with wrong types, extremes
   (huge integers, 1e39, 1e400, NaN/Infinity literals), unicode edge cases (lone surrogates,
   NUL, RTL marks, emoji, 10k combining marks), and whole bodies that are not JSON, too large,
   deeply nested, of another Content-Type or Host. Figures: 5xx, hangs (no answer within
   --timeout), non-JSON error bodies, server alive at the end.
3. throughput: requests/s and p50/p99 latency at 1, 8, 32 and 64 concurrent clients
   (--throughput-clients), each sending its requests back to back (a closed loop), with
   sampler settings that vary per request (temperature, seed, threshold, and max_tokens of 32,
   64 or 96: canvases of 1-3 blocks of 32; THROUGHPUT_FLAGS), against
   two servers: `--mixed-batches` (requests that differ only in per-row settings share
   sampler calls) and `--no-mixed-batches` (the former scheduler: only identical settings
   share, a seeded request runs alone). Answers are checked against the solo answers.
4. faults: mid-stream disconnects (the server must drop their rows and go idle), slow clients
   (half headers or half a body: each must be timed out by the server), and SIGTERM on a fresh
   server with requests in flight and stalled clients (the in-flight ones must finish, the
   server must exit within its shutdown grace).

    OMP_NUM_THREADS=1 python bench/server_load.py
    python bench/server_load.py --clients 64 --fuzz 500 --slow-clients 20
    OMP_NUM_THREADS=1 python bench/server_load.py --only throughput

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "llada-tiny-instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON_TYPE = {"Content-Type": "application/json"}

# The server's settings for every phase (answers of at most 64 tokens, so that a load phase
# takes seconds on a laptop); --request-read-timeout short, so that slow clients are cut soon.
SERVER_FLAGS = [
    "--dtype", "float32",
    "--gen-length", "32", "--block-length", "32", "--steps", "32",
    "--max-gen-length", "64", "--max-body-bytes", "200000",
    "--max-queue", "64", "--max-batch-size", "16",
    "--request-read-timeout", "2", "--shutdown-grace", "5",
]  # fmt: skip

# The throughput phase's server: canvases of up to 3 blocks of 32.
THROUGHPUT_FLAGS = [*SERVER_FLAGS, "--max-gen-length", "96"]
THROUGHPUT_LENGTHS = (32, 64, 96)

WORDS = "king moon sword river stone cloud apple tiger glass drum lamp rose ship bell wolf salt"


# -- the server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`llada serve` in a subprocess on a free loopback port (stderr kept for the report)."""

    def __init__(self, model: Path, flags: list[str], startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "llada.cli.main", "serve", "--model", str(model)]
        command += ["--port", str(self.port), *flags]
        self.stderr_lines: list[str] = []
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read_stderr, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.stderr_lines))
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.stderr_lines))
            time.sleep(0.1)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.process.poll() is None

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> dict[str, float]:
        from llada.serve.metrics import parse_metrics

        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


# -- requests and answers -------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    body: dict

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def load_requests(count: int, lengths: tuple[int, ...] = (16, 24, 32)) -> list[Request]:
    """`count` distinct requests: chat / completion, streamed or not, seeded or greedy, with
    max_tokens taken in turn from `lengths`."""
    words = WORDS.split()
    requests = []
    for i in range(count):
        rng = random.Random(i)
        task = " ".join(rng.sample(words, 3 + i % 4))
        text = f"Reverse the order:\n{task}" if i % 2 else f"Sort in ascending order:\n{task}"
        body: dict = {"max_tokens": lengths[i % len(lengths)]}
        if i % 4 < 2:
            path, body["messages"] = CHAT, [{"role": "user", "content": text}]
        else:
            path, body["prompt"] = COMPLETIONS, text + "\n"
        if i % 3 == 0:
            body.update(temperature=0.8, seed=1000 + i)
        if i % 5 == 1:
            body["threshold"] = 0.9
        if (i // 2) % 2:
            body["stream"] = True
        requests.append(Request(path, body))
    return requests


def parse_answer(request: Request, response: httpx.Response) -> tuple[str, str]:
    """(response id, answer text) of a complete 200 answer; raises ValueError otherwise."""
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}")
    chat = request.path == CHAT
    if not request.stream:
        body = response.json()
        choice = body["choices"][0]
        return body["id"], choice["message"]["content"] if chat else choice["text"]
    ids, parts, done = set(), [], False
    for line in response.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise ValueError(chunk["error"]["message"])
        ids.add(chunk["id"])
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if chat else choice.get("text")
            parts.append(piece or "")
    if not done or len(ids) != 1:
        raise ValueError("incomplete stream")
    return ids.pop(), "".join(parts)


@dataclass
class Outcome:
    answer: str | None = None
    response_id: str | None = None
    refused: int = 0  # 429s before the answer
    seconds: float = 0.0
    error: str | None = None


def send(client: httpx.Client, url: str, request: Request, retries: int = 60) -> Outcome:
    """Send `request`, retrying after a 429 as its Retry-After says."""
    outcome = Outcome()
    started = time.perf_counter()
    for _ in range(retries):
        try:
            response = client.post(url + request.path, json=request.body)
        except httpx.HTTPError as error:
            outcome.error = f"{type(error).__name__}: {error}"
            break
        if response.status_code == 429:
            outcome.refused += 1
            time.sleep(float(response.headers.get("retry-after", "1")) * random.uniform(0.5, 1))
            continue
        try:
            outcome.response_id, outcome.answer = parse_answer(request, response)
        except (ValueError, KeyError) as error:
            outcome.error = f"{error}: {response.text[:200]}"
        break
    else:
        outcome.error = "still refused after retries"
    outcome.seconds = time.perf_counter() - started
    return outcome


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_load(server: ServerProcess, clients: int, solo: dict[int, str], timeout: float) -> dict:
    requests = load_requests(clients)
    rss_before = server.rss_mb()
    barrier = threading.Barrier(clients)

    def one(i: int) -> Outcome:
        with httpx.Client(timeout=timeout, headers=JSON_TYPE) as client:
            barrier.wait()
            return send(client, server.url, requests[i])

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - started
    answered = [o for o in outcomes if o.answer is not None]
    ids = [o.response_id for o in answered]
    solo_answers = {solo[i] for i in range(clients)}
    cross = differ = 0
    for i, o in enumerate(outcomes):
        if o.answer is None or o.answer == solo[i]:
            continue
        if o.answer in solo_answers:
            cross += 1
        else:
            differ += 1
    latencies = [o.seconds for o in answered]
    return {
        "clients": clients,
        "answered": len(answered),
        "lost": clients - len(answered),
        "duplicated": len(ids) - len(set(ids)),
        "cross_wired": cross,
        "differ_from_solo": differ,
        "refused_429": sum(o.refused for o in outcomes),
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "wall_s": round(wall, 2),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(server.rss_mb(), 1),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


def _throughput_round(server: ServerProcess, requests, solo, clients: int, each: int, timeout):
    """`clients` closed-loop clients, each sending `each` requests back to back."""
    before = server.metrics()
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> list:
        done = []
        with httpx.Client(timeout=timeout, headers=JSON_TYPE) as client:
            barrier.wait()
            for k in range(each):
                i = c * each + k
                done.append((i, send(client, server.url, requests[i])))
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [o for part in pool.map(client_loop, range(clients)) for o in part]
    wall = time.perf_counter() - started
    after = server.metrics()
    calls = after["llada_batches_total"] - before["llada_batches_total"]
    forwards = after["llada_forward_passes_total"] - before["llada_forward_passes_total"]
    answered = [(i, o) for i, o in outcomes if o.answer is not None]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "differ_from_solo": sum(o.answer != solo[i] for i, o in answered),
        "wall_s": wall,
        "latencies": [o.seconds for _, o in answered],
        "sampler_calls": int(calls),
        "forward_passes": int(forwards),
    }


def run_throughput(
    model: Path, clients_list: list[int], timeout: float, per_client_total: int = 32
) -> dict:
    """Requests/s and latency at each client count, for both schedulers (see the docstring).
    Each client sends max(2, per_client_total // clients) requests back to back. Both servers
    run side by side and each client count is measured in the order mixed, exact, exact,
    mixed, so that a change in the machine's load falls on both alike."""
    most = max(max(2, per_client_total // c) * c for c in clients_list)
    requests = load_requests(most, THROUGHPUT_LENGTHS)
    servers = {
        "mixed": ServerProcess(model, [*THROUGHPUT_FLAGS, "--mixed-batches"]),
        "exact": ServerProcess(model, [*THROUGHPUT_FLAGS, "--no-mixed-batches"]),
    }
    results: dict = {"mixed": [], "exact": []}
    try:
        solo: dict[int, str] = {}  # every request alone, once (the scheduler cannot matter)
        with httpx.Client(timeout=timeout, headers=JSON_TYPE) as client:
            for i, request in enumerate(requests):
                outcome = send(client, servers["exact"].url, request)
                if outcome.answer is None:
                    raise RuntimeError(f"a solo request failed: {outcome}")
                solo[i] = outcome.answer
        for clients in clients_list:
            each = max(2, per_client_total // clients)
            rounds: dict[str, list[dict]] = {"mixed": [], "exact": []}
            for scheduler in ("mixed", "exact", "exact", "mixed"):
                rounds[scheduler].append(
                    _throughput_round(servers[scheduler], requests, solo, clients, each, timeout)
                )
            for scheduler, both in rounds.items():
                latencies = [t for r in both for t in r["latencies"]]
                answered = sum(r["answered"] for r in both)
                wall = sum(r["wall_s"] for r in both)
                calls = sum(r["sampler_calls"] for r in both)
                forwards = sum(r["forward_passes"] for r in both)
                row = {
                    "clients": clients,
                    "requests": sum(r["requests"] for r in both),
                    "answered": answered,
                    "differ_from_solo": sum(r["differ_from_solo"] for r in both),
                    "requests_per_s": round(answered / wall, 2),
                    "p50_s": round(percentile(latencies, 50), 3),
                    "p99_s": round(percentile(latencies, 99), 3),
                    "sampler_calls": calls,
                    "rows_per_call": round(answered / max(calls, 1), 2),
                    "forward_passes": forwards,
                    "forwards_per_request": round(forwards / max(answered, 1), 2),
                    "wall_s": round(wall, 2),
                }
                results[scheduler].append(row)
                print(
                    f"throughput [{scheduler}] {clients} clients: {row['requests_per_s']} req/s, "
                    f"p50 {row['p50_s']} s, p99 {row['p99_s']} s, {calls} calls "
                    f"({row['rows_per_call']} rows each), {row['forwards_per_request']} forwards "
                    f"per request, answered {answered}/{row['requests']}, "
                    f"differ from solo {row['differ_from_solo']}"
                )
    finally:
        for server in servers.values():
            server.stop()
    results["speedup"] = {
        str(m["clients"]): round(m["requests_per_s"] / e["requests_per_s"], 2)
        for m, e in zip(results["mixed"], results["exact"], strict=True)
    }
    print(f"throughput mixed / exact (requests/s): {results['speedup']}")
    return results


# -- the fuzzer -----------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    method: str
    path: str
    content: bytes
    headers: dict[str, str]
    invalid: bool = False  # a request that must be refused (a 4xx), whatever else holds


# Values as raw JSON text, so that NaN, Infinity and 1e400 (not JSON, but sent by some
# clients) can be written.
RAW_VALUES = [
    "null", "true", "false", "0", "-1", "1", "7", "0.5", "-0.0", "3.0",
    "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "1" + "0" * 400, "1" + "0" * 5000,
    "1e39", "-1e39", "1e308", "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity",
    '""', '"x"', '"5"', '"true"', '"low_confidence"', '"fast"', '"\\ud800"', '"\\udfff"',
    '"a\\ud800b"', '"\\udc00\\ud800"', '"\\u0000"', '"a\\u0000b"', '"\\u202eabc\\u202c"',
    '"\\u05e9\\u05dc\\u05d5\\u05dd"', '"\\ud83d\\ude00\\ud83e\\udd16"', '"\\ufeff"', '"\\uffff"',
    json.dumps("a" + "\u0301" * 10_000), json.dumps("\U0001f600" * 2000),
    json.dumps("x" * 20_000), "[]", "[1]", '["a"]', '[null]', "[[1, 2], [3]]", "{}",
    '{"a": 1}', '{"type": "text", "text": "hi"}', '[{"type": "text", "text": "hi"}]',
    '[{"type": "image_url"}]', "[" * 50 + "]" * 50,
]  # fmt: skip

BASE = {
    CHAT: {"messages": [{"role": "user", "content": "Sort: 3 1 2"}], "max_tokens": 8},
    COMPLETIONS: {"prompt": "Sort: 3 1 2\n", "max_tokens": 8},
}

# Fields of the request bodies (kept equal to llada.serve.schemas; the fuzzer also sends
# unknown ones) and the nested fields reached through a path.
FIELDS = {
    CHAT: [
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
        "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
        "logit_bias", "user", "logprobs", "top_logprobs", "tools", "tool_choice",
        "response_format", "preset", "steps", "gen_length", "block_length", "cfg_scale",
        "remasking", "threshold", "unknown_field",
        ("messages", 0, "role"), ("messages", 0, "content"), ("messages", 0, "name"),
        ("messages", 0, "extra"), ("messages", 1), ("stream_options", "include_usage"),
    ],
    COMPLETIONS: [
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
        "echo", "logprobs", "suffix", "best_of", "user", "preset", "steps", "gen_length",
        "block_length", "cfg_scale", "remasking", "threshold", "unknown_field", ("prompt", 0),
        ("stream_options", "include_usage"),
    ],
}  # fmt: skip

PLACEHOLDER = "__FUZZ_VALUE__"


def _with_value(path: str, field: str | tuple, raw: str) -> bytes:
    """The base body of `path` with `field` set to the raw JSON text `raw`."""
    body = json.loads(json.dumps(BASE[path]))
    keys = (field,) if isinstance(field, str) else field
    target = body
    for key in keys[:-1]:
        if isinstance(key, int):
            while len(target) <= key:
                target.append({})
        elif not isinstance(target.get(key), (dict, list)):
            target[key] = {}
        target = target[key]
    last = keys[-1]
    if isinstance(last, int) and isinstance(target, list):
        while len(target) <= last:
            target.append(None)
    elif isinstance(last, int):
        last = str(last)
    target[last] = PLACEHOLDER
    return json.dumps(body).replace(f'"{PLACEHOLDER}"', raw).encode()


def whole_body_cases(max_body_bytes: int) -> list[Case]:
    """Bodies, headers and methods that are wrong as a whole."""
    deep = 100_000
    bodies = {
        "not json": b"{bad json",
        "empty": b"",
        "invalid utf-8": b'{"prompt": "\xff\xfe\xc3(", "max_tokens": 4}',
        "utf-8 bom": b'\xef\xbb\xbf{"prompt": "x", "max_tokens": 4}',
        "json null": b"null",
        "json array": b"[1, 2]",
        "json number": b"123",
        "json string": b'"prompt"',
        "nested 1000": b"[" * 1000 + b"]" * 1000,
        "nested 100000": b"[" * deep + b"]" * deep,
        "nested object": b'{"a": ' * 5000 + b"1" + b"}" * 5000,
        "nested in a field": b'{"prompt": "x", "stop": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "duplicate keys": b'{"prompt": "x", "prompt": 5, "max_tokens": 4}',
        "trailing garbage": b'{"prompt": "x", "max_tokens": 4} xyz',
        "huge body": b'{"prompt": "' + b"x" * (max_body_bytes + 10) + b'"}',
        "huge number": b'{"prompt": "x", "max_tokens": ' + b"9" * 100_000 + b"}",
        "nul bytes": b'{"prompt": "x\x00", "max_tokens": 4}',
    }
    cases = []
    for path in (CHAT, COMPLETIONS):
        for label, content in bodies.items():
            # JSON parsers may skip a byte order mark (RFC 8259, section 8.1).
            invalid = label != "utf-8 bom"
            cases.append(Case(f"body: {label}", "POST", path, content, dict(JSON_TYPE), invalid))
        good = json.dumps(BASE[path]).encode()
        for media in ("text/plain", "application/x-www-form-urlencoded", "", "multipart/form-data",
                      "application/jsonx"):  # fmt: skip
            headers = {"Content-Type": media} if media else {}
            cases.append(Case(f"content-type {media!r}", "POST", path, good, headers, True))
        for host in ("evil.example", "127.0.0.1.evil.example", "", "[::2]", "localhost.evil"):
            headers = {**JSON_TYPE, "Host": host}
            cases.append(Case(f"host {host!r}", "POST", path, good, headers, True))
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
            cases.append(Case(f"method {method}", method, path, good, dict(JSON_TYPE), True))
    for path in ("/openapi.json", "/docs", "/redoc", "/v1", "/v1/models/%ff", "/../../etc",
                 "/v1/models/" + "x" * 5000):  # fmt: skip
        cases.append(Case(f"path {path[:30]}", "GET", path, b"", {}, True))
    return cases


def fuzz_cases(count: int, seed: int = 0, max_body_bytes: int = 200_000) -> list[Case]:
    """`count` requests: the whole-body cases, then every (field, value) pair of both
    endpoints, interleaved so that every value comes early (a short run still tries each
    value on some field), then random pairs of fields set together."""
    rng = random.Random(seed)
    by_value = []
    for raw in RAW_VALUES:
        group = [
            Case(
                f"{path} {field}={raw[:40]}", "POST", path, _with_value(path, field, raw), JSON_TYPE
            )
            for path in (CHAT, COMPLETIONS)
            for field in FIELDS[path]
        ]
        rng.shuffle(group)
        by_value.append(group)
    single = [case for cases in zip(*by_value, strict=True) for case in cases]
    cases = whole_body_cases(max_body_bytes) + single
    while len(cases) < count:
        path = rng.choice((CHAT, COMPLETIONS))
        first, second = rng.sample(FIELDS[path], 2)
        content = _with_value(path, first, rng.choice(RAW_VALUES))
        value = rng.choice(RAW_VALUES)
        try:
            body = json.loads(content, parse_constant=lambda c: c)
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(second, str):
            body[second] = PLACEHOLDER
            content = json.dumps(body).replace(f'"{PLACEHOLDER}"', value).encode()
        cases.append(Case(f"{path} {first}+{second}", "POST", path, content, dict(JSON_TYPE)))
    return cases[:count] if count < len(cases) else cases


def run_fuzz(url: str, cases: list[Case], timeout: float, workers: int = 8) -> dict:
    """Send every case; count 5xx, hangs (no answer within `timeout`), error bodies that are
    not OpenAI-style JSON, and invalid requests that were accepted."""
    statuses: dict[int, int] = {}
    server_errors, hangs, not_json, transport, accepted = [], [], [], [], []
    lock = threading.Lock()
    local = threading.local()

    def one(case: Case) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout)
        try:
            response = local.client.request(
                case.method, url + case.path, content=case.content, headers=case.headers
            )
        except httpx.TimeoutException:
            with lock:
                hangs.append(case.label)
            local.client = httpx.Client(timeout=timeout)
            return
        except httpx.TransportError as error:
            with lock:
                transport.append(f"{case.label}: {type(error).__name__}")
            local.client = httpx.Client(timeout=timeout)
            return
        status = response.status_code
        ok_body = True
        if status >= 400:
            try:
                error = response.json()["error"]
                ok_body = isinstance(error["message"], str) and "Traceback" not in error["message"]
            except (ValueError, KeyError, TypeError):
                ok_body = False
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500:
                server_errors.append(f"{case.label}: {status} {response.text[:120]}")
            if not ok_body:
                not_json.append(f"{case.label}: {status} {response.text[:80]}")
            if case.invalid and status < 400:
                accepted.append(f"accepted: {case.label}: {status}")

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, cases))
    return {
        "requests": len(cases),
        "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": len(server_errors),
        "hangs": len(hangs),
        "transport_errors": len(transport),
        "error_bodies_not_json": len(not_json),
        "invalid_accepted": len(accepted),
        "wall_s": round(time.perf_counter() - started, 2),
        "examples": (
            server_errors + [f"hang: {h}" for h in hangs] + transport + not_json + accepted
        )[:8],
    }


# -- faults ---------------------------------------------------------------------------------------

LONG = {  # about one block per chunk, so that a stream has several chunks
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 64,
    "block_length": 8,
    "preset": "fastdllm-dual",
    "stream": True,
}


def run_disconnects(server: ServerProcess, count: int) -> dict:
    """`count` streams, each closed after its first chunk; the server must cancel their rows
    and become idle."""
    before = server.metrics()

    def one(_: int) -> bool:
        with httpx.Client(timeout=30, headers=JSON_TYPE) as client:
            request = client.build_request("POST", server.url + CHAT, json=LONG)
            response = client.send(request, stream=True)
            ok = response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
            response.close()
        return ok

    with ThreadPoolExecutor(count) as pool:
        opened = sum(pool.map(one, range(count)))
    closed = time.monotonic()
    idle_after = None
    while time.monotonic() - closed < 30:
        m = server.metrics()
        if m["llada_running_rows"] == 0 and m["llada_queue_depth"] == 0:
            idle_after = time.monotonic() - closed
            break
        time.sleep(0.05)
    after = server.metrics()
    cancelled = sum(
        after.get(f'llada_rows_cancelled_total{{where="{w}"}}', 0)
        - before.get(f'llada_rows_cancelled_total{{where="{w}"}}', 0)
        for w in ("queued", "running")
    )
    return {
        "streams_opened": opened,
        "idle_again_after_s": None if idle_after is None else round(idle_after, 2),
        "rows_cancelled": int(cancelled),
        "healthy": server.healthy(),
    }


def _stalled_connection(port: int, kind: str) -> socket.socket:
    """A connection that sends part of a request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    if kind == "headers":
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    else:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            b'{"messages": [{"role": "us'
        )
    return sock


def _seconds_until_closed(sock: socket.socket, limit: float) -> tuple[float | None, bytes]:
    """Read until the server closes the connection; (seconds, what it sent) or (None, ...) if
    it is still open after `limit` seconds."""
    started = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started, received
        if not data:
            return time.monotonic() - started, received
        received += data
    return None, received


def _watch_until_closed(
    socks: list[socket.socket], opened: list[float], limit: float
) -> list[tuple[float | None, bytes]]:
    """For each socket, (seconds from its opening until the server closed it, what the server
    sent), or (None, ...) if still open `limit` seconds after the last opening."""
    selector = selectors.DefaultSelector()
    received = {sock: b"" for sock in socks}
    closed: dict[socket.socket, float] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    deadline = max(opened) + limit
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                received[sock] += data
            else:
                closed[sock] = time.monotonic()
                selector.unregister(sock)
    selector.close()
    return [
        (closed[s] - t if s in closed else None, received[s])
        for s, t in zip(socks, opened, strict=True)
    ]


def run_slow_clients(server: ServerProcess, count: int, read_timeout: float) -> dict:
    """`count` connections that stall (half of them in their headers, half in their body);
    each must be closed by the server: answered 408 once its read timeout passes, or 503 at
    once past the connection cap; a normal request must be served meanwhile."""
    socks, opened = [], []
    for i in range(count):
        socks.append(_stalled_connection(server.port, ("headers", "body")[i % 2]))
        opened.append(time.monotonic())
    watch: dict = {}
    watcher = threading.Thread(
        target=lambda: watch.update(
            results=_watch_until_closed(socks, opened, read_timeout * 3 + 5)
        )
    )
    watcher.start()
    # A normal client meanwhile: refused (503) while the stalled ones hold every connection,
    # served once the server has timed them out.
    sent = time.monotonic()
    while True:
        try:
            served = httpx.post(
                server.url + CHAT,
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                timeout=30,
            ).status_code
        except httpx.TransportError as error:
            served = type(error).__name__
        if served == 200 or time.monotonic() - sent > read_timeout * 3 + 10:
            break
        time.sleep(0.1)
    served_after = time.monotonic() - sent
    watcher.join()
    results = watch["results"]
    for sock in socks:
        sock.close()
    timed_out = [t for t, data in results if t is not None and b" 408 " in data[:20]]
    refused = [t for t, data in results if t is not None and b" 503 " in data[:20]]
    return {
        "slow_clients": count,
        "closed_by_server": sum(t is not None for t, _ in results),
        "answered_408": len(timed_out),
        "answered_503": len(refused),
        "still_open": sum(t is None for t, _ in results),
        "408_after_s": [round(min(timed_out), 2), round(max(timed_out), 2)] if timed_out else None,
        "503_after_max_s": round(max(refused), 3) if refused else None,
        "normal_request_meanwhile": served,
        "normal_request_served_after_s": round(served_after, 2),
    }


def run_sigterm(model: Path, flags: list[str], grace: float, in_flight: int, stalled: int) -> dict:
    """A fresh server (long read timeout, so that only the drain cuts stalled clients) gets
    SIGTERM while `in_flight` requests run and `stalled` clients hold half-sent requests (half
    of them in their headers: closed when the drain starts; half in their body: answered 503
    when the grace ends)."""
    server = ServerProcess(
        model, [*flags, "--shutdown-grace", str(grace), "--request-read-timeout", "600"]
    )
    body = {**LONG, "stream": False, "preset": "reference", "max_tokens": 32}
    results: list[int | str] = []

    def one(_: int) -> None:
        try:
            response = httpx.post(server.url + CHAT, json=body, timeout=grace + 60)
            results.append(response.status_code)
        except httpx.HTTPError as error:
            results.append(type(error).__name__)

    try:
        kinds = [("headers", "body")[i % 2] for i in range(stalled)]
        socks = [_stalled_connection(server.port, kind) for kind in kinds]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(in_flight)]
        for thread in threads:
            thread.start()
        # Every in-flight request has reached the scheduler (running or queued).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = server.metrics()
            if m["llada_running_rows"] + m["llada_queue_depth"] >= in_flight:
                break
            time.sleep(0.01)
        watch: dict = {}
        sent = time.monotonic()
        watcher = threading.Thread(
            target=lambda: watch.update(
                closed=_watch_until_closed(socks, [sent] * len(socks), grace + 60)
            )
        )
        watcher.start()
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(grace + 60)
            exit_s: float | None = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            exit_s = None
        for thread in threads:
            thread.join(60)
        watcher.join()
        for sock in socks:
            sock.close()
    finally:
        server.kill()
    closed = watch["closed"]
    by_kind = {
        kind: [
            round(t, 2)
            for (t, _), k in zip(closed, kinds, strict=True)
            if k == kind and t is not None
        ]
        for kind in ("headers", "body")
    }
    return {
        "in_flight": in_flight,
        "in_flight_answered_200": sum(r == 200 for r in results),
        "in_flight_other": sorted({str(r) for r in results if r != 200}),
        "stalled": stalled,
        "stalled_answered_503": sum(data.startswith(b"HTTP/1.1 503 ") for _, data in closed),
        "stalled_in_headers_closed_after_s": max(by_kind["headers"], default=None),
        "stalled_in_body_closed_after_s": max(by_kind["body"], default=None),
        "shutdown_grace_s": grace,
        "exit_s": None if exit_s is None else round(exit_s, 2),
        "exit_code": server.process.returncode,
    }


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--fuzz", type=int, default=2000, help="fuzz requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    parser.add_argument("--disconnects", type=int, default=16)
    parser.add_argument("--slow-clients", type=int, default=600)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--stalled", type=int, default=8)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--throughput-clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--only", choices=["throughput"], default=None, help="run this phase alone")
    args = parser.parse_args()

    started = time.perf_counter()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs, model {args.model.name}")
    figures: dict = {"omp_num_threads": threads, "model": args.model.name}
    figures["throughput"] = run_throughput(args.model, args.throughput_clients, args.timeout)
    if args.only == "throughput":
        print(json.dumps(figures))
        return
    server = ServerProcess(args.model, SERVER_FLAGS)
    try:
        most = max(args.clients)
        with httpx.Client(timeout=args.timeout, headers=JSON_TYPE) as client:
            solo_outcomes = [send(client, server.url, r) for r in load_requests(most)]
        if any(o.answer is None for o in solo_outcomes):
            raise RuntimeError(f"a solo request failed: {solo_outcomes}")
        solo = {i: o.answer for i, o in enumerate(solo_outcomes)}
        figures["load"] = []
        for clients in args.clients:
            load = run_load(server, clients, solo, args.timeout)
            figures["load"].append(load)
            print(
                f"load {clients} clients: answered {load['answered']}, lost {load['lost']}, "
                f"duplicated {load['duplicated']}, cross-wired {load['cross_wired']}, "
                f"differ from solo {load['differ_from_solo']}, 429s {load['refused_429']}, "
                f"p50 {load['p50_s']} s, p99 {load['p99_s']} s, wall {load['wall_s']} s, "
                f"RSS {load['rss_mb_before']} -> {load['rss_mb_after']} MB"
            )
        fuzz = run_fuzz(server.url, fuzz_cases(args.fuzz), args.timeout)
        fuzz["server_alive"] = server.alive() and server.healthy()
        figures["fuzz"] = fuzz
        print(
            f"fuzz {fuzz['requests']} requests: statuses {fuzz['statuses']}, 5xx "
            f"{fuzz['server_errors_5xx']}, hangs {fuzz['hangs']}, transport errors "
            f"{fuzz['transport_errors']}, non-JSON errors {fuzz['error_bodies_not_json']}, "
            f"invalid accepted {fuzz['invalid_accepted']}, "
            f"server alive {fuzz['server_alive']}, wall {fuzz['wall_s']} s"
        )
        for example in fuzz["examples"]:
            print(f"  {example}")
        figures["disconnects"] = run_disconnects(server, args.disconnects)
        print(f"mid-stream disconnects: {figures['disconnects']}")
        figures["slow_clients"] = run_slow_clients(server, args.slow_clients, 2.0)
        print(f"slow clients: {figures['slow_clients']}")
        figures["server_alive_after_faults"] = server.healthy()
        figures["rss_mb_end"] = round(server.rss_mb(), 1)
    finally:
        server.stop()
    figures["sigterm"] = run_sigterm(
        args.model, SERVER_FLAGS, args.grace, args.in_flight, args.stalled
    )
    print(f"SIGTERM: {figures['sigterm']}")
    figures["total_s"] = round(time.perf_counter() - started, 1)
    print(f"total {figures['total_s']} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
