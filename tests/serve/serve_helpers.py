"""Helpers of the server tests: a live uvicorn server on a free loopback port, the library's own
answer to compare with, and reading /metrics (with prometheus_client's parser)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from llada.sampling.config import GenerateConfig
from llada.sampling.fast import sample
from llada.serve.metrics import parse_metrics
from llada.serve.server import uvicorn_config


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1 and a free port, with the server's
    connection limits (llada.serve.server); yield its base URL and stop it (and its scheduler)
    on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, app.state.llada.config, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def metrics(url: str) -> dict[str, float]:
    """The server's metrics as {'name{labels}': value} (`llada.serve.metrics.parse_metrics`)."""
    return parse_metrics(_scrape(url))


Series = tuple[str, tuple[tuple[str, str], ...]]


def samples(text: str) -> dict[Series, float]:
    """Prometheus text -> {(sample name, sorted (label, value) pairs): value}, read with
    prometheus_client's parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> dict[Series, float]:
    """GET /metrics of the server at `url`, as `samples`."""
    return samples(_scrape(url))


def _scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02) -> float:
    """Poll `condition()` until it is true; return the seconds it took (fail after timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def library_answer(
    model, tokenizer, prompt_ids: list[int], config: GenerateConfig, decode, max_tokens: int
) -> tuple[str, int]:
    """(text, answer tokens) as the library computes them: one row, `sample`, cut at the first
    EOS/EoT and at max_tokens, decoded without special tokens."""
    out = sample(model, torch.tensor([prompt_ids]), None, config, decode).tokens
    answer = out[0, len(prompt_ids) :].tolist()
    stops = model.special_tokens.stop_ids
    end = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    answer = answer[: min(end, max_tokens)]
    return tokenizer.decode(answer, skip_special_tokens=True), len(answer)


def slow_down(model: torch.nn.Module, seconds: float):
    """Make every forward pass of `model` take at least `seconds` (returns the hook handle)."""

    def pause(module, args) -> None:
        time.sleep(seconds)

    return model.register_forward_pre_hook(pause)
