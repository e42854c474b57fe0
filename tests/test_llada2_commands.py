"""Every inference command on a tiny random LLaDA 2.x: `llada generate`, `llada chat`, the
server, the demo and `llada eval tasks` decode it with its own block sampler (the exact block KV
cache, `block_sample`), by default with the authors' preset, with the LLaDA 2.x flags and
request fields (top_k, top_p, threshold, editing); the other family's presets and settings are
one clear error. Answers are compared with `block_sample` called directly."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import llada
from llada.api import ChatSession, default_decode, generate_texts, load
from llada.cli.main import main
from llada.model.llada2 import LLaDA2Model
from llada.sampling.config import BlockDecodeConfig, GenerateConfig, decode_preset
from llada.tokenizer import encode_chat

sys.path.insert(0, str(Path(__file__).parent / "serve"))

PROMPTS = ["To be, or not", "What is 2 + 3?"]
SMALL = GenerateConfig(steps=8, gen_length=16, block_length=8)
SMALL_ARGS = ["--gen-length", "16", "--steps", "8", "--block-length", "8"]


@pytest.fixture(scope="module")
def checkpoint(llada2_varied_checkpoint) -> Path:
    return llada2_varied_checkpoint


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tokenizer, is_random = load(checkpoint)
    assert not is_random
    return model, tokenizer


def block_answers(model, tokenizer, prompts, config, decode: BlockDecodeConfig) -> list[str]:
    """What a command should print: `block_sample` on the chat-rendered prompts, cut at the
    first EOS / end of turn, decoded without special tokens."""
    encoded = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    options = asdict(decode) | dict(
        gen_length=config.gen_length,
        block_length=config.block_length,
        steps=config.steps // (config.gen_length // config.block_length),
        temperature=config.temperature,
    )
    result = llada.block_sample(model, encoded, **options)
    texts = []
    for answer in result.answers:
        ids = answer.tolist()
        stop = next((i for i, t in enumerate(ids) if t in model.special_tokens.stop_ids), None)
        texts.append(tokenizer.decode(ids[:stop], skip_special_tokens=True))
    return texts


def test_the_checkpoint_is_llada2_with_the_role_tokens_and_its_default_preset(
    loaded, checkpoint, tmp_path
):
    model, tokenizer = loaded
    assert isinstance(model, LLaDA2Model) and model.block_diffusion
    ids = tokenizer.convert_tokens_to_ids
    assert model.special_tokens.mask_id == ids("<|mask|>")
    assert model.special_tokens.stop_ids == (ids("<|endoftext|>"), ids("<|role_end|>"))
    assert default_decode(model) == default_decode(model, interactive=False) == "llada2.0"
    named = tmp_path / "LLaDA2.1-mini"
    named.symlink_to(checkpoint)
    assert default_decode(llada.load_model(named)) == "llada2.1-quality"


def test_generate_command_decodes_with_the_block_sampler(checkpoint, loaded, capsys):
    model, tokenizer = loaded
    args = ["generate", "--model", str(checkpoint), *SMALL_ARGS, "--jsonl"]
    assert main([*args, *PROMPTS]) == 0
    printed = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    expected = block_answers(model, tokenizer, PROMPTS, SMALL, decode_preset("llada2.0"))
    assert printed == expected == generate_texts(model, tokenizer, PROMPTS, SMALL)
    assert any(printed)

    quality = decode_preset("llada2.1-quality")
    for flags, changes in (
        (["--threshold", "0.05"], dict(threshold=0.05)),
        (["--editing-threshold", "0.05"], dict(editing_threshold=0.05)),
    ):
        assert main([*args, "--preset", "llada2.1-quality", *flags, *PROMPTS]) == 0
        printed = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
        decode = replace(quality, **changes)
        assert printed == block_answers(model, tokenizer, PROMPTS, SMALL, decode)
        assert printed != block_answers(model, tokenizer, PROMPTS, SMALL, quality)

    # top_k / top_p filter what is drawn at temperature > 0 (the seed is the command's)
    sampled = [*args, "--temperature", "1", "--seed", "3", "--top-k", "2", "--top-p", "0.9"]
    assert main([*sampled, *PROMPTS]) == 0
    printed = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    config = replace(SMALL, temperature=1.0)
    outcomes = []
    for changes in (dict(top_k=2, top_p=0.9), {}):
        torch.manual_seed(3)
        decode = replace(decode_preset("llada2.0"), **changes)
        outcomes.append(block_answers(model, tokenizer, PROMPTS, config, decode))
    assert printed == outcomes[0] != outcomes[1]


def test_the_other_familys_presets_and_flags_are_one_line(checkpoint, chat_checkpoint, capsys):
    base = ["generate", *SMALL_ARGS, "hi"]
    assert main([*base, "--model", str(checkpoint), "--preset", "fast"]) == 2
    assert "LLaDA 2.x model (block diffusion); choose one of llada2.0" in capsys.readouterr().err
    assert main([*base, "--model", str(checkpoint), "--cfg-scale", "1"]) == 2
    assert "cfg_scale=1.0 is a LLaDA-8B sampler setting" in capsys.readouterr().err
    assert main([*base, "--model", str(checkpoint), "--top-p", "1.5"]) == 2
    assert "--top-p: top_p must be None or in (0, 1]" in capsys.readouterr().err
    assert main([*base, "--model", str(chat_checkpoint), "--top-k", "5"]) == 2
    assert "--top-k is a LLaDA 2.x sampler flag" in capsys.readouterr().err
    assert main([*base, "--model", str(chat_checkpoint), "--preset", "llada2.0"]) == 2
    assert "--preset llada2.0 is for LLaDA 2.x models" in capsys.readouterr().err


def test_chat_command_answers_as_the_block_sampler(checkpoint, loaded, monkeypatch, capsys):
    model, tokenizer = loaded
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/set preset=fast\n/quit\n"))
    assert main(["chat", "--model", str(checkpoint), *SMALL_ARGS]) == 0
    out = capsys.readouterr()
    session = ChatSession(model, tokenizer, SMALL)
    assert session.decode == "llada2.0"
    first = session.reply("hello")
    assert out.out.splitlines() == [first, session.reply("again")]
    assert first == block_answers(model, tokenizer, ["hello"], SMALL, decode_preset("llada2.0"))[0]
    assert "choose one of llada2.0" in out.err  # /set preset=fast refused, the chat goes on


def test_server_decodes_with_the_block_sampler_and_its_request_fields(loaded):
    from fastapi.testclient import TestClient

    from llada.serve.app import create_app
    from llada.serve.config import ServeConfig

    model, tokenizer = loaded
    app = create_app(model, tokenizer, ServeConfig())
    # max_tokens 32: one block of 32 with 32 steps (the server's steps per token).
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    body = {"messages": messages, "max_tokens": 32}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        fields = {"top_k": 4, "top_p": 0.9, "threshold": 0.5, "preset": "llada2.1-quality"}
        tuned = client.post("/v1/chat/completions", json=body | fields).json()
        chunks = []
        with client.stream(
            "POST", "/v1/chat/completions", json=body | fields | {"stream": True}
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    chunks.append(delta.get("content") or "")
        wrong = {
            "cfg_scale": client.post("/v1/chat/completions", json=body | {"cfg_scale": 1.0}),
            "preset": client.post("/v1/chat/completions", json=body | {"preset": "fast"}),
            "top_p": client.post("/v1/chat/completions", json=body | {"top_p": 0}),
        }
    expected = block_answers(model, tokenizer, [PROMPTS[1]], config, decode_preset("llada2.0"))
    assert plain["choices"][0]["message"]["content"] == expected[0]
    decode = replace(decode_preset("llada2.1-quality"), top_k=4, top_p=0.9, threshold=0.5)
    expected = block_answers(model, tokenizer, [PROMPTS[1]], config, decode)
    assert tuned["choices"][0]["message"]["content"] == expected[0] == "".join(chunks)
    for field, response in wrong.items():
        assert response.status_code == 400, field
        assert response.json()["error"]["param"] == field


def test_a_dense_server_refuses_the_block_fields(tiny_model):
    from llada.serve.config import ServeConfig
    from llada.serve.schemas import RequestError, SamplerFields, resolve_sampling

    defaults = GenerateConfig(steps=32, gen_length=32, block_length=32)
    with pytest.raises(RequestError, match="top_k is a LLaDA 2.x sampler setting"):
        resolve_sampling(SamplerFields(top_k=3), defaults, "fast", ServeConfig())
    with pytest.raises(RequestError, match="top_p is not supported"):
        resolve_sampling(SamplerFields(top_p=0.5), defaults, "fast", ServeConfig())


def test_demo_shows_the_block_samplers_steps_and_edits(loaded):
    from llada.demo.render import EDITED, DenoiseTrace, render_canvas
    from llada.demo.session import DemoSettings, stream_turn

    model, tokenizer = loaded
    settings = DemoSettings(gen_length=16, steps=8, block_length=8, preset="llada2.1-quality")
    messages = [{"role": "user", "content": PROMPTS[0]}]
    frames = list(stream_turn(model, tokenizer, messages, settings))
    expected = generate_texts(model, tokenizer, [PROMPTS[0]], SMALL, decode="llada2.1-quality")
    assert frames[-1].answer == expected[0]
    with pytest.raises(ValueError, match="word constraints are a LLaDA-8B sampler feature"):
        list(stream_turn(model, tokenizer, messages, replace(settings, constraints="0:be")))

    # Editing everything it can (threshold 0): the trace marks the rewritten positions.
    decode = BlockDecodeConfig(version="2.1", threshold=0.5, editing_threshold=0.0)
    prompt = torch.tensor([encode_chat(tokenizer, messages)])
    trace = DenoiseTrace(tokenizer, model.special_tokens.mask_id, 16)
    seen = 0
    for event in llada.denoise(model, prompt, None, SMALL, decode):
        trace.update(event)
        edited = event.edited[0, -16:]
        states = [cell.state for cell in trace.cells()]
        assert [s == EDITED for s in states] == (
            edited & (event.tokens[0, -16:] != model.special_tokens.mask_id)
        ).tolist()
        seen += int(edited.sum())
        if edited.any():
            assert "rewritten this step" in render_canvas(trace.cells())
    assert seen > 0


def test_demo_handler_and_command_take_the_familys_presets(checkpoint, loaded, monkeypatch):
    gr = pytest.importorskip("gradio")
    import llada.demo.app as app_module
    from llada.demo.app import make_respond

    model, tokenizer = loaded
    respond = make_respond(model, tokenizer, max_gen_length=64)
    frames = list(respond(PROMPTS[1], [], 16, 8, 8, 0.0, 0.0, "low_confidence", "llada2.0", ""))
    *_, (_, _, history, _) = frames
    expected = generate_texts(model, tokenizer, [PROMPTS[1]], SMALL, decode="llada2.0")[0]
    assert history[-1] == {"role": "assistant", "content": expected}
    with pytest.raises(gr.Error):
        list(respond(PROMPTS[1], [], 16, 8, 8, 0.0, 0.0, "low_confidence", "fast", ""))

    launched = {}
    monkeypatch.setattr(
        app_module, "launch", lambda app, host, port, block: launched.update(app=app)
    )
    assert main(["demo", "--model", str(checkpoint), "--port", "0"]) == 0
    assert isinstance(launched["app"], gr.Blocks)


def test_eval_tasks_command_decodes_with_the_familys_preset(
    checkpoint, monkeypatch, tmp_path, capsys
):
    import llada.api

    calls = []
    real = llada.api.generate_texts

    def recording(model_, tokenizer_, prompts, config, **kwargs):
        answers = real(model_, tokenizer_, prompts, config, **kwargs)
        calls.append((type(model_), kwargs["decode"]))
        return answers

    monkeypatch.setattr(llada.api, "generate_texts", recording)
    out = tmp_path / "results.json"
    args = ["eval", "tasks", "--model", str(checkpoint), "--no-lines"]
    args += ["--per-task", "2", "--tasks", "copy", *SMALL_ARGS, "--json", str(out)]
    assert main([*args, "--top-k", "3"]) == 0
    capsys.readouterr()
    assert calls and all(kind is LLaDA2Model for kind, _ in calls)
    assert all(decode == replace(decode_preset("llada2.0"), top_k=3) for _, decode in calls)
    recorded = json.loads(out.read_text())["preset"]
    assert recorded["version"] == "2.0" and recorded["top_k"] == 3


def test_the_live_chat_view_marks_the_rewritten_tokens(loaded):
    from llada.cli.live import answer_view

    model, tokenizer = loaded
    mask_id = model.special_tokens.mask_id
    decode = BlockDecodeConfig(version="2.1", threshold=0.5, editing_threshold=0.0)
    prompt = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": PROMPTS[0]}])])
    marked = 0
    for event in llada.denoise(model, prompt, None, SMALL, decode):
        view = answer_view(event, 16, tokenizer, mask_id)
        styles = [span.style for span in view.spans]
        edited = event.edited[0, -16:] & (event.tokens[0, -16:] != mask_id)
        texts = [tokenizer.decode([t], skip_special_tokens=True) for t in event.tokens[0, -16:]]
        shown = sum(bool(texts[i]) for i in edited.nonzero().flatten().tolist())
        assert styles.count("bold magenta underline") == shown
        marked += shown
    assert marked > 0
