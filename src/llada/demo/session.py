"""One demo turn without the web page: settings -> prompt -> a frame after every denoising step.

The demo watches the one sampling loop (`llada.sampling.fast.denoise`) step by step; it never
re-implements it. The page (`app.py`) only forwards these frames to the browser as they come.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..sampling.config import (
    REMASKING_CHOICES,
    BlockDecodeConfig,
    DecodeConfig,
    GenerateConfig,
    decode_preset,
    profile,
)
from ..sampling.fast import denoise
from ..tokenizer import encode_chat
from .constraints import parse_constraints, place_constraints
from .render import MASKED, DenoiseTrace, render_canvas

_DEMO = profile("demo").config()


@dataclass(frozen=True)
class DemoSettings:
    """The controls of one demo turn. Defaults are the "demo" profile's (the reference app's,
    ML-GSAI/LLaDA app.py), except the preset: `fast` (the default of every interactive
    command).

    gen_length, steps, block_length, temperature, cfg_scale, remasking: as in `GenerateConfig`.
    preset: the decoding preset ('reference' repeats the published sampler token for token;
        'fast' and 'fastest' use KV caches and confidence-threshold parallel decoding; a LLaDA
        2.x model takes 'llada2.0', 'llada2.1-quality' or 'llada2.1-speed').
    constraints: "position:word, ..." words fixed in the answer before denoising starts.
    """

    gen_length: int = _DEMO.gen_length
    steps: int = _DEMO.steps
    block_length: int = _DEMO.block_length
    temperature: float = _DEMO.temperature
    cfg_scale: float = _DEMO.cfg_scale
    remasking: str = _DEMO.remasking
    preset: str = profile("demo").preset
    constraints: str = ""

    def __post_init__(self) -> None:
        if self.remasking not in REMASKING_CHOICES:
            raise ValueError(
                f"remasking must be one of {REMASKING_CHOICES}, got {self.remasking!r}"
            )
        self.generate_config()
        self.decode_config()
        parse_constraints(self.constraints)

    def generate_config(self) -> GenerateConfig:
        return GenerateConfig(
            steps=self.steps,
            gen_length=self.gen_length,
            block_length=self.block_length,
            temperature=self.temperature,
            cfg_scale=self.cfg_scale,
            remasking=self.remasking,  # type: ignore[arg-type]
        )

    def decode_config(self) -> DecodeConfig | BlockDecodeConfig:
        return decode_preset(self.preset)


@dataclass
class Frame:
    """What the page shows after one step: the canvas HTML, the answer's ids so far (the mask id
    where undecided) and, on the last frame only, the answer text."""

    html: str
    tokens: list[int]
    answer: str | None = None
    forward_passes: int = 0


def answer_text(tokens: Sequence[int], tokenizer: Any, stop_ids: Sequence[int]) -> str:
    """The answer as the chat shows and remembers it: ids up to the first EOS/EoT, decoded with
    special tokens skipped, unstripped (the reference app's assistant turns)."""
    kept = []
    for token in tokens:
        if token in stop_ids:
            break
        kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=True)


def stream_turn(
    model: torch.nn.Module,
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    settings: DemoSettings,
) -> Iterator[Frame]:
    """Answer the last user message of `messages`, yielding a `Frame` as each step finishes.

    As the reference app, the whole text history is rendered through the chat template on
    every turn (ML-GSAI/LLaDA app.py). The last frame carries the answer text.
    """
    special = model.special_tokens
    config = settings.generate_config()
    fixed = place_constraints(parse_constraints(settings.constraints), tokenizer, config.gen_length)
    prompt = torch.tensor([encode_chat(tokenizer, messages)], dtype=torch.long)  # (1, Lp)
    answer = torch.full((1, config.gen_length), special.mask_id, dtype=torch.long)  # (1, L)
    for position, token in fixed.items():
        answer[0, position] = token
    trace = DenoiseTrace(
        tokenizer, special.mask_id, config.gen_length, fixed, tokenizer.all_special_ids
    )
    decode = settings.decode_config()
    if fixed and isinstance(decode, BlockDecodeConfig):
        raise ValueError(
            "word constraints are a LLaDA-8B sampler feature; LLaDA 2.x's block sampler starts "
            "every answer from [MASK]: clear the constraints"
        )
    # Only the schedule has a fixed number of steps per block; other rules stop when it is full.
    schedule = isinstance(decode, DecodeConfig) and decode.commit == "schedule"
    steps_total = f"/{config.steps_per_block}" if schedule else ""
    forward_passes = 0
    for event in denoise(model, prompt, None, config, decode, answer=answer if fixed else None):
        trace.update(event)
        forward_passes = event.forward_passes
        masked = trace.states.count(MASKED)
        edits = "" if event.edited is None else f" \u00b7 {int(event.edited.sum())} rewritten"
        status = (
            f"block {event.block + 1}/{config.num_blocks} \u00b7 step {event.step}{steps_total}{edits} "
            f"\u00b7 {forward_passes} forward passes \u00b7 {masked} of {config.gen_length} "
            "still masked"
        )
        yield Frame(render_canvas(trace.cells(), status), list(trace.tokens), None, forward_passes)
    text = answer_text(trace.tokens, tokenizer, special.stop_ids)
    status = f"done \u00b7 {forward_passes} forward passes"
    yield Frame(render_canvas(trace.cells(), status), list(trace.tokens), text, forward_passes)
