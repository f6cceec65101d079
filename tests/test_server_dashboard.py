"""The live dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright).

Needs ``apt-get install -y chromium`` and the ``playwright`` Python package
(its own browser download is not used: it launches /usr/bin/chromium). Skips
with the reason when either is missing.
"""

from __future__ import annotations

import io
import os
import shutil

import openai
import pytest

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.speculators import NgramSpeculator

MODEL = "tiny-dash"
THROUGHPUT_RGB = (0x25, 0x63, 0xEB)  # dashboard.js THROUGHPUT_COLOR


def chromium_path() -> str | None:
    for name in (os.environ.get("ADASPEC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _rgb_pixels(png: bytes) -> list[tuple[int, int, int]]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    return [img.getpixel((x, y)) for y in range(h) for x in range(w)]


def count_color(png: bytes, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """Pixels within ``tol`` (per channel) of ``rgb``."""
    return sum(1 for p in _rgb_pixels(png) if all(abs(a - b) <= tol for a, b in zip(p, rgb)))


def ink(png: bytes) -> int:
    """Pixels that are not (near) white background."""
    return sum(1 for p in _rgb_pixels(png) if min(p) < 235)


def test_dashboard_draws_live_data(tiny_target) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium: run `apt-get install -y chromium` (Debian) to enable the dashboard test")
    app = create_app(Engine(tiny_target, [NgramSpeculator()]), MODEL)
    with BackgroundServer(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.base_url + "/dashboard")
            page.wait_for_function("Number(document.body.dataset.updates || 0) >= 1", timeout=15000)
            charts = ("#chart-throughput", "#chart-share", "#chart-lookahead")
            before = {c: page.locator(c).screenshot() for c in charts}

            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
            for i in range(4):
                client.completions.create(model=MODEL, prompt=f"{i} one two one two one two one", max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
            start = int(page.evaluate("document.body.dataset.updates"))
            page.wait_for_function(f"Number(document.body.dataset.updates) >= {start + 2}", timeout=15000)
            after = {c: page.locator(c).screenshot() for c in charts}

            # Before traffic the throughput line lies flat on the x axis; after it, it rises.
            line_before = count_color(before["#chart-throughput"], THROUGHPUT_RGB)
            line_after = count_color(after["#chart-throughput"], THROUGHPUT_RGB)
            assert line_after > line_before + 50, (line_before, line_after)
            for chart in charts:  # every chart drew more than its axes
                ink_before, ink_after = ink(before[chart]), ink(after[chart])
                assert ink_after > ink_before + 200, (chart, ink_before, ink_after)
            assert page.locator("#recent tbody tr").count() == 4
            assert page.locator("#tile-requests").inner_text() == "4"
            if os.environ.get("ADASPEC_DASHBOARD_SCREENSHOT"):
                page.screenshot(path=os.environ["ADASPEC_DASHBOARD_SCREENSHOT"], full_page=True)
            assert errors == []
        finally:
            browser.close()
