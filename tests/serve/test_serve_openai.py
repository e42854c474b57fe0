"""The official `openai` client against a live `llada serve` app: models, completions, chat,
streaming, usage, stop strings, max_tokens and the sampler's extra body fields, compared with
what the library computes for the same settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import library_answer, live_server

from llada.api import generate_texts, load
from llada.inputs import context_of
from llada.sampling.config import GenerateConfig
from llada.serve.app import create_app
from llada.serve.config import ServeConfig
from llada.tokenizer import encode_chat

openai = pytest.importorskip("openai")

API_KEY = "sk-test-key"
PROMPTS = ["To be, or not", "What is 2 + 3?", "The answer", "question"]


@pytest.fixture(scope="module")
def served(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    app = create_app(model, tokenizer, ServeConfig(api_key=API_KEY))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        yield {
            "url": url,
            "client": client,
            "model": model,
            "tokenizer": tokenizer,
            "name": chat_checkpoint.name,
        }


def test_models_list_names_the_model_folder(served):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == [served["name"]]
    assert client.models.retrieve(served["name"]).id == served["name"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_wrong_api_key_is_refused(served):
    client = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    response = httpx.get(f"{served['url']}/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_chat_completion_equals_the_library_and_counts_tokens(served):
    client, model, tokenizer = served["client"], served["model"], served["tokenizer"]
    for prompt in PROMPTS[:2]:
        reply = client.chat.completions.create(
            model=served["name"], messages=[{"role": "user", "content": prompt}]
        )
        # Without max_tokens: what the context leaves after the prompt in whole blocks of 32,
        # up to the server's max_gen_length (512), one step per token, the 'fast' preset.
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        room = context_of(model)[0] - len(prompt_ids)
        canvas = min(512, room // 32 * 32)
        config = GenerateConfig(steps=canvas, gen_length=canvas, block_length=32)
        expected = generate_texts(model, tokenizer, [prompt], config, decode="fast")[0]
        assert len(reply.choices) == 1
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        _, answer_tokens = library_answer(model, tokenizer, prompt_ids, config, "fast", canvas)
        usage = reply.usage
        assert usage.prompt_tokens == len(prompt_ids)
        assert usage.completion_tokens == answer_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert reply.choices[0].finish_reason == ("stop" if answer_tokens < 64 else "length")


def test_completion_with_max_tokens_off_the_block_grid(served):
    client, model, tokenizer = served["client"], served["model"], served["tokenizer"]
    ids = tokenizer("To be", add_special_tokens=False)["input_ids"]
    # 40 tokens: a canvas of 64 (two blocks of 32) cut at 40; 16: one block of 16.
    for max_tokens, config in (
        (40, GenerateConfig(steps=64, gen_length=64, block_length=32)),
        (16, GenerateConfig(steps=16, gen_length=16, block_length=16)),
    ):
        reply = client.completions.create(
            model=served["name"], prompt="To be", max_tokens=max_tokens
        )
        text, tokens = library_answer(model, tokenizer, ids, config, "fast", max_tokens)
        assert reply.choices[0].text == text
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == tokens <= max_tokens


def test_completion_of_several_prompts_gives_one_choice_each(served):
    client, model, tokenizer = served["client"], served["model"], served["tokenizer"]
    reply = client.completions.create(model=served["name"], prompt=PROMPTS[:3], max_tokens=32)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    total = 0
    for choice, prompt in zip(reply.choices, PROMPTS[:3], strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text, tokens = library_answer(model, tokenizer, ids, config, "fast", 32)
        assert choice.text == text
        total += tokens
    assert reply.usage.completion_tokens == total


def test_sampler_settings_as_extra_body_fields(served):
    client, model, tokenizer = served["client"], served["model"], served["tokenizer"]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    extra = {"gen_length": 32, "block_length": 8, "steps": 16, "preset": "reference"}
    reply = client.chat.completions.create(
        model=served["name"], messages=messages, temperature=0, extra_body=extra
    )
    config = GenerateConfig(steps=16, gen_length=32, block_length=8)
    ids = encode_chat(tokenizer, messages)
    text, tokens = library_answer(model, tokenizer, ids, config, "reference", 32)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == tokens
    with pytest.raises(openai.BadRequestError, match="multiple of block_length"):
        client.chat.completions.create(
            model=served["name"],
            messages=messages,
            extra_body={"gen_length": 30, "block_length": 8},
        )


def _stream_chat(client, name, messages, **kwargs):
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return "".join(content), chunks[-1].usage, reasons[-1]


def test_streamed_chat_concatenates_to_the_plain_answer(served):
    client, name = served["client"], served["name"]
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        # 96 tokens in blocks of 16: text arrives block by block.
        settings = {"max_tokens": 96, "extra_body": {"block_length": 16}}
        plain = client.chat.completions.create(model=name, messages=messages, **settings)
        text, usage, reason = _stream_chat(client, name, messages, **settings)
        assert text == plain.choices[0].message.content
        assert reason == plain.choices[0].finish_reason
        assert usage.model_dump() == plain.usage.model_dump()


def test_stream_sends_text_as_blocks_are_finalised(served):
    """With a long answer in small blocks, text comes in several chunks, each a whole number
    of blocks."""
    url, name = served["url"], served["name"]
    body = {
        "model": name,
        "prompt": PROMPTS[0],
        "max_tokens": 64,
        "stream": True,
        "block_length": 8,
        "preset": "fastdllm-dual",  # no early stop: every block is decoded
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert sum(bool(t) for t in texts) >= 2


def test_stop_strings_cut_the_text_streamed_or_not(served):
    client, name = served["client"], served["name"]
    checked = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        full = client.chat.completions.create(model=name, messages=messages)
        text = full.choices[0].message.content
        windows = [
            text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2]
        ]
        if not windows:
            continue
        stop = windows[len(windows) // 2]
        expected = text[: text.find(stop)]
        cut = client.chat.completions.create(model=name, messages=messages, stop=[stop, "\x00\x00"])
        assert cut.choices[0].message.content == expected
        assert cut.choices[0].finish_reason == "stop"
        streamed, _, reason = _stream_chat(client, name, messages, stop=stop)
        assert streamed == expected and reason == "stop"
        checked += 1
    assert checked >= 2


def test_seeded_sampling_is_reproducible(served):
    client, name = served["client"], served["name"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    settings = {"temperature": 1.0, "seed": 1234, "max_tokens": 32}
    first = client.chat.completions.create(model=name, messages=messages, **settings)
    again = client.chat.completions.create(model=name, messages=messages, **settings)
    assert first.choices[0].message.content == again.choices[0].message.content


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_llada_serve_command(chat_checkpoint, tmp_path):
    """`llada serve` as a user runs it: it binds 127.0.0.1, checks the key from LLADA_API_KEY,
    answers, and stops on SIGINT."""
    port = _free_port()
    command = [sys.executable, "-m", "llada.cli.main", "serve", "--model", str(chat_checkpoint)]
    command += ["--port", str(port), "--served-model-name", "tiny", "--max-gen-length", "32"]
    command += ["--gen-length", "32", "--steps", "32"]
    env = {**os.environ, "LLADA_API_KEY": "sk-env", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="To be", max_tokens=8)
        assert reply.usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="more than this server allows"):
            client.completions.create(model="tiny", prompt="To be", max_tokens=64)
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, 130), log.read_text()
