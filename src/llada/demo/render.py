"""The answer canvas as HTML: one coloured chip per answer token, redrawn after every step.

Each chip shows a position's state (still masked, committed at this step, committed earlier, or
fixed by a word constraint) and, for committed tokens, the confidence it was committed with, in
the reference app's three bands (below 0.3, 0.3 to 0.7, 0.7 and above; ML-GSAI/LLaDA app.py).
`DenoiseTrace` follows the `StepEvent`s of one answer and remembers those confidences;
`render_canvas` is a pure function of the cells, so both are tested without a browser.
Each frame carries its own scoped stylesheet, so it looks the same in any page, light or dark.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MASKED, NEW, EARLIER, FIXED, EDITED = "masked", "new", "earlier", "fixed", "edited"
# The reference app's colour thresholds for the confidence of a committed token (ML-GSAI/LLaDA
# app.py).
LOW_CONFIDENCE, HIGH_CONFIDENCE = 0.3, 0.7
MASK_PLACEHOLDER = "\u2591\u2591"  # two light-shade blocks: a position still to be decided

# One stylesheet, sent with every frame and scoped to the canvas, so the chips need only
# classes. Chip backgrounds per confidence band: strong for tokens committed at this step, pale
# for those committed earlier, so the step's decisions stand out and the history stays readable.
STYLE = """<style>
.llada-canvas{background:#fff;color:#111827;border:1px solid #e5e7eb;border-radius:8px;
 padding:10px 12px}
