"""The answer canvas: chip states, confidence bands, escaping, and the step-by-step trace."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from llada.demo.render import (
    EARLIER,
    FIXED,
    MASK_PLACEHOLDER,
    MASKED,
    NEW,
    Cell,
    DenoiseTrace,
    confidence_band,
    render_canvas,
)


def chips(html: str) -> list[tuple[str, str]]:
    """(classes, text) of every chip in the token area (legend excluded)."""
    tokens = re.search(r'<div class="tokens">(.*?)</div>', html).group(1)
    return re.findall(r'<span class="([^"]*)"[^>]*>(.*?)</span>', tokens)


@pytest.mark.parametrize(
    ("confidence", "band"),
    [(None, "none"), (0.0, "low"), (0.29, "low"), (0.3, "mid"), (0.69, "mid"), (0.7, "high")],
)
def test_confidence_bands_use_the_reference_thresholds(confidence, band):
    assert confidence_band(confidence) == band


def test_states_and_bands_become_classes():
    cells = [
        Cell("", MASKED),
        Cell(" the", NEW, 0.95),
        Cell(" king", EARLIER, 0.5),
        Cell(" of", EARLIER, 0.1),
        Cell(" Denmark", FIXED),
        Cell("x", NEW, None),
    ]
    html = render_canvas(cells, "step 3")
    assert chips(html) == [
        ("tok masked", MASK_PLACEHOLDER),
        ("tok new high", " the"),
        ("tok earlier mid", " king"),
        ("tok earlier low", " of"),
        ("tok fixed", " Denmark"),
        ("tok new none", "x"),
    ]
    assert 'data-masked="1"' in html and 'data-length="6"' in html
    assert "step 3" in html
    assert 'title="committed at this step, confidence 0.95"' in html


def test_token_text_and_status_are_escaped():
    html = render_canvas([Cell('<b>"&', EARLIER, 0.8)], status="<script>")
    assert "<b>" not in html and "<script>" not in html
    assert chips(html) == [("tok earlier high", "&lt;b&gt;&quot;&amp;")]
    assert "&lt;script&gt;" in html


def test_newlines_are_visible_and_special_tokens_marked():
    html = render_canvas([Cell("\n", EARLIER, 0.9), Cell("<|eot_id|>", NEW, 0.9, special=True)])
    assert chips(html) == [
        ("tok earlier high", "\u21b5"),
        ("tok new high special", "&lt;|eot_id|&gt;"),
    ]


def test_unknown_state_is_an_error():
    with pytest.raises(ValueError, match="unknown cell state"):
        render_canvas([Cell("a", "done")])


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def event(answer, committed, confidence, prompt=(7, 7)):
    """A StepEvent-like object for one row: the prompt then the answer."""
    nan = math.nan
    return SimpleNamespace(
        tokens=torch.tensor([list(prompt) + answer]),
        committed=torch.tensor([[False] * len(prompt) + committed]),
        confidence=torch.tensor([[nan] * len(prompt) + confidence]),
    )


def test_trace_follows_states_across_steps():
    mask, nan = 9, math.nan
    trace = DenoiseTrace(CharTokenizer(), mask_id=mask, gen_length=4, fixed={3: 2})
    assert [c.state for c in trace.cells()] == [MASKED, MASKED, MASKED, FIXED]

    trace.update(event([0, mask, mask, 2], [True, False, False, False], [0.8, 0.2, 0.1, nan]))
    cells = trace.cells()
    assert [c.state for c in cells] == [NEW, MASKED, MASKED, FIXED]
    assert cells[0].text == "a" and cells[0].confidence == pytest.approx(0.8)
    assert cells[3].text == "c"

    trace.update(event([0, 1, mask, 2], [False, True, False, False], [nan, 0.25, 0.1, nan]))
    cells = trace.cells()
    assert [c.state for c in cells] == [EARLIER, NEW, MASKED, FIXED]
    assert cells[0].confidence == pytest.approx(0.8)  # kept from the step it was committed
    assert cells[1].confidence == pytest.approx(0.25)

    # Early stop fills the rest with EOS without committing it: no confidence to show.
    trace.update(event([0, 1, 4, 2], [False, False, False, False], [nan, nan, nan, nan]))
    assert [c.state for c in trace.cells()] == [EARLIER, EARLIER, NEW, FIXED]
    assert trace.cells()[2].confidence is None
    assert trace.tokens == [0, 1, 4, 2]


def test_trace_maps_infinite_confidence_into_the_bands():
    trace = DenoiseTrace(CharTokenizer(), mask_id=9, gen_length=1)
    trace.update(event([0], [True], [-math.inf]))
    assert trace.cells()[0].confidence == 0.0
