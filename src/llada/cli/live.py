"""The denoising shown live in a terminal (rich): the answer canvas redrawn after every step."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from ..sampling.events import StepEvent

MASK_GLYPH = "░"


def answer_view(event: StepEvent, gen_length: int, tokenizer: Any, mask_id: int) -> Text:
    """Row 0's answer after one step: masked positions as shaded blocks, the tokens committed
    at this step highlighted green, those LLaDA 2.1's editing rewrote at this step magenta and
    underlined, earlier ones plain (special tokens such as EOS are not shown)."""
    view = Text(f"[block {event.block + 1} step {event.step}] ", style="dim")
    answer = event.tokens[0, -gen_length:].tolist()
    fresh = event.committed[0, -gen_length:].tolist()
    edited = [False] * len(answer)
    if event.edited is not None:
        edited = event.edited[0, -gen_length:].tolist()
    for token, new, rewritten in zip(answer, fresh, edited, strict=True):
        if token == mask_id:
            view.append(MASK_GLYPH, style="grey50")
        else:
            text = tokenizer.decode([token], skip_special_tokens=True)
            style = "bold magenta underline" if rewritten else "bold green" if new else ""
            view.append(text, style=style)
    return view


class LiveAnswer:
    """A `sample(on_step=...)` callback that redraws the answer on a rich `Live` display."""

    def __init__(self, live: Any, gen_length: int, tokenizer: Any, mask_id: int) -> None:
        self.live = live
        self.gen_length = gen_length
        self.tokenizer = tokenizer
        self.mask_id = mask_id

    def __call__(self, event: StepEvent) -> None:
        self.live.update(answer_view(event, self.gen_length, self.tokenizer, self.mask_id))
