"""The demo over an index folder (`smi-hub demo --index`), its out-of-domain line, and the
files its server hands out (#18 item 9: only indexed images)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import skimage.data
from conftest import load_demo_app, load_demo_engine
from PIL import Image

from smi_hub.cli import main
from smi_hub.gallery import default_gallery
from smi_hub.search_service import SearchService

pytestmark = [
    pytest.mark.slow,  # the Gradio app over an index; not on make test-fast's critical paths
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.usefixtures("one_torch_thread"),
]

app = load_demo_app("smi_hub_demo_app_index")
core = load_demo_engine()  # app.core


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_index")
    gallery = default_gallery(root=root / "gallery", per_class=2)
    (gallery / "secret.txt").write_text("TOPSECRET-CONTENT")
    (gallery / ".git").mkdir()
    (gallery / ".git" / "config").write_text("[core] TOPSECRET-CONTENT")
    assert main(["index", str(gallery), "-o", str(root / "flat"), "--kind", "flat"]) == 0
    return {"root": root, "gallery": gallery, "flat": root / "flat"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(base: str, path: Path) -> httpx.Response:
    return httpx.get(f"{base}/gradio_api/file={path}", timeout=30)


@pytest.mark.parametrize("mode", ["gallery", "index"])
def test_server_hands_out_only_indexed_images(env, tmp_path, mode):
    """Files beside the gallery images, in hidden folders or outside are refused (403/404);
    before the fix `--gallery` allowed the whole folder."""
    kw = {"index": env["flat"]} if mode == "index" else {"gallery": env["gallery"]}
    demo = app.build_app(cache_root=tmp_path / "cache", progress=False, **kw)
    port = free_port()
    app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for path in (
            env["gallery"] / "secret.txt",
            env["gallery"] / ".git" / "config",
            env["flat"] / "index.json",
            Path("/etc/passwd"),
        ):
            r = fetch(base, path)
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"TOPSECRET" not in r.content and b"root:" not in r.content
        shown = core.example_images(demo.smi_engine)
        assert shown and all(Path(p).suffix == ".png" for p in shown)
        assert fetch(base, Path(shown[0])).status_code == 200  # the examples the page shows
    finally:
        demo.close()


def test_engine_over_index_uses_the_service(env, tmp_path):
    eng = core.SearchEngine(index=env["flat"], cache_root=tmp_path, progress=False)
    assert eng.model is not None and eng.gallery_error is None and len(eng.index) == 20
    assert not (tmp_path / "cache").exists()  # nothing re-extracted or cached
    query = sorted(env["gallery"].rglob("*.png"))[3]
    pil, emb, matches = eng.search(str(query), k=3)
    direct = SearchService(env["flat"]).search_image(Image.open(query), k=3)
    assert [str(m.path) for m in matches] == [r["path"] for r in direct["results"]]
    assert [m.score for m in matches] == pytest.approx([r["score"] for r in direct["results"]])
    items, overlay, status = eng.run(str(query), 3)
    assert len(items) == 3 and "in the gallery's usual range" in status
    with pytest.raises(core.DemoError, match="serves the index"):
        eng.set_model("smi_resnet18_fmnist_other")


def test_out_of_domain_shown_on_the_page(env, tmp_path):
    """The verdict is a visible line of the status (not a collapsed panel). A 20-image gallery
    is too small to tell photos apart (tests/test_serve.py and benchmarks/ood_eval.py measure
    detection on larger ones), so the profile here is made strict: only near-copies pass."""
    eng = core.SearchEngine(index=env["flat"], cache_root=tmp_path, progress=False)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    eng.service.profile = {"percentiles": [0.9999] * 101, "threshold_percentile": 1.0}
    _, _, status = app.search_page(eng, str(photo), 3, "similarity", 0.4)
    assert "Out of domain" in status and "percentile 0" in status, status
    query = sorted(env["gallery"].rglob("*.png"))[0]
    assert "Out of domain" not in app.search_page(eng, str(query), 3, "similarity", 0.4)[2]


def test_cli_demo_passes_index(demo_argv, env):
    assert main(["demo", "--index", str(env["flat"])]) == 0
    assert demo_argv() == ["--index", str(env["flat"])]
