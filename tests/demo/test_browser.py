"""The demo page in a real browser: the canvas updates live, the answer lands in the chat, a bad
setting shows a message, and the page never leaves 127.0.0.1."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")
pytest.importorskip("playwright")

from demo_browser import (  # noqa: E402
    bot_messages,
    browser_page,
    chromium_path,
    frames,
    send,
    served,
    set_number,
    wait_until_done,
)

from llada.api import load  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page(chat_checkpoint):
    if chromium_path() is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    model, tokenizer, _ = load(chat_checkpoint)
    with (
        served(model, tokenizer, model_name="random-chat", max_gen_length=64) as url,
        browser_page(url) as (page, external),
    ):
        yield page, external


def test_denoising_is_shown_live_and_the_answer_lands_in_the_chat(page, tmp_path):
    page, external = page
    set_number(page, "gen_length", 32)
    set_number(page, "steps", 16)
    page.locator("#constraints textarea, #constraints input").first.fill("0:question")
    send(page, "To be, or not to be?")
    wait_until_done(page)
    page.screenshot(path=tmp_path / "demo.png", full_page=True)
    seen = frames(page)
    during = [f for f in seen if not f["status"].startswith("done")]
    # The canvas was redrawn while the model ran: several different partial canvases, fewer
    # masks each time, before the final one.
    assert len(during) >= 2, seen
    assert during[0]["masked"] > during[-1]["masked"]
    masked = [f["masked"] for f in during]
    assert masked == sorted(masked, reverse=True)
    assert seen[-1]["status"].startswith("done") and seen[-1]["masked"] == 0
    assert 'class="tok fixed"' in seen[0]["tokens"]
    answers = bot_messages(page)
    assert len(answers) == 1 and answers[0].startswith("question")
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert external == []


def test_a_second_turn_keeps_the_conversation(page):
    page, external = page
    send(page, "And then?")
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length == 2")
    wait_until_done(page)
    assert len(bot_messages(page)) == 2
    assert external == []


def test_bad_settings_show_a_message_not_a_traceback(page):
    page, _ = page
    set_number(page, "block_length", 5)
    send(page, "Hello?")
    toast = page.get_by_text("must be a multiple of block_length")
    toast.wait_for(timeout=15_000)
    assert "Traceback" not in page.content()
