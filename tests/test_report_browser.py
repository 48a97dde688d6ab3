"""The HTML report as a user sees it: loaded from disk in a real headless Chromium.

The page is ``$SPURFAST_REPORT`` when set (CI points it at the ``spurfast demo --quick``
report), else a tiny demo made here. Without playwright or a Chromium the test skips, unless
``SPURFAST_REQUIRE_BROWSER=1`` (set by CI), where that is a failure. ``$SPURFAST_SCREENSHOT``
names where to keep a full-page screenshot.
"""
import os
import shutil
from pathlib import Path

import pytest

from spurfast import cli

from _helpers import TINY_DEMO_PRESET

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        return None, f"playwright is not importable ({exc})"
    path = os.environ.get("SPURFAST_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        return None, "no chromium on PATH (apt install chromium)"
    return (sync_playwright, path), ""


@pytest.fixture
def browser_or_skip():
    found, why = _chromium()
    if found is None:
        if os.environ.get("SPURFAST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SPURFAST_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return found


@pytest.fixture
def report_path(tmp_path, monkeypatch):
    if os.environ.get("SPURFAST_REPORT"):
        path = Path(os.environ["SPURFAST_REPORT"])
        assert path.is_file(), f"SPURFAST_REPORT={path} does not exist"
        return path
    monkeypatch.setitem(cli.DEMO_PRESETS, "quick", TINY_DEMO_PRESET)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    return tmp_path / "demo" / "report.html"


def test_report_renders_with_tables_and_non_empty_images(browser_or_skip, report_path, tmp_path):
    sync_playwright, chromium = browser_or_skip
    problems, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(report_path.resolve().as_uri(), wait_until="load")
            title = page.title()
            headings = page.locator("h2").all_inner_texts()
            tables = page.evaluate(
                "Array.from(document.querySelectorAll('table')).map(t => "
                "[t.querySelectorAll('thead th').length, t.querySelectorAll('tbody tr').length, t.offsetWidth])"
            )
            # Each image: decoded size, and how many distinct pixel values a canvas copy holds (a
            # blank or broken picture has one).
            images = page.evaluate("""Array.from(document.images).map(img => {
                const size = {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
                              shown: img.getBoundingClientRect().width};
                if (!img.naturalWidth || !img.naturalHeight) return {...size, colors: 0};
                const c = document.createElement('canvas');
                c.width = Math.min(img.naturalWidth, 400); c.height = Math.min(img.naturalHeight, 400);
                const ctx = c.getContext('2d');
                ctx.drawImage(img, 0, 0, c.width, c.height);
                const data = ctx.getImageData(0, 0, c.width, c.height).data;
                const seen = new Set();
                for (let i = 0; i < data.length && seen.size < 50; i += 4 * 97) seen.add(data[i] * 65536 + data[i + 1] * 256 + data[i + 2]);
                return {...size, colors: seen.size};
            })""")
            shot = Path(os.environ.get("SPURFAST_SCREENSHOT") or tmp_path / "report.png")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    external = [u for u in requests if not (u.startswith("file:") or u.startswith("data:"))]
    assert not external, f"the report fetched from the network: {external}"
    assert title.startswith("spurfast")
    assert any(h.startswith("Summary") for h in headings) and "Figures" in headings, headings
    assert any(h.startswith("ERM vs framework") for h in headings), headings
    assert any(h.startswith("Rare patterns") for h in headings), headings
    assert len(tables) >= 5, tables
    for columns, rows, width in tables:
        assert columns >= 3 and rows >= 1 and width > 100, tables
    assert {i["alt"] for i in images} >= {"training", "trace_train", "trace_test", "oracle", "self_influence", "top_samples",
                                          "framework", "rare"}
    for image in images:
        assert image["complete"] and image["w"] > 100 and image["h"] > 100 and image["shown"] > 100, image
        assert image["colors"] > 5, f"image {image['alt']} looks blank: {image}"
    assert shot.stat().st_size > 10_000
