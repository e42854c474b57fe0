"""The Gradio page of `llada demo`: a chat, the sampler's controls, and the answer canvas redrawn
live after every denoising step (in the spirit of the reference app.py of ML-GSAI/LLaDA).

gradio is an optional extra: it is imported when a page is built, never at import time. The page
runs offline: Gradio serves its frontend from the package, analytics are off and no share link
is made.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..api import default_decode
from ..sampling.config import (
    BLOCK_PRESETS,
    PRESETS,
    REMASKING_CHOICES,
    GenerateConfig,
    coerce_setting,
)
from .constraints import EXAMPLE, parse_constraints, place_constraints
from .render import render_placeholder
from .session import DemoSettings, stream_turn

logger = logging.getLogger(__name__)

DEFAULTS = DemoSettings()
PLACEHOLDER = "The answer appears here, position by position, while the model denoises it."
THINKING = "*denoising\u2026*"


def import_gradio() -> Any:
    """gradio, with its analytics (and version check) off; a clear message when missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            "llada demo needs gradio; install it with: pip install 'llada-kit[demo]'"
        ) from error
    return gradio


def _whole(name: str, value: Any) -> int:
    """A slider's number as an int (sliders may send 64.0), refusing fractions."""
    return coerce_setting(GenerateConfig, name, value)


def make_respond(
    model: torch.nn.Module, tokenizer: Any, max_gen_length: int
) -> Callable[..., Iterator[tuple]]:
    """The page's send handler. It is a generator: Gradio sends each of its values to the
    browser as soon as it is yielded, so the canvas is redrawn after every step, while the
    model is still running. Each value is (chat messages, canvas HTML, history, message box)."""
    gr = import_gradio()

    def respond(
        message: str,
        history: list[dict[str, str]],
        gen_length: float,
        steps: float,
        block_length: float,
        temperature: float,
        cfg_scale: float,
        remasking: str,
        preset: str,
        constraints: str,
    ) -> Iterator[tuple]:
        message = (message or "").strip()
        if not message:
            raise gr.Error("Type a message first.", title="Nothing to answer")
        try:
            settings = DemoSettings(
                gen_length=_whole("gen_length", gen_length),
                steps=_whole("steps", steps),
                block_length=_whole("block_length", block_length),
                temperature=float(temperature),
                cfg_scale=float(cfg_scale),
                remasking=remasking,
                preset=preset,
                constraints=constraints or "",
            )
            if settings.gen_length > max_gen_length:
                raise ValueError(
                    f"gen_length ({settings.gen_length}) is above this server's limit of "
                    f"{max_gen_length} tokens (llada demo --max-gen-length)"
                )
            fixed = place_constraints(
                parse_constraints(settings.constraints), tokenizer, settings.gen_length
            )
            if fixed and getattr(model, "block_diffusion", False):
                raise ValueError(
                    "word constraints are a LLaDA-8B sampler feature; LLaDA 2.x's block "
                    "sampler starts every answer from [MASK]: clear the constraints"
                )
            if settings.preset not in _presets(model):
                raise ValueError(
                    f"preset {settings.preset!r} is not for this model; choose from "
                    f"{sorted(_presets(model))}"
                )
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error), title="Invalid settings") from None
        messages = [*history, {"role": "user", "content": message}]
        shown = [*messages, {"role": "assistant", "content": THINKING}]
        for frame in stream_turn(model, tokenizer, messages, settings):
            if frame.answer is None:
                yield shown, frame.html, history, ""
                continue
            final = [*messages, {"role": "assistant", "content": frame.answer}]
            reply = frame.answer.strip() or "*(empty answer)*"
            shown = [*messages, {"role": "assistant", "content": reply}]
            yield shown, frame.html, final, ""

    return respond


