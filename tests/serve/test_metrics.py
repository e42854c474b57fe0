"""/metrics: prometheus_client's registry per app, scraped from live servers and read with
prometheus_client's parser. Request latency by endpoint and status class, the time to the first
streamed chunk (streamed requests only), the queue wait and denoising steps of every row, the
batch sizes, and the token and request counters move exactly as the requests made say."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from serve_helpers import live_server, samples, scrape, wait_until

from llada.api import load
from llada.sampling.config import PRESETS, GenerateConfig
from llada.serve import batcher as batcher_module
from llada.serve.batcher import Batcher, Job
from llada.serve.lockstep import seeded_denoise
from llada.serve.metrics import CONTENT_TYPE, Metrics, parse_metrics, status_class

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llada.serve.app import create_app  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
LEAVES_AT = 3  # the step of its call at which a client leaves (the scheduler test)


def _value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_the_facade_keeps_counters_gauges_and_histograms():
    metrics = Metrics(batch_size_buckets=(1, 4))
    for size in (1, 3, 3, 9):
        metrics.observe_batch_size(size)
    metrics.inc("llada_rejected_total", reason='a "quoted"\nreason')
    metrics.inc("llada_prompt_tokens_total", 7)
    metrics.set("llada_queue_depth", 2)
    metrics.observe_request("/v1/models", 200, 0.2)
    metrics.observe_request("/v1/models", 404, 0.02)
    metrics.observe_request("/v1/models", 499, 3.0)
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE
    got = samples(body.decode())
    assert _value(got, "llada_batch_size_bucket", le="1.0") == 1
    assert _value(got, "llada_batch_size_bucket", le="4.0") == 3
    assert _value(got, "llada_batch_size_bucket", le="+Inf") == 4
    assert _value(got, "llada_batch_size_count") == 4
    assert _value(got, "llada_batch_size_sum") == 16
    assert _value(got, "llada_queue_depth") == 2
    assert _value(got, "llada_prompt_tokens_total") == 7
    assert _value(got, "llada_rejected_total", reason='a "quoted"\nreason') == 1
    # Series that exist before anything happened, so that rates work from the first scrape.
    assert ("llada_rows_cancelled_total", (("where", "queued"),)) in got
    assert _value(got, "llada_rejected_total", reason="queue_full") == 0
    # Requests: counted by status, timed by status class.
    assert _value(got, "llada_requests_total", endpoint="/v1/models", status="404") == 1
    latency = "llada_request_duration_seconds"
    assert _value(got, f"{latency}_count", endpoint="/v1/models", status_class="4xx") == 2
    assert _value(got, f"{latency}_sum", endpoint="/v1/models", status_class="4xx") == 3.02
    assert _value(got, f"{latency}_bucket", endpoint="/v1/models", status_class="4xx", le="0.1")
    assert (
        _value(got, f"{latency}_bucket", endpoint="/v1/models", status_class="4xx", le="1.0") == 1
    )
    assert _value(got, f"{latency}_count", endpoint="/v1/models", status_class="2xx") == 1
    # The façade reads what it wrote; the flat form keeps label values escaped.
    assert metrics.get("llada_batch_size_count") == 4
    assert metrics.get("llada_requests_total", endpoint="/v1/models", status="499") == 1
    assert metrics.get("llada_batches_total") == 0
    flat = parse_metrics(body.decode())
    assert flat['llada_rejected_total{reason="a \\"quoted\\"\\nreason"}'] == 1
    assert flat['llada_batch_size_bucket{le="4.0"}'] == 3
    assert [status_class(s) for s in (200, 404, 499, 503)] == ["2xx", "4xx", "4xx", "5xx"]


def test_each_app_has_its_own_registry(chat_checkpoint):
    """Two apps in one process: neither sees the other's requests (no shared default registry,
    no duplicate-series error)."""
    model, tokenizer, _ = load(chat_checkpoint)
    first, second = create_app(model, tokenizer), create_app(model, tokenizer)
    with (
        TestClient(first, base_url="http://localhost") as a,
        TestClient(second, base_url="http://localhost") as b,
    ):
        for _ in range(3):
            assert a.get("/v1/models").status_code == 200
        assert b.get("/v1/models").status_code == 200
        got_a, got_b = samples(a.get("/metrics").text), samples(b.get("/metrics").text)
    models = {"endpoint": "/v1/models", "status": "200"}
    assert _value(got_a, "llada_requests_total", **models) == 3
    assert _value(got_b, "llada_requests_total", **models) == 1


def test_openmetrics_is_served_when_asked_for(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    with TestClient(create_app(model, tokenizer), base_url="http://localhost") as client:
        client.get("/health")
        response = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        plain = client.get("/metrics")
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(response.text)}
    assert families["llada_request_duration_seconds"].type == "histogram"
    assert families["llada_requests"].type == "counter"
    assert plain.headers["content-type"] == CONTENT_TYPE


def _stream_chat(url: str, body: dict) -> tuple[int, dict]:
    """(chunks with answer text, usage) of a streamed chat request (its usage asked for)."""
    chunks, usage = 0, None
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}{CHAT}", json=request, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            chunks += any(choice["delta"].get("content") for choice in chunk["choices"])
            usage = chunk.get("usage") or usage
    assert usage is not None
    return chunks, usage


def test_live_scrapes_follow_the_requests(chat_checkpoint):
    """A plain chat request, a streamed one and a text completion of two prompts, then a bad
    request: every histogram and counter moves by what these requests imply."""
    model, tokenizer, _ = load(chat_checkpoint)
    with live_server(create_app(model, tokenizer)) as url:
        rows_done = [0]

        def after_rows(rows: int) -> dict:
            """Scrape once the scheduler has finished `rows` more rows (the steps of a row are
            counted when its sampler call ends, which may come just after its answer)."""
            rows_done[0] += rows
            wait_until(lambda: _value(scrape(url), "llada_row_denoise_steps_count") >= rows_done[0])
            return scrape(url)

        start = scrape(url)
        plain = httpx.post(f"{url}{CHAT}", json={"messages": MESSAGES, "max_tokens": 8}, timeout=60)
        assert plain.status_code == 200
        after_plain = after_rows(1)
        # A long answer in small blocks, with no early stop: its text comes in several chunks.
        long = {"max_tokens": 64, "block_length": 8, "preset": "fastdllm-dual"}
        chunks, stream_usage = _stream_chat(url, {"messages": MESSAGES, **long})
        assert chunks >= 2
        after_stream = after_rows(1)
        prompts = ["To be, or not to be", "What is 2 + 3?"]
        text = httpx.post(
            f"{url}{COMPLETIONS}", json={"prompt": prompts, "max_tokens": 8}, timeout=60
        )
        assert text.status_code == 200
        after_text = after_rows(2)
        bad = httpx.post(f"{url}{CHAT}", json={"messages": MESSAGES, "max_tokens": -1}, timeout=60)
        assert bad.status_code == 400
        end = scrape(url)

    latency = "llada_request_duration_seconds"
    chat_ok = {"endpoint": CHAT, "status_class": "2xx"}
    # Request latency: three answered requests, by endpoint and status class.
    assert _delta(start, end, f"{latency}_count", **chat_ok) == 2
    assert _delta(start, end, f"{latency}_count", endpoint=COMPLETIONS, status_class="2xx") == 1
    assert _delta(start, end, f"{latency}_count", endpoint=CHAT, status_class="4xx") == 1
    for labels in (chat_ok, {"endpoint": COMPLETIONS, "status_class": "2xx"}):
        assert _value(end, f"{latency}_bucket", **labels, le="+Inf") == _value(
            end, f"{latency}_count", **labels
        )
    ok = sum(
        _delta(start, end, f"{latency}_count", endpoint=e, status_class="2xx")
        for e in (CHAT, COMPLETIONS)
    )
    assert ok == 3
    assert _delta(start, end, "llada_requests_total", endpoint=CHAT, status="200") == 2
    assert _delta(start, end, "llada_requests_total", endpoint=CHAT, status="400") == 1
    assert _delta(start, end, "llada_requests_total", endpoint=COMPLETIONS, status="200") == 1

    # Time to the first chunk: the streamed request only (its first chunk only), and within
    # its whole latency.
    ttft = "llada_time_to_first_chunk_seconds"
    assert _delta(start, after_plain, f"{ttft}_count") == 0
    assert _delta(after_plain, after_stream, f"{ttft}_count") == 1
    assert _delta(after_stream, end, f"{ttft}_count") == 0
    assert (
        0
        < _delta(after_plain, after_stream, f"{ttft}_sum")
        <= _delta(after_plain, after_stream, f"{latency}_sum", **chat_ok)
    )

    # Queue wait and denoising steps: once per row (one prompt), in the order they ran.
    for name in ("llada_queue_wait_seconds_count", "llada_row_denoise_steps_count"):
        assert _delta(start, after_plain, name) == 1
        assert _delta(after_plain, after_stream, name) == 1
        assert _delta(after_stream, after_text, name) == 2
        assert _delta(after_text, end, name) == 0
    # A request alone in its sampler call is in it for every step of the call.
    for before, after in ((start, after_plain), (after_plain, after_stream)):
        steps = _delta(before, after, "llada_denoise_steps_total")
        assert steps > 0
        assert _delta(before, after, "llada_row_denoise_steps_sum") == steps
    steps = _delta(after_stream, after_text, "llada_denoise_steps_total")
    assert 2 <= _delta(after_stream, after_text, "llada_row_denoise_steps_sum") <= 2 * steps

    # Batches: one call per request, the two prompts of the text completion together.
    assert _delta(start, end, "llada_batches_total") == 3
    assert _delta(start, end, "llada_batch_size_count") == 3
    assert _delta(start, end, "llada_batch_size_sum") == 4
    assert _delta(after_stream, after_text, "llada_batch_size_bucket", le="1.0") == 0
    assert _delta(after_stream, after_text, "llada_batch_size_bucket", le="2.0") == 1

    # Tokens: what the responses' usage says.
    usages = [plain.json()["usage"], stream_usage, text.json()["usage"]]
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert _delta(start, end, "llada_prompt_tokens_total") == prompt_tokens
    assert _delta(start, end, "llada_completion_tokens_total") == completion_tokens
    assert _value(end, "llada_queue_depth") == 0 and _value(end, "llada_running_rows") == 0
    assert _value(end, "llada_queue_capacity") > 0


def test_queue_wait_and_steps_per_row_seen_from_the_scheduler(chat_checkpoint, monkeypatch):
    """The scheduler with a clock that moves 5 s at each sampler call: two jobs with equal
    settings run first (waited 0 s), the third runs next (waited 5 s). A row's steps are the
    events its call had yielded when its last update was sent, or when its client left (the
    first job's, at the third step)."""
    clock = [100.0]
    fake_time = SimpleNamespace(
        monotonic=lambda: clock[0],
        perf_counter=batcher_module.time.perf_counter,
        sleep=batcher_module.time.sleep,
    )
    monkeypatch.setattr(batcher_module, "time", fake_time)
    in_call, in_all = [0], [0]  # events yielded by the running call, by all calls

    def denoise(*args, **kwargs):
        clock[0] += 5.0
        in_call[0] = 0
        events = seeded_denoise(*args, **kwargs)

        def counted():
            for event in events:
                in_call[0] += 1
                in_all[0] += 1
                if in_call[0] == LEAVES_AT and in_all[0] == LEAVES_AT:
                    jobs[0].cancelled.set()  # the client of the first job leaves
                yield event

        return counted()

    model, tokenizer, _ = load(chat_checkpoint)
    metrics = Metrics()
    batcher = Batcher(model, tokenizer, metrics, max_queue=8, max_batch_size=8, denoise=denoise)
    config = GenerateConfig(steps=16, gen_length=16, block_length=8)
    ended_at: dict[int, int] = {}
    lock = threading.Lock()

    def job(index: int, preset: str, max_tokens: int) -> Job:
        def sink(update) -> None:
            if update.finished:
                with lock:
                    ended_at[index] = in_call[0]

        return Job([5 + index, 9, 11], config, PRESETS[preset], sink, max_tokens)

    # The reference preset completes an answer block by block (8 steps each): the second job's
    # answer ends at step 8 or 16, after the first job's client left.
    jobs = [job(0, "reference", 16), job(1, "reference", 16), job(2, "fast", 16)]
    batcher.submit(jobs)  # all three queued at once, at 100 s
    try:
        wait_until(lambda: len(ended_at) == 2)
        wait_until(lambda: metrics.get("llada_row_denoise_steps_count") == 3)
    finally:
        batcher.stop()
    assert metrics.get("llada_batches_total") == 2
    assert metrics.get("llada_queue_wait_seconds_count") == 3
    assert metrics.get("llada_queue_wait_seconds_sum") == 5.0
    assert metrics.get("llada_queue_wait_seconds_bucket", le="0.001") == 2
    assert metrics.get("llada_queue_wait_seconds_bucket", le="2.5") == 2
    assert metrics.get("llada_queue_wait_seconds_bucket", le="5.0") == 3
    assert 0 not in ended_at and ended_at[1] >= 8 > LEAVES_AT
    assert metrics.get("llada_row_denoise_steps_sum") == LEAVES_AT + sum(ended_at.values())
    assert metrics.get("llada_denoise_steps_total") == in_all[0]
    assert metrics.get("llada_rows_cancelled_total", where="running") == 1
