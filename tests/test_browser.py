"""The draw-a-digit page in a real browser: Playwright drives Debian's Chromium (installed by .ci/run with apt-get;
Playwright's own browser download is not used) against a real `retrieval serve` subprocess on a free loopback port,
over an index calibrated with `retrieval calibrate`. Mouse strokes draw a 7 and the page answers 7 with k
neighbours (the k selector); a triangle is refused as unknown; a picture file dropped on the page is answered;
drawing never makes the page send something the service refuses (no 4xx in the console); the teach panel keeps at
most 5 examples, a wrong token adds nothing, and a symbol taught with the token is recognised when drawn again."""

from __future__ import annotations

import base64
import os
import random
import shutil
from pathlib import Path

import pytest

from cli_helpers import HEIC_HEAD
from serve_helpers import SEVEN as DRAWN_SEVEN
from serve_helpers import TOKEN, ServerProcess, cli, copy_index, drawing, get_json, serve_artifacts

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
    """The served copy of the test index, calibrated as a user would: answer 90% of mnist:test digits (a
    threshold the drawn 7 is well inside and the triangle well outside)."""
    base = serve_artifacts(tmp_path_factory, data_root)
    folder = copy_index(base, tmp_path_factory.mktemp("browser") / "index")
    cli("calibrate", "--index", folder, "--queries", "mnist:test", "--subset", 300, "--accept", 0.9,
        "--root", data_root)
    with ServerProcess(folder, "--token-file", base / "token.txt") as server:
        server.folder = folder
        yield server


@pytest.fixture(scope="module")
def seven_png() -> bytes:
    """A picture file of a 7: dark strokes on a 200x200 white picture, as a PNG."""
    return drawing(DRAWN_SEVEN, jitter=(6, 4))


# Strokes in a 280x280 frame (the pad's own coordinates).
SEVEN = [[(70, 62), (212, 62), (118, 232)]]
STAR = [[(140, 40), (140, 240)], [(54, 92), (226, 188)], [(54, 188), (226, 92)]]  # an asterisk
TRIANGLE = [[(140, 40), (240, 230), (40, 230), (140, 40)]]  # like no digit: the calibrated index refuses it


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
    page.wait_for_function(f"document.body.dataset.busy === '0' && window.__queries > {previous_queries}",
                           timeout=20_000)
    return page.locator("#answer-label").text_content().strip()


def queries(page) -> int:
    return page.evaluate("window.__queries")


def thumbs(page) -> int:
    return page.locator("#neighbors .thumb").count()


def open_page(browser, server):
    """A fresh page on the server that counts its /query requests and records console errors and 4xx answers."""
    page = browser.new_page(viewport={"width": 1200, "height": 940})
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.add_init_script("window.__queries = 0; const f = window.fetch; window.fetch = (...a) => "
                         "{ if (String(a[0]).startsWith('/query')) window.__queries++; return f(...a); };")
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('index-meta').textContent.includes('unknown past distance')")
    return page


