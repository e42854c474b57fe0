"""A stuck or failing sampler call: its own requests fail with a clear error, /health reports a
stall, and the server goes on serving the others. Host and Content-Type rules."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import live_server, wait_until

import llada.serve.lockstep as sampler_module  # the batcher's sampler call (seeded_denoise)
from llada.api import load
from llada.sampling.fast import StepEvent
from llada.serve.app import create_app
from llada.serve.config import ServeConfig

pytest.importorskip("fastapi")

CHAT = "/v1/chat/completions"


def _body(text: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def _spinning(model, ids, attention_mask, config, decode, abandoned=None, seeds=None):
    """A sampler loop that never commits a token (what NaN confidences did to the fast loop)."""
    mask = model.special_tokens.mask_id
    canvas = torch.cat([ids, torch.full((ids.shape[0], config.gen_length), mask)], dim=1)
    step = 0
    while True:
        step += 1
        yield StepEvent(
            block=0,
            step=step,
            forward_passes=step,
            work={},
            tokens=canvas.clone(),
            committed=torch.zeros_like(canvas, dtype=torch.bool),
            confidence=torch.full(canvas.shape, torch.nan),
            finished=torch.zeros(ids.shape[0], dtype=torch.bool),
        )


@pytest.fixture
def chat_model(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    return model, tokenizer


def test_a_sampler_call_without_progress_fails_only_its_requests(chat_model, monkeypatch):
    model, tokenizer = chat_model
    real = sampler_module.denoise
    calls: list[int] = []

    def denoise(*args, **kwargs):
        calls.append(1)
        return _spinning(*args, **kwargs) if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "denoise", denoise)
    app = create_app(model, tokenizer, ServeConfig(max_batch_size=4))
    with live_server(app) as url:
        # Two requests with different settings: the first one's call spins, the second waits
        # for the next call.
        with ThreadPoolExecutor(2) as pool:
            stuck = pool.submit(httpx.post, url + CHAT, json=_body("stuck", 8), timeout=20)
            wait_until(lambda: len(calls) == 1)
            other = pool.submit(httpx.post, url + CHAT, json=_body("other", 16), timeout=20)
            started = time.monotonic()
            stuck, other = stuck.result(), other.result()
        assert time.monotonic() - started < 15
        assert stuck.status_code == 500
        error = stuck.json()["error"]
        assert error["code"] == "generation_failed"
        assert "no progress" in error["message"] and "NaN" in error["message"]
        assert other.status_code == 200, other.text
        assert other.json()["choices"][0]["finish_reason"] in ("stop", "length")
        health = httpx.get(url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_model_that_outputs_nan_fails_its_request_and_the_server_goes_on(chat_model):
    """NaN confidences once made the fast loop spin forever, with /health still 'ok'."""
    model, tokenizer = chat_model
    broken = threading.Event()
    broken.set()

    def poison(module, args, output):
        return output * float("nan") if broken.is_set() else output

    handle = model.embed.register_forward_hook(poison)
    try:
        app = create_app(model, tokenizer, ServeConfig())
        with live_server(app) as url:
            for preset in ("fast", "fastest", "fastdllm-dual"):
                started = time.monotonic()
                response = httpx.post(
                    url + CHAT, json={**_body("hi", 16), "preset": preset}, timeout=20
                )
                assert time.monotonic() - started < 10
                assert response.status_code == 500, response.text
                assert response.json()["error"]["code"] == "generation_failed"
            broken.clear()
            assert httpx.post(url + CHAT, json=_body("hi", 16), timeout=20).status_code == 200
            assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        handle.remove()


def test_health_reports_a_scheduler_stuck_in_a_step(chat_model, monkeypatch):
    model, tokenizer = chat_model
    real = sampler_module.denoise
    release = threading.Event()

    def denoise(*args, **kwargs):
        release.wait(20)  # a forward pass that does not return
        yield from real(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "denoise", denoise)
    app = create_app(model, tokenizer, ServeConfig(stall_timeout=0.5))
    with live_server(app) as url:
        assert httpx.get(url + "/health").json()["status"] == "ok"
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(httpx.post, url + CHAT, json=_body("hello", 8), timeout=30)
            try:
                wait_until(lambda: httpx.get(url + "/health").status_code == 503, timeout=10)
                health = httpx.get(url + "/health").json()
                assert health["status"] == "stalled"
            finally:
                release.set()
            assert reply.result().status_code == 200
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=10)


def test_host_header_and_content_type_are_checked(chat_model):
    model, tokenizer = chat_model
    app = create_app(model, tokenizer, ServeConfig())
    with live_server(app) as url:
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
            response = httpx.get(url + "/v1/models", headers={"Host": host})
            assert response.status_code == 400, host
            assert response.json()["error"]["code"] == "host_not_allowed"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200
        body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
        for media in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": media} if media else {}
            response = httpx.post(url + CHAT, content=body, headers=headers)
            assert response.status_code == 415, media
            assert response.json()["error"]["code"] == "unsupported_media_type"
        headers = {"Content-Type": "application/json; charset=utf-8"}
        assert httpx.post(url + CHAT, content=body, headers=headers, timeout=30).status_code == 200
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(url + path).status_code == 404


def test_allowed_hosts_setting():
    assert ServeConfig().host_allow_list() == {"localhost", "127.0.0.1", "::1"}
    assert ServeConfig(host="0.0.0.0").host_allow_list() is None
    config = ServeConfig(host="0.0.0.0", allowed_hosts="LLaDA.example.org., 10.0.0.5:8000")
    assert config.host_allow_list() == {"llada.example.org", "10.0.0.5"}
    assert ServeConfig(allowed_hosts="*").host_allow_list() is None
    with pytest.raises(ValueError, match="allowed_hosts"):
        ServeConfig(allowed_hosts=" , ")
    with pytest.raises(ValueError, match="request_read_timeout"):
        ServeConfig(request_read_timeout=0)
