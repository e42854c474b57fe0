"""Bad requests get clear 4xx answers with OpenAI-style error bodies and the server keeps
serving; how request fields become sampler settings; the CLI (/metrics: test_metrics.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llada.api import load
from llada.sampling.config import PRESETS, GenerateConfig
from llada.serve.batcher import _hold_back
from llada.serve.config import ServeConfig
from llada.serve.schemas import (
    ChatCompletionRequest,
    RequestError,
    SamplerFields,
    parse_body,
    resolve_sampling,
)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from llada.serve.app import create_app  # noqa: E402

KEY = "sk-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4}
DEFAULTS = GenerateConfig(steps=64, gen_length=64, block_length=32)


@pytest.fixture(scope="module")
def client(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    config = ServeConfig(api_key=KEY, max_body_bytes=4000, max_prompt_tokens=200)
    with TestClient(create_app(model, tokenizer, config), base_url="http://localhost") as client:
        yield client


def _assert_error(response, status: int, param: str | None = None, words: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    expected_type = "authentication_error" if status == 401 else "invalid_request_error"
    assert error["type"] == expected_type
    if param is not None:
        assert error["param"] == param
    assert words.lower() in error["message"].lower()
    return error


def _still_serves(client) -> None:
    response = client.post(CHAT, json=GOOD, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def _chat(**changes):
    return {**GOOD, **changes}


BAD_BODIES = [
    # (body, status, param, words in the message)
    ([1, 2], 400, None, "JSON object"),
    (_chat(max_tokens="5"), 400, "max_tokens", "valid integer"),
    (_chat(max_tokens=4.0), 400, "max_tokens", "valid integer"),
    (_chat(max_tokens=True), 400, "max_tokens", "valid integer"),
    (_chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    (_chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (_chat(max_tokens=10**12), 400, "max_tokens", "more than this server allows"),
    (
        _chat(max_tokens=None, max_completion_tokens=10**6),
        400,
        "max_tokens",
        "more than this server allows",
    ),
    (_chat(temperature="hot"), 400, "temperature", "valid number"),
    (_chat(temperature=-0.5), 400, "temperature", "greater than or equal to 0"),
    (_chat(stream="yes"), 400, "stream", "valid boolean"),
    (_chat(messages="hi"), 400, "messages", "valid list"),
    (_chat(messages=[]), 400, "messages", "empty"),
    ({"max_tokens": 4}, 400, "messages", "missing"),
    (_chat(messages=[{"role": "user"}]), 400, "messages.0.content", "string"),
    (_chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages.0.role", "one of"),
    (_chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content", "string"),
    (_chat(model="gpt-4o"), 404, "model", "does not exist"),
    (_chat(stepz=8), 400, "stepz", "unrecognized"),
    (_chat(n=2), 400, "n", "n=1"),
    (_chat(top_p=0.5), 400, "top_p", "not supported"),
    (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (_chat(stop=5), 400, "stop", "string"),
    (_chat(preset="turbo"), 400, "preset", "unknown preset"),
    (_chat(threshold=0), 400, "threshold", "threshold"),
    (_chat(remasking="sometimes"), 400, "remasking", ""),
    (_chat(max_tokens=None, gen_length=50, block_length=32), 400, "gen_length", "multiple"),
    (_chat(gen_length=16, block_length=8, steps=5), 400, "steps", "multiple"),
    (_chat(max_tokens=40, gen_length=32), 400, "max_tokens", "more than gen_length"),
    (_chat(steps=10**7), 400, "steps", "more than this server allows"),
    (_chat(stream_options={"include_usage": True}), 400, "stream_options", "stream=true"),
    (_chat(messages=[{"role": "user", "content": "word " * 300}]), 400, "messages", "tokens"),
]


@pytest.mark.parametrize("body, status, param, words", BAD_BODIES)
def test_bad_chat_requests_are_explained_and_the_server_keeps_serving(
    client, body, status, param, words
):
    _assert_error(client.post(CHAT, json=body, headers=AUTH), status, param, words)
    _still_serves(client)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": 5}, "prompt", "must be a string"),
        ({"prompt": []}, "prompt", "must be a string"),
        ({"prompt": [1, "a"]}, "prompt", "must be a string"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": [1, 2, 10**6]}, "prompt", "outside"),
        ({"prompt": "x", "echo": True}, "echo", "not supported"),
        ({"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ({"prompt": ["x"] * 40}, "prompt", "at most"),
    ],
)
def test_bad_completion_requests(client, body, param, words):
    response = client.post("/v1/completions", json={"max_tokens": 4, **body}, headers=AUTH)
    _assert_error(response, 400, param, words)
    _still_serves(client)


@pytest.mark.parametrize(
    "content", [b"{bad json", b"", b'{"messages": [], "max_tokens": NaN}', b"[" * 3000]
)
def test_malformed_json_is_a_400(client, content):
    response = client.post(
        CHAT, content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    _assert_error(response, 400)
    _still_serves(client)


def test_oversized_bodies_are_refused_with_413(client):
    body = _chat(messages=[{"role": "user", "content": "x" * 5000}])
    error = _assert_error(client.post(CHAT, json=body, headers=AUTH), 413, None, "larger than")
    assert error["code"] == "too_large"
    _still_serves(client)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"X-Api-Key": KEY}]
)
def test_missing_or_wrong_api_key_is_a_401(client, headers):
    for method, path in (("POST", CHAT), ("GET", "/v1/models")):
        response = client.request(method, path, json=GOOD, headers=headers)
        assert _assert_error(response, 401)["code"] == "invalid_api_key"
    _still_serves(client)


def test_health_and_metrics_need_no_key(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/metrics").status_code == 200


def test_unknown_routes_and_methods_answer_in_json(client):
    _assert_error(client.get("/v1/nothing", headers=AUTH), 404, None, "no such endpoint")
    response = client.get(CHAT, headers=AUTH)
    assert response.status_code == 405 and "error" in response.json()
    _still_serves(client)


def _sampling(room=None, **fields):
    return resolve_sampling(SamplerFields(**fields), DEFAULTS, "fast", ServeConfig(), room=room)


def test_without_max_tokens_the_answer_may_fill_the_context():
    # No context known: the server's max_gen_length (512), one step per token.
    s = _sampling()
    assert (s.config.gen_length, s.config.block_length, s.config.steps, s.max_tokens) == (
        512,
        32,
        512,
        512,
    )
    # What the context leaves after the prompt, in whole blocks of 32 (the canvas must fit).
    s = _sampling(room=100)
    assert (s.config.gen_length, s.config.steps, s.max_tokens) == (96, 96, 96)
    s = _sampling(room=20)  # less than a block: one block of what is left
    assert (s.config.gen_length, s.config.block_length, s.max_tokens) == (20, 20, 20)
    s = _sampling(room=5000)  # never beyond max_gen_length
    assert s.config.gen_length == 512
    assert _sampling(room=100, max_tokens=40).config.gen_length == 64  # max_tokens wins


def test_max_tokens_sets_the_canvas_and_the_cut():
    assert _sampling().decode == PRESETS["fast"]
    s = _sampling(max_tokens=40)  # rounded up to whole blocks, cut at 40
    assert (s.config.gen_length, s.config.block_length, s.config.steps, s.max_tokens) == (
        64,
        32,
        64,
        40,
    )
    s = _sampling(max_tokens=20)  # smaller than a block: one block of 20
    assert (s.config.gen_length, s.config.block_length, s.config.steps) == (20, 20, 20)
    s = _sampling(max_tokens=100, block_length=8, steps=26)
    assert (s.config.gen_length, s.config.block_length, s.config.steps) == (104, 8, 26)
    s = _sampling(gen_length=96, max_tokens=10, temperature=0.5, preset="reference")
    assert (s.config.gen_length, s.config.block_length, s.max_tokens) == (96, 32, 10)
    assert s.config.temperature == 0.5 and s.decode == PRESETS["reference"]
    assert _sampling(threshold=0.5).decode.threshold == 0.5
    half = resolve_sampling(
        SamplerFields(max_tokens=96),
        GenerateConfig(steps=32, gen_length=64, block_length=32),
        "fast",
        ServeConfig(),
    )
    assert half.config.steps == 48  # the server's steps per token, whole steps per block
    with pytest.raises(RequestError, match="multiple of block_length"):
        _sampling(gen_length=50)  # block 32 by default
    with pytest.raises(RequestError, match="more than this server allows"):
        resolve_sampling(
            SamplerFields(max_tokens=65), DEFAULTS, "fast", ServeConfig(max_gen_length=64)
        )


def test_chat_messages_accept_text_parts_and_developer_role():
    request = parse_body(
        ChatCompletionRequest,
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        },
    )
    assert request.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
    ]


def test_streamed_text_holds_back_a_possible_stop_string_or_split_character():
    assert _hold_back("hello wor", ["world"]) == "hello "
    assert _hold_back("hello", ["xyz"]) == "hello"
    assert _hold_back("abc\ufffd", []) == "abc"
    assert _hold_back("abcEN", ["END", "N!"]) == "abc"


def test_serve_config_is_validated():
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="api_key"):
        ServeConfig(api_key=" ")
    assert "sk-" not in repr(ServeConfig(api_key="sk-secret"))


def test_cli_registers_serve_without_importing_fastapi_or_torch():
    code = (
        "import sys; from llada.cli.main import build_parser; "
        "args = build_parser().parse_args(['serve', '--port', '0', '--max-queue', '3']); "
        "from llada.cli.options import sampler_config; c = sampler_config(args); "
        "print(args.run.__module__, args.port, args.max_queue, args.preset, c.gen_length, "
        "c.block_length, c.steps, args.host, 'fastapi' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [
        "llada.cli.serve",
        "0",
        "3",
        "None",  # the family's preset, chosen once the model is read
        "64",  # the serve profile (steps per token and block; no checkpoint read yet)
        "32",
        "64",
        "127.0.0.1",
        "False",
        "False",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        # OpenCompass's `OpenAI` model posts exactly these fields (plus model and messages).
        {"n": 1, "logprobs": False, "top_logprobs": None, "stop": None, "temperature": 0.0},
        # Its `OpenAISDK` model, through the openai client: temperature may be None.
        {"n": 1, "temperature": None},
    ],
)
def test_opencompass_request_bodies_are_served(client, extra):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 3 + 4?"},
    ]
    body = {"model": client.get("/v1/models", headers=AUTH).json()["data"][0]["id"]}
    body.update(messages=messages, max_tokens=8, **extra)
    response = client.post(CHAT, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in (
        "stop",
        "length",
    )


def test_bookkeeping_fields_of_openai_clients_are_accepted_and_named(client):
    """store, parallel_tool_calls, service_tier, user, metadata: sent by OpenAI clients, no
    effect on the answer here: served, with the same answer, and named in a header; fields
    that would change the answer (tools, response_format) stay refused."""
    plain = client.post(CHAT, json=GOOD, headers=AUTH)
    assert plain.status_code == 200 and "x-llada-ignored-fields" not in plain.headers
    extra = {"store": False, "parallel_tool_calls": True, "service_tier": "auto", "user": "u1"}
    noted = client.post(CHAT, json={**GOOD, **extra}, headers=AUTH)
    assert noted.status_code == 200, noted.text
    assert (
        noted.headers["x-llada-ignored-fields"] == "user, store, parallel_tool_calls, service_tier"
    )
    assert noted.json()["choices"] == plain.json()["choices"]
    streamed = client.post(CHAT, json={**GOOD, "store": True, "stream": True}, headers=AUTH)
    assert streamed.headers["x-llada-ignored-fields"] == "store"
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for field, value in (("tools", [tool]), ("response_format", {"type": "json_object"})):
        refused = client.post(CHAT, json={**GOOD, field: value}, headers=AUTH)
        assert refused.status_code == 400, field
