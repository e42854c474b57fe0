"""Drive the `llada demo` page with a headless Chromium (playwright): the browser test uses it,
and run as a script it takes the README's screenshot on the shipped model:

    python tests/demo/demo_browser.py docs/demo.png

Chromium is Debian's (`apt-get install chromium`), not playwright's download. Every request
that leaves 127.0.0.1 is refused and recorded, so a page that needs the internet is caught.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking"]

# Records every distinct state of the canvas as the DOM changes, however fast the frames come,
# so a test sees the intermediate frames even when the whole answer takes a fraction of a second.
WATCH_CANVAS = """() => {
  window.__canvasFrames = [];
  const root = document.querySelector('#canvas');
  const record = () => {
    const canvas = root.querySelector('.llada-canvas');
    if (!canvas) return;
    const tokens = canvas.querySelector('.tokens').innerHTML;
    const status = canvas.querySelector('.status').textContent;
    const frames = window.__canvasFrames;
    const last = frames[frames.length - 1];
    if (!last || last.tokens !== tokens || last.status !== status) {
      frames.push({masked: Number(canvas.dataset.masked), tokens: tokens, status: status});
    }
  };
  new MutationObserver(record).observe(root, {childList: true, subtree: true,
                                              characterData: true, attributes: true});
}"""

DONE = """() => {
  const status = document.querySelector('#canvas .llada-canvas .status');
  return status !== null && status.textContent.startsWith('done');
}"""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def served(model: Any, tokenizer: Any, **options: Any) -> Iterator[str]:
    """The demo for a loaded model, served on 127.0.0.1 in this process; yields its URL."""
    from llada.demo.app import build_app, launch

    app = build_app(model, tokenizer, **options)
    launch(app, "127.0.0.1", 0, block=False)
    try:
        yield app.local_url
    finally:
        app.close()


@contextmanager
def browser_page(url: str, width: int = 1400, height: int = 900) -> Iterator[tuple[Any, list]]:
    """(page, external): a loaded page, and the list of refused non-loopback requests."""
    from playwright.sync_api import sync_playwright

    external: list[str] = []

    def refuse(route: Any) -> None:
        external.append(route.request.url)
        route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route(lambda address: not address.startswith(url), refuse)
            page.goto(url)
            page.wait_for_selector("#canvas .llada-empty")
            page.wait_for_selector("#message textarea")
            page.evaluate(WATCH_CANVAS)
            yield page, external
        finally:
            browser.close()


def set_number(page: Any, elem_id: str, value: float) -> None:
    """Type a value into a slider's number box (committed on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def send(page: Any, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def frames(page: Any) -> list[dict]:
    return page.evaluate("() => window.__canvasFrames")


def wait_until_done(page: Any, timeout_ms: float = 60_000) -> None:
    page.wait_for_function(DONE, timeout=timeout_ms)


def bot_messages(page: Any) -> list[str]:
    return page.locator("#chat [data-testid=bot]").all_inner_texts()


def screenshot(path: str) -> None:
    """Two turns on the default model, the second caught halfway through its denoising."""
    import torch

    from llada.api import load

    torch.manual_seed(0)
    model, tokenizer, _ = load(None)
    name = Path(model.checkpoint_folder).name
    with (
        served(model, tokenizer, model_name=name) as url,
        browser_page(url, 1400, 860) as (
            page,
            _,
        ),
    ):
        set_number(page, "gen_length", 32)
        set_number(page, "steps", 32)
        send(page, "Reverse the order:\nking moon sword")
        wait_until_done(page)
        set_number(page, "gen_length", 64)
        set_number(page, "steps", 64)
        page.evaluate("() => { window.__canvasFrames = []; }")
        send(page, "Sort in ascending order:\n42 17 9 63 5 88")
        page.wait_for_function(
            """() => {
              const c = document.querySelector('#canvas .llada-canvas');
              return c && !c.querySelector('.status').textContent.startsWith('done')
                && Number(c.dataset.masked) <= 0.5 * Number(c.dataset.length);
            }""",
            polling="raf",
            timeout=120_000,
        )
        page.screenshot(path=path, full_page=True)
        wait_until_done(page, 120_000)


if __name__ == "__main__":
    screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/demo.png")