.llada-canvas .status,.llada-canvas .legend{font-size:13px;color:#4b5563}
.llada-canvas .tokens{margin:6px 0 8px;line-height:28px}
.llada-canvas .legend{font-size:12px;line-height:26px}
.llada-canvas .tok{display:inline-block;margin:2px 1px;padding:0 4px;border-radius:4px;
 border:1px solid transparent;font:14px/22px ui-monospace,'IBM Plex Mono',Consolas,monospace;
 white-space:pre;color:#111827}
.llada-canvas .masked{background:#f3f4f6;color:#9ca3af;border-color:#e5e7eb}
.llada-canvas .new{font-weight:700;border:2px solid #111827}
.llada-canvas .fixed{background:#c7d2fe;border:1px dashed #4338ca}
.llada-canvas .new.high{background:#22c55e}.llada-canvas .earlier.high{background:#bbf7d0}
.llada-canvas .new.mid{background:#f59e0b}.llada-canvas .earlier.mid{background:#fde68a}
.llada-canvas .new.low{background:#ef4444}.llada-canvas .earlier.low{background:#fecaca}
.llada-canvas .new.none{background:#9ca3af}.llada-canvas .earlier.none{background:#e5e7eb}
.llada-canvas .edited{font-weight:700;border:2px dashed #7c3aed}
.llada-canvas .edited.high{background:#22c55e}.llada-canvas .edited.mid{background:#f59e0b}
.llada-canvas .edited.low{background:#ef4444}.llada-canvas .edited.none{background:#9ca3af}
.llada-canvas .special{font-size:11px;font-style:italic}
.llada-empty{background:#fff;color:#6b7280;border:1px dashed #d1d5db;border-radius:8px;
 padding:24px 12px;text-align:center;font-size:14px}
</style>"""
_STATE_WORDS = {
    MASKED: "still masked",
    NEW: "committed at this step",
    EARLIER: "committed earlier",
    FIXED: "fixed by a constraint",
    EDITED: "rewritten at this step (LLaDA 2.1's token editing)",
}
# Characters that would be invisible or break the line of chips, shown as visible symbols.
_VISIBLE = str.maketrans({"\n": "\u21b5", "\r": "\u21b5", "\t": "\u21e5"})


@dataclass(frozen=True)
class Cell:
    """One answer position: its decoded text (raw, escaped when rendered), its state, and the
    confidence it was committed with (None when masked, fixed, or filled without a score)."""

    text: str
    state: str
    confidence: float | None = None
    special: bool = False


def confidence_band(confidence: float | None) -> str:
    """'low' (< 0.3), 'mid' (< 0.7), 'high' (>= 0.7), or 'none' without a confidence."""
    if confidence is None:
        return "none"
    if confidence < LOW_CONFIDENCE:
        return "low"
    if confidence < HIGH_CONFIDENCE:
        return "mid"
    return "high"


def _chip(cell: Cell) -> str:
    if cell.state not in _STATE_WORDS:
        raise ValueError(f"unknown cell state {cell.state!r}; one of {list(_STATE_WORDS)}")
    classes = f"tok {cell.state}"
    title = _STATE_WORDS[cell.state]
    if cell.state in (NEW, EARLIER, EDITED):
        classes += " " + confidence_band(cell.confidence)
        if cell.confidence is not None:
            title += f", confidence {cell.confidence:.2f}"
    if cell.special:
        classes += " special"
    if cell.state == MASKED:  # most chips early on: kept short
        return f'<span class="{classes}">{MASK_PLACEHOLDER}</span>'
    text = cell.text.translate(_VISIBLE) or " "
    return f'<span class="{classes}" title="{html.escape(title)}">{html.escape(text)}</span>'


def _legend(edits: bool = False) -> str:
    items = [
        (Cell("masked", MASKED), "masked"),
        (Cell("new", NEW, 0.9), "committed this step"),
        (Cell("earlier", EARLIER, 0.9), "committed earlier"),
        (Cell("fixed", FIXED), "constraint"),
    ]
    if edits:
        items.append((Cell("edited", EDITED, 0.9), "rewritten this step"))
    parts = [f"{_chip(cell)}&nbsp;{html.escape(words)}" for cell, words in items]
    parts.append(
        "confidence: "
        + " ".join(
            _chip(Cell(label, EARLIER, value))
            for label, value in (("< 0.3", 0.1), ("0.3 to 0.7", 0.5), ("\u2265 0.7", 0.9))
        )
    )
    return " &nbsp; ".join(parts)


def render_canvas(cells: Sequence[Cell], status: str = "") -> str:
    """The HTML of an answer canvas: a status line, the chips and a legend.

    The root carries `data-masked` (positions still masked) and `data-length`, so that tests
    and scripts can follow the denoising without parsing the chips."""
    masked = sum(cell.state == MASKED for cell in cells)
    chips = "".join(_chip(cell) for cell in cells)
    return (
        f'{STYLE}<div class="llada-canvas" data-masked="{masked}" data-length="{len(cells)}">'
        f'<div class="status">{html.escape(status)}</div>'
        f'<div class="tokens">{chips}</div>'
        f'<div class="legend">{_legend(any(c.state == EDITED for c in cells))}</div></div>'
    )


def render_placeholder(text: str) -> str:
    """The canvas area before the first answer."""
    return f'{STYLE}<div class="llada-empty">{html.escape(text)}</div>'


def _shown(score: float) -> float | None:
    """A confidence as a chip shows it: None for NaN, infinities clamped to [0, 1]."""
    if math.isnan(score):
        return None
    if math.isinf(score):
        return 0.0 if score < 0 else 1.0
    return score


class DenoiseTrace:
    """Follows one answer row through the `StepEvent`s of `llada.sampling.fast.denoise`.

    It knows which positions were fixed up front, remembers the confidence each position was
    committed with (an event only carries the current step's), and gives the cells to draw.
    """

    def __init__(
        self,
        tokenizer: Any,
        mask_id: int,
        gen_length: int,
        fixed: dict[int, int] | None = None,
        special_ids: Iterable[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.gen_length = gen_length
        self.fixed = dict(fixed or {})
        self.special_ids = set(special_ids)
        self.tokens = [self.fixed.get(i, mask_id) for i in range(gen_length)]
        self.states = [FIXED if i in self.fixed else MASKED for i in range(gen_length)]
        self.confidences: list[float | None] = [None] * gen_length
        self._texts: dict[int, str] = {}

    def update(self, event: Any, row: int = 0) -> None:
        """Take one step's event: positions unmasked since the last one become NEW (with the
        confidence they were committed with), decoded ones the step rewrote (LLaDA 2.1's
        editing) EDITED (with the new token's confidence), the previous ones EARLIER."""
        answer = event.tokens[row, -self.gen_length :].tolist()
        committed = event.committed[row, -self.gen_length :].tolist()
        confidence = event.confidence[row, -self.gen_length :].float().tolist()
        edited = [False] * self.gen_length
        if getattr(event, "edited", None) is not None:
            edited = event.edited[row, -self.gen_length :].tolist()
        for i, token in enumerate(answer):
            if self.states[i] == FIXED:
                continue
            if edited[i] and token != self.mask_id:
                self.states[i], self.confidences[i] = EDITED, _shown(confidence[i])
            elif token == self.mask_id:
                self.states[i], self.confidences[i] = MASKED, None
            elif self.states[i] == MASKED:
                # A position can also be filled without being committed (early stop pads the
                # rest of a finished answer with EOS); it then has no confidence to show.
                score = _shown(confidence[i]) if committed[i] else None
                self.states[i], self.confidences[i] = NEW, score
            else:
                self.states[i] = EARLIER
            self.tokens[i] = token

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    def cells(self) -> list[Cell]:
        return [
            Cell(
                text="" if state == MASKED else self.text(token),
                state=state,
                confidence=confidence,
                special=token in self.special_ids,
            )
            for token, state, confidence in zip(
                self.tokens, self.states, self.confidences, strict=True
            )
        ]
