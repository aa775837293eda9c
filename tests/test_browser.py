"""The draw-a-digit page in a real browser: Playwright drives Debian's Chromium (installed by .ci/run with apt-get;
Playwright's own browser download is not used) against a real `retrieval serve` subprocess on a free loopback port.
Mouse strokes draw a 7 and the page answers 7; then a new symbol is taught from three drawn examples (with the
token) and drawing it again is recognised."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from serve_helpers import TOKEN, ServerProcess, copy_index, serve_artifacts

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("RETRIEVAL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("RETRIEVAL_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed (apt-get install chromium) but RETRIEVAL_REQUIRE_BROWSER is set")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    base = serve_artifacts(tmp_path_factory, data_root)
    folder = copy_index(base, tmp_path_factory.mktemp("browser") / "index")
    with ServerProcess(folder, "--token-file", base / "token.txt") as server:
        yield server


# Strokes in a 280x280 frame (the pad's own coordinates).
SEVEN = [[(70, 62), (212, 62), (118, 232)]]
STAR = [[(140, 40), (140, 240)], [(54, 92), (226, 188)], [(54, 188), (226, 92)]]  # an asterisk


def wobble(strokes, seed: int, amount: float = 12.0):
    """The strokes with each point moved by up to `amount` pixels (seeded): a hand never draws twice alike."""
    rng = random.Random(seed)
    return [[(x + rng.uniform(-amount, amount), y + rng.uniform(-amount, amount)) for x, y in s] for s in strokes]


def draw(page, selector: str, strokes, shift=(0, 0)) -> None:
    box = page.locator(selector).bounding_box()
    scale = box["width"] / 280
    for stroke in strokes:
        points = [(box["x"] + (x + shift[0]) * scale, box["y"] + (y + shift[1]) * scale) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=15)
        page.mouse.up()


def answer_after(page, previous_queries: int) -> str:
    """The answer label once the page has answered the latest drawing (a query newer than `previous_queries`)."""
    page.wait_for_timeout(300)  # the page sends a drawing 120 ms after the last stroke ends
    page.wait_for_function(f"document.body.dataset.busy === '0' && window.__queries > {previous_queries}",
                           timeout=20_000)
    return page.locator("#answer-label").text_content().strip()


def test_draw_a_seven_then_teach_a_symbol(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 940})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script("window.__queries = 0; const f = window.fetch; window.fetch = (...a) => "
                         "{ if (String(a[0]).startsWith('/query')) window.__queries++; return f(...a); };")
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('index-meta').textContent.includes('500 references')")

    draw(page, "#pad", SEVEN)
    assert answer_after(page, 0) == "7"
    neighbours = page.locator("#neighbors .thumb")
    assert neighbours.count() == 5
    page.wait_for_function("[...document.querySelectorAll('#neighbors img')].every(i => i.complete && "
                           "i.naturalWidth === 28)")
    page.screenshot(path=str(tmp_path / "seven.png"), full_page=True)

    # teach an asterisk: three examples drawn on the teach pad, added with the token
    page.fill("#teach-label", "star")
    page.fill("#teach-token", TOKEN)
    for n, shift in enumerate(((0, 0), (8, -6), (-7, 6)), 1):
        draw(page, "#teach-pad", wobble(STAR, n), shift)
        page.click("#teach-keep")
        page.wait_for_function(f"document.querySelectorAll('#examples img').length === {n}")
    page.click("#teach-add")
    page.wait_for_function("document.getElementById('teach-status').textContent.startsWith('added 3')",
                           timeout=20_000)
    assert "503" in page.locator("#teach-status").text_content()

    queries = page.evaluate("window.__queries")
    page.click("#clear")
    draw(page, "#pad", wobble(STAR, 99), (4, 4))
    assert answer_after(page, queries) == "star"
    distances = [float(d) for d in page.locator("#neighbors .dist").all_text_contents()]
    assert distances[0] > 0  # not one of the examples again
    # a word-long answer keeps its own width beside a long explanation instead of running into it (the text the
    # page shows for 'unknown'; this index is not calibrated, so it never answers that itself)
    assert page.evaluate("""() => {
        const label = document.getElementById('answer-label');
        label.className = 'big unknown';
        label.textContent = 'unknown';
        document.getElementById('answer-why').textContent = 'The nearest reference is at distance 0.655, past the '
            + 'threshold 0.483: this looks like nothing the index knows.';
        return label.scrollWidth <= label.clientWidth; }""")
    page.screenshot(path=str(tmp_path / "star.png"), full_page=True)

    # a wrong token is refused on the page, and nothing is added
    page.fill("#teach-label", "ring")
    page.fill("#teach-token", "wrong")
    draw(page, "#teach-pad", SEVEN)
    page.click("#teach-keep")
    page.click("#teach-add")
    page.wait_for_function("document.getElementById('teach-status').textContent.includes('wrong token')")
    assert errors == []
    page.close()