def build_app(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    model_name: str = "",
    is_random: bool = False,
    max_gen_length: int = 512,
    preset: str | None = None,
) -> Any:
    """The demo page (a `gr.Blocks`) for a loaded model; launch it with `launch`. preset: the
    decoding preset shown first (None: the model family's, `llada.api.default_decode`)."""
    if max_gen_length < 1:
        raise ValueError(f"max_gen_length must be at least 1, got {max_gen_length}")
    if preset is None:
        preset = default_decode(model)
    if preset not in _presets(model):
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(_presets(model))}")
    gr = import_gradio()
    respond = make_respond(model, tokenizer, max_gen_length)
    note = " (random weights: the answers are noise)" if is_random else ""
    with gr.Blocks(title="LLaDA demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## LLaDA: watch a masked diffusion model write its answer\n"
            f"Model: `{model_name or 'loaded model'}`{note}. The answer starts fully masked; "
            "each step the model predicts every masked position and commits some of them."
        )
        history = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                chat = gr.Chatbot(label="Chat", height=440, elem_id="chat", feedback_options=None)
                message = gr.Textbox(
                    label="Message",
                    placeholder="Type a message and press Enter",
                    lines=1,
                    elem_id="message",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
            with gr.Column(scale=6):
                gr.Markdown("### Denoising, step by step")
                canvas = gr.HTML(render_placeholder(PLACEHOLDER), elem_id="canvas")
                with gr.Row():
                    gen_length = gr.Slider(
                        1,
                        max_gen_length,
                        value=min(DEFAULTS.gen_length, max_gen_length),
                        step=1,
                        label="gen_length",
                        elem_id="gen_length",
                        info="answer tokens",
                    )
                    steps = gr.Slider(
                        1,
                        max(max_gen_length, DEFAULTS.steps),
                        value=DEFAULTS.steps,
                        step=1,
                        label="steps",
                        elem_id="steps",
                        info="in total, split over the blocks",
                    )
                    block_length = gr.Slider(
                        1,
                        max_gen_length,
                        value=min(DEFAULTS.block_length, max_gen_length),
                        step=1,
                        label="block_length",
                        elem_id="block_length",
                        info="gen_length must be a multiple",
                    )
                with gr.Row():
                    temperature = gr.Slider(
                        0,
                        2,
                        value=DEFAULTS.temperature,
                        step=0.05,
                        label="temperature",
                        elem_id="temperature",
                    )
                    cfg_scale = gr.Slider(
                        0,
                        5,
                        value=DEFAULTS.cfg_scale,
                        step=0.1,
                        label="CFG scale",
                        elem_id="cfg_scale",
                    )
                with gr.Row():
                    remasking = gr.Radio(
                        list(REMASKING_CHOICES),
                        value=DEFAULTS.remasking,
                        label="remasking",
                        elem_id="remasking",
                    )
                    decode = gr.Dropdown(
                        sorted(_presets(model)),
                        value=preset,
                        label="preset",
                        elem_id="preset",
                        info="'reference': the published sampler; 'fast': KV cache + parallel",
                    )
                constraints = gr.Textbox(
                    label="Word constraints",
                    placeholder=f"position:word, ... e.g. {EXAMPLE}",
                    info="words fixed in the answer before denoising (0 = first answer token)",
                    elem_id="constraints",
                )
        inputs = [
            message,
            history,
            gen_length,
            steps,
            block_length,
            temperature,
            cfg_scale,
            remasking,
            decode,
            constraints,
        ]
        outputs = [chat, canvas, history, message]
        send.click(respond, inputs, outputs)
        message.submit(respond, inputs, outputs)
        clear.click(
            lambda: ([], render_placeholder(PLACEHOLDER), [], ""),
            None,
            outputs,
            queue=False,
        )
    return app


def _presets(model: torch.nn.Module) -> dict:
    """The decoding presets of the model's family."""
    return BLOCK_PRESETS if getattr(model, "block_diffusion", False) else PRESETS


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True) -> Any:
    """Serve the page on host:port (0: a free port; no share link). One generation runs at a
    time, others wait in Gradio's queue; with block=False it returns at once (stop it with
    `app.close()`; the address is `app.local_url`)."""
    app.queue(default_concurrency_limit=1)
    if port == 0:
        port = free_port(host)
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
