"""One demo turn: live frames from the sampling loop, constraints, settings errors, the CLI."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

import gradio as gr  # noqa: E402

import llada.demo.session as session_module  # noqa: E402
from llada.api import load  # noqa: E402
from llada.cli.main import main  # noqa: E402
from llada.demo.app import build_app, make_respond  # noqa: E402
from llada.demo.session import DemoSettings, stream_turn  # noqa: E402

# respond(message, history, gen_length, steps, block_length, temperature, cfg_scale,
#         remasking, preset, constraints)
SETTINGS = (16, 8, 8, 0.0, 0.0, "low_confidence", "reference", "")


@pytest.fixture(scope="module")
def loaded(chat_checkpoint):
    model, tokenizer, _ = load(chat_checkpoint)
    return model, tokenizer


@pytest.fixture
def counted_steps(monkeypatch):
    """Counts the StepEvents the sampling loop has produced so far."""
    produced = []
    real = session_module.denoise

    def counting(*args, **kwargs):
        for event in real(*args, **kwargs):
            produced.append(event.step)
            yield event

    monkeypatch.setattr(session_module, "denoise", counting)
    return produced


def test_handler_yields_each_step_while_the_model_runs(loaded, counted_steps):
    model, tokenizer = loaded
    respond = make_respond(model, tokenizer, max_gen_length=64)
    seen_when_yielded, outputs = [], []
    for output in respond("Hello there", [], *SETTINGS):
        seen_when_yielded.append(len(counted_steps))
        outputs.append(output)
    canvases = [canvas for _, canvas, _, _ in outputs]
    chat, _, history, box = outputs[-1]
    assert all(box == "" for *_, box in outputs)
    # 2 blocks x 4 steps: one frame per step, each sent before the next step runs, then the
    # final frame with the answer.
    assert seen_when_yielded == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert len(set(canvases)) >= 8
    masked = [int(c.split('data-masked="')[1].split('"')[0]) for c in canvases]
    assert masked[0] == 14 and masked[-1] == 0
    assert masked == sorted(masked, reverse=True)
    assert chat[-1]["role"] == "assistant" and "denoising" not in chat[-1]["content"]
    assert history == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": history[1]["content"]},
    ]


def test_constraints_are_in_the_final_answer(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(" question", add_special_tokens=False)
    settings = DemoSettings(gen_length=16, steps=8, block_length=8, constraints="0:question, 9:be")
    frames = list(stream_turn(model, tokenizer, [{"role": "user", "content": "Hi"}], settings))
    be = tokenizer.encode(" be", add_special_tokens=False)
    final = frames[-1].tokens
    assert final[: len(ids)] == ids
    assert final[9 : 9 + len(be)] == be
    assert frames[-1].answer.startswith(" question")
    assert all(f.answer is None for f in frames[:-1])
    assert frames[0].html.split('class="legend"')[0].count('class="tok fixed"') == len(ids) + len(
        be
    )

    respond = make_respond(model, tokenizer, max_gen_length=64)
    *_, (chat, canvas, history, _) = respond(
        "Hi", [], 16, 8, 8, 0.0, 0.0, "random", "fast", "0:question"
    )
    assert history[-1]["content"].startswith(" question")
    assert chat[-1]["content"].startswith("question")


def test_history_is_rendered_again_each_turn(loaded, monkeypatch):
    model, tokenizer = loaded
    prompts = []
    real = session_module.encode_chat
    monkeypatch.setattr(
        session_module,
        "encode_chat",
        lambda tok, messages: prompts.append(list(messages)) or real(tok, messages),
    )
    respond = make_respond(model, tokenizer, max_gen_length=64)
    *_, (_, _, history, _) = respond("first", [], *SETTINGS)
    *_, (chat, _, history, _) = respond("second", history, *SETTINGS)
    assert [m["role"] for m in prompts[1]] == ["user", "assistant", "user"]
    assert prompts[1][0]["content"] == "first" and prompts[1][2]["content"] == "second"
    assert len(chat) == len(history) == 4


@pytest.mark.parametrize(
    ("message", "settings", "error"),
    [
        ("hi", (12, 8, 8), "must be a multiple of block_length"),
        ("hi", (16, 3, 8), "steps \\(3\\) must be a multiple"),
        ("hi", (128, 128, 8), "above this server's limit of 64"),
        ("hi", (16.5, 8, 8), "gen_length must be a whole number"),
        ("  ", (16, 8, 8), "Type a message"),
    ],
)
def test_bad_settings_raise_a_gradio_error(loaded, message, settings, error):
    model, tokenizer = loaded
    respond = make_respond(model, tokenizer, max_gen_length=64)
    with pytest.raises(gr.Error, match=error):
        next(respond(message, [], *settings, 0.0, 0.0, "low_confidence", "reference", ""))


@pytest.mark.parametrize(
    ("constraints", "preset", "error"),
    [
        ("7 king", "reference", "position:word"),
        ("16:question", "reference", "gen_length=16"),
        ("", "nope", "unknown preset"),
    ],
)
def test_bad_constraints_and_presets_raise_a_gradio_error(loaded, constraints, preset, error):
    model, tokenizer = loaded
    respond = make_respond(model, tokenizer, max_gen_length=64)
    with pytest.raises(gr.Error, match=error):
        next(respond("hi", [], 16, 8, 8, 0.0, 0.0, "low_confidence", preset, constraints))


def test_build_app_refuses_bad_limits(loaded):
    with pytest.raises(ValueError, match="max_gen_length"):
        build_app(*loaded, max_gen_length=0)


def test_cli_builds_and_launches_the_page(chat_checkpoint, monkeypatch):
    import llada.demo.app as app_module

    launched = {}
    monkeypatch.setattr(
        app_module,
        "launch",
        lambda app, host, port, block: launched.update(app=app, host=host, port=port),
    )
    code = main(["demo", "--model", str(chat_checkpoint), "--port", "0", "--max-gen-length", "32"])
    assert code == 0
    assert isinstance(launched["app"], gr.Blocks)
    assert launched["host"] == "127.0.0.1" and launched["port"] == 0


def test_cli_rejects_a_bad_limit(capsys):
    assert main(["demo", "--max-gen-length", "0"]) == 2
    assert "--max-gen-length must be at least 1" in capsys.readouterr().err