def test_drawing_k_unknown_and_a_dropped_picture(browser, server, seven_png, tmp_path):
    page = open_page(browser, server)
    meta = page.locator("#index-meta").text_content()
    threshold = get_json(server.url + "/health")["max_distance"]
    assert "500 references" in meta and f"{threshold:.3f}" in meta, meta

    draw(page, "#pad", SEVEN)
    assert answer_after(page, 0) == "7"
    assert thumbs(page) == 5
    page.wait_for_function("[...document.querySelectorAll('#neighbors img')].every(i => i.complete && "
                           "i.naturalWidth === 28)")
    # the k selector asks again for the same drawing
    for k in (3, 8):
        n = queries(page)
        page.fill("#k", str(k))
        page.locator("#k").dispatch_event("change")
        assert answer_after(page, n) == "7" and thumbs(page) == k

    # Clear right after a stroke (before the drawing is sent), then a shape like no digit: refused as unknown
    draw(page, "#pad", wobble(SEVEN, 3))
    page.click("#clear")
    assert page.locator("#answer-label").text_content().strip() == "?"
    n = queries(page)
    draw(page, "#pad", TRIANGLE)
    assert answer_after(page, n) == "unknown"
    why = page.locator("#answer-why").text_content()
    nearest = float(page.locator("#neighbors .dist").first.text_content())
    assert nearest > threshold and f"past the threshold {threshold:.3f}" in why, why
    # the word keeps its own width beside the explanation instead of running into it
    assert page.evaluate("(() => { const l = document.getElementById('answer-label'); "
                         "return l.classList.contains('unknown') && l.scrollWidth <= l.clientWidth; })()")
    page.screenshot(path=str(tmp_path / "unknown.png"), full_page=True)
    # drawing, clearing and changing k sent nothing the service refused
    assert page.problems == [], page.problems

    # a picture file dropped on the drop zone is answered, and shown on the pad
    page.click("#clear")
    n = queries(page)
    transfer = page.evaluate_handle(
        """(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                      const t = new DataTransfer();
                      t.items.add(new File([bytes], 'seven.png', { type: 'image/png' })); return t; }""",
        base64.b64encode(seven_png).decode())
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert answer_after(page, n) == "7"
    assert thumbs(page) == 8  # k is still 8
    page.wait_for_function("(() => { const c = document.getElementById('pad'); "
                           "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                           "for (let i = 0; i < d.length; i += 4) if (d[i] < 128) return true; return false; })()")
    assert page.problems == [], page.problems

    # a phone's HEIC photo is refused by name: the last answer's label, explanation and neighbours all go
    page.set_input_files("#file", files=[{"name": "IMG_0001.HEIC", "mimeType": "image/heic",
                                          "buffer": HEIC_HEAD + bytes(200)}])
    page.wait_for_function("document.getElementById('status').textContent.includes('HEIC')")
    assert "IMG_0001.HEIC: a HEIC/HEIF picture" in page.locator("#status").text_content()
    assert page.locator("#answer-label").text_content().strip() == "?" and thumbs(page) == 0
    assert page.locator("#answer-why").text_content().strip() == ""
    page.close()


def test_teach_limit_wrong_token_then_a_new_symbol(browser, server):
    page = open_page(browser, server)
    before = get_json(server.url + "/health")["items"]
    page.fill("#teach-label", "star")
    page.fill("#teach-token", "wrong")
    for n in range(1, 6):
        draw(page, "#teach-pad", wobble(STAR, n), ((n % 3) * 6 - 6, (n % 2) * 8 - 4))
        page.click("#teach-keep")
        page.wait_for_function(f"document.querySelectorAll('#examples img').length === {n}")
    # five examples at most: keeping is disabled, and a sixth drawing is not kept
    assert page.locator("#teach-keep").is_disabled()
    draw(page, "#teach-pad", wobble(STAR, 6))
    page.click("#teach-keep", force=True)
    page.wait_for_timeout(200)
    assert page.locator("#examples img").count() == 5

    # a wrong token is refused on the page, and nothing is added
    page.click("#teach-add")
    page.wait_for_function("document.getElementById('teach-status').textContent.includes('wrong token')")
    assert get_json(server.url + "/health")["items"] == before
    assert page.locator("#examples img").count() == 5  # kept for another try

    # dropping one example (a click) makes room again; with the token the five are added
    page.locator("#examples img").first.click()
    assert page.locator("#examples img").count() == 4 and page.locator("#teach-keep").is_enabled()
    page.click("#teach-keep")
    page.wait_for_function("document.querySelectorAll('#examples img').length === 5")
    page.fill("#teach-token", TOKEN)
    page.click("#teach-add")
    page.wait_for_function("document.getElementById('teach-status').textContent.startsWith('added 5')",
                           timeout=20_000)
    assert str(before + 5) in page.locator("#teach-status").text_content()
    assert get_json(server.url + "/health")["items"] == before + 5
    page.wait_for_function(f"document.getElementById('index-meta').textContent.includes('{before + 5} references')")

    draw(page, "#pad", wobble(STAR, 99), (4, 4))
    assert answer_after(page, 0) == "star"
    distances = [float(d) for d in page.locator("#neighbors .dist").all_text_contents()]
    assert distances[0] > 0  # not one of the examples again
    page.close()
