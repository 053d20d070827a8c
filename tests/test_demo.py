"""The Gradio demo (demo/app.py): search, maps, messages, embedding cache, HTTP API."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import demo_model, load_demo_app, load_demo_engine, load_demo_module
from PIL import Image

import smi_hub
from smi_hub import fashion_mnist
from smi_hub.features import weights_digest
from smi_hub.gallery import default_gallery

# pandas deprecations inside gradio's queue, not ours
pytestmark = [
    pytest.mark.slow,  # the Gradio app; not on make test-fast's critical paths
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.usefixtures("one_torch_thread"),
]


app = load_demo_app("smi_hub_demo_app_test")
core = load_demo_engine()  # demo/engine.py, app.core
display = load_demo_module("display")  # demo/display.py, app.display


def make_model(seed: int) -> smi_hub.SMIModel:
    return demo_model(seed, base_width=16, projector_dims=[32, 16])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two weights folders (different weights), a 30-image Fashion-MNIST gallery."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMI_HUB_CACHE", str(root / "smi_cache"))
        a = smi_hub.save_weights_folder(make_model(1), root / "model_a", name="a")
        b = smi_hub.save_weights_folder(make_model(2), root / "model_b", name="b")
        try:
            gallery = default_gallery(root=root / "gallery", per_class=3)
        except FileNotFoundError as e:  # a missing install step is an error, not a skip
            pytest.fail(str(e))
        yield {"root": root, "a": a, "b": b, "gallery": gallery, "cache": root / "cache"}


@pytest.fixture(scope="module")
def engine(env):
    return core.SearchEngine(env["a"], env["gallery"], cache_root=env["cache"], progress=False)


def first_image(gallery: Path) -> Path:
    return sorted(gallery.rglob("*.png"))[0]


# ---- search and maps ------------------------------------------------------------------------


def test_search_returns_k_sorted_results_with_labels(engine, env):
    query = first_image(env["gallery"])
    pil, emb, matches = engine.search(str(query), k=7)
    assert len(matches) == 7 and emb.shape == (engine.model.num_features,)
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True)
    assert matches[0].path == query and matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert all(m.label in fashion_mnist.CLASSES for m in matches)
    assert all(m.path.is_file() and m.path.parent.parent == env["gallery"] for m in matches)
    # k larger than the gallery is capped, PIL and numpy queries work too
    assert len(engine.search(Image.open(query), k=100)[2]) == 30
    arr = np.asarray(Image.open(query))
    assert [m.path for m in engine.search(arr, k=3)[2]] == [m.path for m in matches[:3]]


@pytest.mark.parametrize("map_type", [*display.MAP_TYPES.values(), next(iter(display.MAP_TYPES))])
def test_page_output(engine, env, map_type):
    query = first_image(env["gallery"])
    items, overlay, status = app.search_page(engine, str(query), 4, map_type, 0.5)
    assert len(items) == 4
    labels = [caption.split(". ", 1)[1].rsplit(" · ", 1)[0] for _, caption in items]
    assert all(label in fashion_mnist.CLASSES for label in labels)
    scores = [float(caption.rsplit(" · ", 1)[1]) for _, caption in items]
    assert scores == sorted(scores, reverse=True)
    # 28 px images are shown upscaled (nearest, 8x), with the map blended in
    assert overlay.size == (224, 224) and all(img.size == (224, 224) for img, _ in items)
    plain = app.search_page(engine, str(query), 4, map_type, 0.0)[1]
    assert np.array_equal(
        np.asarray(plain), np.asarray(Image.open(query).convert("RGB").resize((224, 224), 0))
    )
    assert not np.array_equal(np.asarray(plain), np.asarray(overlay))
    assert "Top 4 of 30" in status


def test_maps_in_unit_range(engine, env):
    query = first_image(env["gallery"])
    pil, emb, matches = engine.search(str(query), k=3)
    for method in ("similarity", "gradcam"):
        qmap, nmaps, note = engine.maps(pil, emb, matches, method)
        assert qmap.shape == (28, 28) and len(nmaps) == 3
        for m in [qmap, *nmaps]:
            assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert "Grad-CAM for class" in note and len(engine.classes) == 10


def test_display_image_sizes():
    assert display.display_image(Image.new("L", (28, 28))).size == (224, 224)
    assert display.display_image(Image.new("RGB", (30, 20))).size == (210, 140)
    assert (
        max(display.display_image(Image.new("RGB", (2000, 1000))).size) == 2 * display.DISPLAY_SIZE
    )


# ---- messages instead of exceptions ---------------------------------------------------------


def test_bad_inputs_give_messages(engine, env, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    data = (env["gallery"] / "Bag").glob("*.png").__next__().read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = [
        (None, "Upload an image"),
        (str(text), "notes.png: not a readable image"),
        (str(truncated), "cut.png: not a readable image"),
        (str(tmp_path / "missing.png"), "no such file"),
        (np.zeros((2, 2, 7), np.float64), "Not an image array"),
        (12, "Not an image"),
    ]
    for image, expected in cases:
        items, overlay, status = app.search_page(engine, image, 5, "similarity", 0.4)
        assert items == [] and overlay is None and expected in status, (image, status)
        assert str(tmp_path) not in status  # the temp folder of an upload is not shown
    query = first_image(env["gallery"])
    assert "Unknown map type" in app.search_page(engine, str(query), 5, "nope", 0.4)[2]


def test_huge_image_refused(env, tmp_path):
    eng = core.SearchEngine(
        env["a"], env["gallery"], cache_root=env["cache"], progress=False, max_pixels=500
    )
    big = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(big)
    for image in (str(big), Image.open(big)):
        status = app.search_page(eng, image, 5, "similarity", 0.4)[2]
        assert "30x30 pixels is more than the limit of 500" in status


def test_empty_and_missing_gallery(env, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images here")
    query = first_image(env["gallery"])
    for gallery, expected in ((empty, "holds no images"), (tmp_path / "nope", "is not a folder")):
        eng = core.SearchEngine(env["a"], gallery, cache_root=env["cache"], progress=False)
        assert expected in eng.status_markdown()
        items, overlay, status = app.search_page(eng, str(query), 5, "similarity", 0.4)
        assert items == [] and expected in status
        assert core.example_images(eng) == []
    unreadable = tmp_path / "bad"
    (unreadable / "cls").mkdir(parents=True)
    (unreadable / "cls" / "x.png").write_text("not a png")
    eng = core.SearchEngine(env["a"], unreadable, cache_root=env["cache"], progress=False)
    assert "Skipped 1 unreadable" in eng.status_markdown()
    assert "could be read" in app.search_page(eng, str(query), 5, "similarity", 0.4)[2]


def test_model_that_cannot_load(env, tmp_path):
    eng = core.SearchEngine(
        tmp_path / "no_model", env["gallery"], cache_root=env["cache"], allow_any_model=True
    )  # what the page may load: tests/test_reliability_demo.py
    assert eng.model is None and "Could not load model" in eng.status_markdown()
    status = app.search_page(eng, str(first_image(env["gallery"])), 5, "similarity", 0.4)[2]
    assert "Could not load model" in status
    # loading a good one from the page, then a bad one: the good one stays
    assert "model_a" in app.load_model_page(eng, "", str(env["a"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    msg = app.load_model_page(eng, "", str(broken))
    assert "Could not load model" in msg and "not valid JSON" in msg
    assert eng.model_name == str(env["a"])
    assert "Pick a registered model" in app.load_model_page(eng, "", "  ")
    assert len(app.search_page(eng, str(first_image(env["gallery"])), 3)[0]) == 3


# ---- embedding cache ------------------------------------------------------------------------


def test_cache_reused_and_invalidated(env, tmp_path):
    gallery = default_gallery(root=tmp_path / "g", per_class=1)
    cache = tmp_path / "cache"
    kw = {"cache_root": cache, "progress": False}
    first = core.SearchEngine(env["a"], gallery, **kw)
    assert not first.cache_hit and (first.index_dir / "index.json").is_file()
    assert "computed and cached" in first.status_markdown()
    again = core.SearchEngine(env["a"], gallery, **kw)
    assert again.cache_hit and again.index_dir == first.index_dir
    assert torch.equal(again.index.embeddings, first.index.embeddings)
    assert "reused from" in again.status_markdown()

    # another model: other weights sha256, other cache entry, other embeddings
    other = core.SearchEngine(env["b"], gallery, **kw)
    assert not other.cache_hit and other.index_dir != first.index_dir
    assert not torch.allclose(other.index.embeddings, first.index.embeddings)
    other.set_model(str(env["a"]))  # switching back reuses the first entry
    assert other.cache_hit and other.index_dir == first.index_dir
    # a model not loaded from a folder is keyed by the sha256 of its state dict
    mem = core.SearchEngine(make_model(3), gallery, **kw)
    assert not mem.cache_hit and mem.model_key == weights_digest(make_model(3))
    assert core.SearchEngine(make_model(3), gallery, **kw).cache_hit

    # the gallery changes: a file added, then a file rewritten (mtime / size)
    Image.new("L", (28, 28), 255).save(gallery / "Bag" / "99999.png")
    grown = core.SearchEngine(env["a"], gallery, **kw)
    assert not grown.cache_hit and len(grown.index) == 11
    assert core.SearchEngine(env["a"], gallery, **kw).cache_hit
    target = gallery / "Bag" / "99999.png"
    Image.new("L", (28, 28), 0).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = core.SearchEngine(env["a"], gallery, **kw)
    assert not changed.cache_hit and len(changed.index) == 11


def test_default_cache_location(env, tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "c"))
    eng = core.SearchEngine(env["a"], env["gallery"], progress=False)
    assert eng.index_dir.parent == tmp_path / "c" / "demo"
    assert eng.index_dir.name.startswith(eng.model_key[:16])


# ---- the Gradio app: page, command line, HTTP API -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_and_cli_start_the_app(env, monkeypatch):
    import gradio as gr

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append((self, kw)))
    monkeypatch.setenv("SMI_HUB_CACHE", str(env["cache"]))
    argv = ["--model", str(env["a"]), "--gallery", str(env["gallery"])]
    assert app.main([*argv, "--port", "7999"]) == 0
    blocks, kw = calls[-1]
    assert kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7999
    assert kw["share"] is False and str(env["gallery"]) not in kw["allowed_paths"]
    # only the example images the page shows, each one a gallery image (#18 item 9)
    assert kw["allowed_paths"] == app.core.example_images(blocks.smi_engine)
    assert all(Path(p).parent.parent == Path(env["gallery"]) for p in kw["allowed_paths"])
    assert blocks.smi_engine.model_name == str(env["a"]) and len(blocks.smi_engine.index) == 30

    from smi_hub.cli import main as cli_main

    # a user's environment without the variable: the app itself turns Gradio's analytics off
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    assert cli_main(["demo", *argv, "--host", "0.0.0.0"]) == 0
    assert calls[-1][1]["server_name"] == "0.0.0.0" and calls[-1][1]["server_port"] is None
    assert calls[-1][0].analytics_enabled is False and not gr.analytics.analytics_enabled()
    assert app.build_parser().parse_args([]).host == "127.0.0.1"


@pytest.mark.slow
def test_api_through_gradio_client(env):
    from gradio_client import Client, handle_file

    demo = app.build_app(
        env["a"], env["gallery"], cache_root=env["cache"], progress=False, allow_any_model=True
    )
    assert isinstance(demo, app.gr.Blocks)
    port = free_port()
    app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        api = client.view_api(print_info=False, return_format="dict")
        assert {"/search", "/load_model"} <= set(api["named_endpoints"])
        query = first_image(env["gallery"])
        maps = ["similarity", "gradcam"]
        items, overlay, status = client.predict(
            handle_file(str(query)), 6, maps[1], 0.5, api_name="/search"
        )
        assert len(items) == 6 and Path(overlay).is_file()
        assert Image.open(overlay).size == (224, 224)
        captions = [it["caption"] for it in items]
        assert captions[0].startswith("1. ") and "· 1.000" in captions[0]
        assert all(
            c.split(". ", 1)[1].rsplit(" · ", 1)[0] in fashion_mnist.CLASSES for c in captions
        )
        assert "Grad-CAM" in status

        bad = env["root"] / "notes.txt"
        bad.write_text("hello")
        items, overlay, status = client.predict(
            handle_file(str(bad)), 3, maps[0], 0.5, api_name="/search"
        )
        assert items == [] and overlay is None and "notes.txt: not a readable image" in status

        msg = client.predict("", str(env["root"] / "nothing"), api_name="/load_model")
        assert "Could not load model" in msg
        msg = client.predict("", str(env["b"]), api_name="/load_model")
        assert "model_b" in msg and demo.smi_engine.model_name == str(env["b"])
        items = client.predict(handle_file(str(query)), 2, maps[0], 0.0, api_name="/search")[0]
        assert len(items) == 2
    finally:
        demo.close()
