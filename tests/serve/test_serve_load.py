"""The server under load: concurrent clients share sampler calls and each gets the answer it
gets alone; a full queue answers 429; a client that goes away stops its work."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import live_server, metrics, slow_down, wait_until

from llada.api import load
from llada.sampling.config import GenerateConfig
from llada.serve.app import create_app
from llada.serve.batcher import Batcher, Job
from llada.serve.config import ServeConfig
from llada.serve.metrics import Metrics
from llada.serve.schemas import SamplerFields, resolve_sampling
from llada.tokenizer import encode_chat

openai = pytest.importorskip("openai")

CLIENTS = 32
DEFAULTS = GenerateConfig(steps=64, gen_length=64, block_length=32)


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    app = create_app(model, tokenizer, ServeConfig(max_batch_size=16, max_queue=64))
    with live_server(app) as url:
        yield url, chat_checkpoint.name


def _batches_over_one(url: str) -> float:
    m = metrics(url)
    return m["llada_batch_size_count"] - m['llada_batch_size_bucket{le="1.0"}']


def test_parallel_clients_share_batches_and_get_their_own_answers(server):
    url, name = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    # Prompts of different lengths, so that batches are left-padded.
    prompts = [f"Question {i}: " + "to be or not " * (i % 4) for i in range(8)]

    def ask(prompt: str):
        return client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=48,
            # The random model ends most answers at once under the default preset (its EOS
            # proposals are decided in order); Fast-dLLM's gives varied answers, so that rows
            # mixed up in a batch would show. Batching is the same for every preset.
            extra_body={"block_length": 16, "preset": "fastdllm-dual"},
        )

    grouped_before = _batches_over_one(url)
    alone = {p: ask(p) for p in prompts}  # one at a time: every call is a batch of one
    assert _batches_over_one(url) == grouped_before
    assert len({a.choices[0].message.content for a in alone.values()}) > len(prompts) // 2
    requests = prompts * (CLIENTS // len(prompts))
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(ask, requests, timeout=120))
    assert time.monotonic() - started < 120
    assert len(replies) == CLIENTS and len({r.id for r in replies}) == CLIENTS
    for prompt, reply in zip(requests, replies, strict=True):
        assert len(reply.choices) == 1
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.choices[0].message.content == alone[prompt].choices[0].message.content
        assert reply.usage == alone[prompt].usage
    assert _batches_over_one(url) > grouped_before  # some sampler call served several
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    m = metrics(url)
    assert m['llada_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= CLIENTS + 8
    assert m["llada_queue_depth"] == 0 and m["llada_running_rows"] == 0


def test_jobs_with_equal_settings_share_a_call_and_others_wait(chat_checkpoint):
    """The batching rule, seen from the scheduler: the oldest waiting job and every waiting job
    with its settings run together; other settings wait for the next call."""
    model, tokenizer, _ = load(chat_checkpoint)
    metrics_ = Metrics()
    batcher = Batcher(model, tokenizer, metrics_, max_queue=8, max_batch_size=8)
    short = resolve_sampling(SamplerFields(max_tokens=8), DEFAULTS, "fast", ServeConfig())
    longer = resolve_sampling(SamplerFields(max_tokens=16), DEFAULTS, "fast", ServeConfig())
    order: list[tuple[int, int]] = []
    lock = threading.Lock()

    def job(index: int, sampling) -> Job:
        def sink(update) -> None:
            if update.finished:
                with lock:
                    order.append((index, int(metrics_.get("llada_batches_total"))))

        return Job([5 + index, 9, 11], sampling.config, sampling.decode, sink, sampling.max_tokens)

    jobs = [job(i, short if i % 2 == 0 else longer) for i in range(5)]
    batcher.submit(jobs)  # queued before the scheduler starts: all wait together
    try:
        wait_until(lambda: len(order) == 5)
    finally:
        batcher.stop()
    calls = dict(order)
    assert calls[0] == calls[2] == calls[4] == 1  # the oldest job's settings go first
    assert calls[1] == calls[3] == 2
    assert metrics_.get("llada_batches_total") == 2


# Requests that differ in what is per row: temperature, seed, threshold, and the canvas (32 or
# 64 tokens in blocks of 32, from max_tokens).
PER_ROW_FIELDS = [
    SamplerFields(max_tokens=32),
    SamplerFields(max_tokens=64, temperature=0.9, seed=3),
    SamplerFields(max_tokens=40, temperature=0.7, seed=4, threshold=0.6),
    SamplerFields(max_tokens=32, temperature=1.2, seed=5, remasking="random"),
]


def _answer_jobs(model, tokenizer, make_job, count: int, together: bool) -> tuple[list[str], int]:
    """Texts of `count` jobs from a fresh scheduler, and the sampler calls they took; the jobs
    are queued before it starts (together) or submitted one at a time, each after the last
    ended. make_job(index, sink) -> Job."""
    texts = dict.fromkeys(range(count), "")

    def sink_of(index: int):
        def sink(update) -> None:
            assert update.error is None, update.error
            texts[index] += update.text

        return sink

    metrics_ = Metrics()
    batcher = Batcher(model, tokenizer, metrics_, max_queue=8, max_batch_size=8)
    jobs = [make_job(i, sink_of(i)) for i in range(count)]
    try:
        if together:
            batcher.submit(jobs)  # queued before the scheduler starts
            batcher.start()
        else:
            batcher.start()
            for one in jobs:
                batcher.submit([one])
                wait_until(lambda one=one: one.done, timeout=60)
        wait_until(lambda: all(j.done for j in jobs), timeout=60)
    finally:
        batcher.stop()
    return [texts[i] for i in range(count)], int(metrics_.get("llada_batches_total"))


def _scheduled(model, tokenizer, fields, mixed: bool, together: bool) -> tuple[list[str], int]:
    """Texts of one chat question per `fields` entry, and the sampler calls they took."""
    limits = ServeConfig(mixed_batches=mixed)

    def job(index: int, sink) -> Job:
        request = fields[index]
        sampling = resolve_sampling(request, DEFAULTS, "fast", limits)
        ids = encode_chat(tokenizer, [{"role": "user", "content": f"Copy: {index} moon sword"}])
        return Job(
            ids,
            sampling.config,
            sampling.decode,
            sink,
            sampling.max_tokens,
            seed=request.seed,
            mixed=mixed,
        )

    return _answer_jobs(model, tokenizer, job, len(fields), together)


def test_jobs_that_differ_in_per_row_settings_share_a_call_and_answer_as_alone(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    alone, calls_alone = _scheduled(model, tokenizer, PER_ROW_FIELDS, True, together=False)
    shared, calls_shared = _scheduled(model, tokenizer, PER_ROW_FIELDS, True, together=True)
    assert calls_alone == len(PER_ROW_FIELDS) and calls_shared == 1
    assert shared == alone  # each row kept its own temperature, seed and threshold
    # The former rule: only identical settings share, and a seeded job runs alone.
    apart, calls_apart = _scheduled(model, tokenizer, PER_ROW_FIELDS, False, together=True)
    assert calls_apart == len(PER_ROW_FIELDS) and apart == alone
    # The sampled answers are not the greedy one (the settings reached the sampler).
    greedy, _ = _scheduled(model, tokenizer, [PER_ROW_FIELDS[0]] * 4, True, together=True)
    assert greedy[0] == alone[0] and any(a != g for a, g in zip(alone[1:], greedy[1:], strict=True))


@pytest.fixture(scope="module")
def slow_server(chat_checkpoint):
    """One row at a time, one waiting request at most, 20 ms per forward pass."""
    model, tokenizer, _ = load(chat_checkpoint)
    slow_down(model, 0.02)
    app = create_app(model, tokenizer, ServeConfig(max_batch_size=1, max_queue=1, retry_after=7))
    with live_server(app) as url:
        yield url


# 256 steps of the reference preset (one forward pass each): about 5 s unless stopped.
LONG = {
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 256,
    "preset": "reference",
}


def _idle(url: str) -> bool:
    m = metrics(url)
    return m["llada_running_rows"] == 0 and m["llada_queue_depth"] == 0


def _open_stream(client: httpx.Client, url: str, body: dict) -> Iterator[str]:
    """Send a streaming request and read its first line (the role chunk, sent before any
    generation); the caller keeps the returned line iterator alive (dropping it closes the
    response)."""
    request = client.build_request("POST", f"{url}/v1/chat/completions", json=body)
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return lines


def test_streaming_client_that_disconnects_stops_its_work(slow_server):
    url = slow_server
    wait_until(lambda: _idle(url))
    before = metrics(url)
    with httpx.Client(timeout=30) as client:
        lines = _open_stream(client, url, {**LONG, "stream": True})
        wait_until(lambda: metrics(url)["llada_running_rows"] == 1)
        assert lines is not None
    # Closing the client closed the connection in the middle of the stream.
    closed = time.monotonic()
    wait_until(lambda: _idle(url), timeout=5)
    stopped_after = time.monotonic() - closed
    after = metrics(url)
    assert stopped_after < 2.0
    assert after["llada_forward_passes_total"] - before["llada_forward_passes_total"] < 128
    assert (
        after['llada_rows_cancelled_total{where="running"}']
        - before.get('llada_rows_cancelled_total{where="running"}', 0)
        == 1
    )
    left = "llada_rows_left_early_total"
    assert after[left] - before.get(left, 0) == 1
    short = {**LONG, "max_tokens": 4, "preset": "fast"}
    assert httpx.post(f"{url}/v1/chat/completions", json=short, timeout=30).status_code == 200


def test_plain_client_that_disconnects_stops_its_work(slow_server):
    url = slow_server
    wait_until(lambda: _idle(url))
    before = metrics(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: _idle(url), timeout=5)
    after = metrics(url)
    assert after["llada_forward_passes_total"] - before["llada_forward_passes_total"] < 128
    assert after['llada_requests_total{endpoint="/v1/chat/completions",status="499"}'] >= 1
    short = {**LONG, "max_tokens": 4, "preset": "fast"}
    assert httpx.post(f"{url}/v1/chat/completions", json=short, timeout=30).status_code == 200


def test_full_queue_answers_429_with_retry_after(slow_server):
    url = slow_server
    wait_until(lambda: _idle(url))
    body = {**LONG, "stream": True}
    with httpx.Client(timeout=30) as running_client:
        running = _open_stream(running_client, url, body)
        wait_until(lambda: metrics(url)["llada_running_rows"] == 1)
        with httpx.Client(timeout=30) as waiting_client:
            waiting = _open_stream(waiting_client, url, body)
            wait_until(lambda: metrics(url)["llada_queue_depth"] == 1)
            refused = httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=30)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "7"
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and "retry" in error["message"]
        # The waiting client left: its request leaves the queue without running.
        wait_until(lambda: metrics(url)["llada_queue_depth"] == 0, timeout=5)
        assert metrics(url)['llada_rows_cancelled_total{where="queued"}'] >= 1
        assert metrics(url)["llada_running_rows"] == 1
        assert running is not None and waiting is not None
    wait_until(lambda: _idle(url), timeout=5)
    assert metrics(url)['llada_rejected_total{reason="queue_full"}'] >= 1
    short = {**LONG, "max_tokens": 4, "preset": "fast"}
    assert httpx.post(f"{url}/v1/chat/completions", json=short, timeout=30).status_code == 200


INSTRUCT = Path(__file__).parents[2] / "models" / "llada-tiny-instruct"
# Two questions whose shared bf16 batch changes the shorter one's answer (left padding rounds
# its attention sums differently); tests/reliability/test_sampler.py uses the same pair.
BF16_PAIR = [
    "Copy this: lamp tiger moon house green sword",
    "Reverse the order:\nocean river seven sword moon tiger cloud house",
]


def _batched_answers(model, tokenizer, limits: ServeConfig, together: bool) -> list[str]:
    """The answers of BF16_PAIR from a scheduler, submitted in one call or one at a time."""
    defaults = GenerateConfig(steps=32, gen_length=32, block_length=32)
    sampling = resolve_sampling(SamplerFields(max_tokens=32), defaults, "fast", limits)

    def job(index: int, sink) -> Job:
        ids = encode_chat(tokenizer, [{"role": "user", "content": BF16_PAIR[index]}])
        return Job(ids, sampling.config, sampling.decode, sink, sampling.max_tokens)

    return _answer_jobs(model, tokenizer, job, len(BF16_PAIR), together)[0]


@pytest.mark.slow
@pytest.mark.skipif(not INSTRUCT.is_dir(), reason="llada-tiny-instruct is not shipped here")
def test_batch_invariant_server_answers_each_request_as_alone_in_bf16():
    model, tokenizer, _ = load(INSTRUCT, dtype=torch.bfloat16)
    plain, invariant = ServeConfig(), ServeConfig(batch_invariant=True)
    alone = _batched_answers(model, tokenizer, plain, together=False)
    assert _batched_answers(model, tokenizer, plain, together=True) != alone  # the bf16 effect
    assert _batched_answers(model, tokenizer, invariant, together=True) == alone
