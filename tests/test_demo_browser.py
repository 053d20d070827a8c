"""End to end: the demo page in headless Chromium (Debian's /usr/bin/chromium, via Playwright).

Uploads a Fashion-MNIST image, runs the search and checks that k neighbour images and the query
map are shown. A screenshot is saved to the test's tmp folder; with ``SMI_DEMO_SCREENSHOT=1``
it is also written (downscaled, palette PNG, < 300 KB) to docs/images/demo.png, taken with the
embedded default model when its weights are installed.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub.gallery import default_gallery
from smi_hub.registry import DEFAULT_MODEL, REGISTRY
from smi_hub.script_modules import load_file_module

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
DOCS_SHOT = REPO / "docs" / "images" / "demo.png"
K = 6  # not the default (5): the k control is exercised

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
]


def _load_app():
    return load_file_module("smi_hub_demo_app_browser", REPO / "demo/app.py", register=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shrink(src: Path, dst: Path, width: int = 1000, limit: int = 300_000) -> None:
    """Downscale to ``width`` px and store as a 256-colour PNG (well under ``limit`` bytes)."""
    im = Image.open(src).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    assert dst.stat().st_size < limit, f"{dst} is {dst.stat().st_size} bytes"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = _load_app()
    root = tmp_path_factory.mktemp("demo_browser")
    screenshot_for_docs = os.environ.get("SMI_DEMO_SCREENSHOT") == "1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMI_HUB_CACHE", str(root / "smi_cache"))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        if screenshot_for_docs and REGISTRY[DEFAULT_MODEL].available:
            model, gallery = DEFAULT_MODEL, default_gallery(root=root / "gallery", per_class=30)
        else:
            torch.manual_seed(0)
            net = smi_hub.SMIModel(
                arch="resnet18",
                base_width=16,
                small_stem=True,
                projector_dims=[32, 16],
                image_size=28,
                mean=[0.286] * 3,
                std=[0.353] * 3,
            )
            model = smi_hub.save_weights_folder(net.eval(), root / "model", name="test")
            gallery = default_gallery(root=root / "gallery", per_class=3)
        demo = app.build_app(model, gallery, cache_root=root / "cache", progress=False)
        assert demo.smi_engine.model is not None, demo.smi_engine.status_markdown()
        port = _free_port()
        app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield {"url": f"http://127.0.0.1:{port}/", "gallery": gallery, "root": root}
        finally:
            demo.close()
            torch.set_num_threads(before)


def test_upload_search_and_screenshot(server):
    try:
        from playwright import sync_api
    except ImportError as e:  # a missing install step is an error, not a skip
        pytest.fail(f"{e}: pip install -e '.[dev]' (playwright; no `playwright install` needed)")
    query = sorted((server["gallery"] / "Ankle_boot").glob("*.png"))[0]
    shot = server["root"] / "demo.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            remote: list[str] = []  # the page must not need the internet
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                    else remote.append(r.url)
                ),
            )
            page.goto(server["url"], wait_until="domcontentloaded")
            page.locator("#query input[type=file]").set_input_files(str(query))
            # k: the slider's number box, then Search
            number = page.locator("input[type=number]").first
            number.fill(str(K))
            number.press("Enter")
            page.locator("#search").click()
            neighbours = page.locator("#neighbours img")
            sync_api.expect(neighbours).to_have_count(K, timeout=30_000)
            for i in range(K):
                sync_api.expect(neighbours.nth(i)).to_be_visible()
            sync_api.expect(page.locator("#query-map img")).to_be_visible(timeout=30_000)
            sync_api.expect(page.locator("#status")).to_contain_text(f"Top {K} of")
            captions = page.locator("#neighbours").inner_text()
            assert "1. Ankle boot" in captions
            page.wait_for_timeout(300)  # let the images paint
            page.screenshot(path=str(shot), full_page=True)
            # another map type re-runs the search by itself
            page.get_by_text("Grad-CAM", exact=False).first.click()
            sync_api.expect(page.locator("#status")).to_contain_text("Grad-CAM", timeout=30_000)
            sync_api.expect(neighbours).to_have_count(K)
            assert not errors, errors
            assert not remote, remote
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("SMI_DEMO_SCREENSHOT") == "1":
        _shrink(shot, DOCS_SHOT)
    else:
        shutil.copy(shot, server["root"] / "demo_full.png")
