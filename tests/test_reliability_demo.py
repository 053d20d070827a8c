"""The bad-input suite of the demo (docs/reliability.md, section Demo): what a visitor can make
the server load, fetch or decode, and the operator's command line."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import demo_model, load_demo_app, load_demo_engine, png_header_only
from gradio_client import Client, handle_file
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

import smi_hub
from smi_hub.fileio import sha256_file
from smi_hub.gallery import default_gallery

pytestmark = [
    pytest.mark.slow,  # the Gradio app, served; not on make test-fast's critical paths
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),
    pytest.mark.usefixtures("one_torch_thread"),
]


app = load_demo_app("smi_hub_demo_app_rel")
core = load_demo_engine()  # demo/engine.py, app.core


def make_model(seed: int) -> smi_hub.SMIModel:
    return demo_model(seed, base_width=4, projector_dims=[])


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    edit_config(folder, weights_sha256=sha256_file(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Good weights folders a and b, broken ones, a 10-image gallery."""
    root = tmp_path_factory.mktemp("reldemo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMI_HUB_CACHE", str(root / "smi_cache"))
        a = smi_hub.save_weights_folder(make_model(1), root / "model_a")
        b = smi_hub.save_weights_folder(make_model(2), root / "model_b")
        std0 = smi_hub.save_weights_folder(make_model(3), root / "std0")
        edit_config(std0, std=[0, 0, 0])
        nan = smi_hub.save_weights_folder(make_model(4), root / "nan")
        rewrite_weights(nan, lambda s: s["conv1.weight"].fill_(float("nan")))
        other = smi_hub.save_weights_folder(make_model(9), root / "c")  # never offered
        const = smi_hub.save_weights_folder(make_model(5), root / "const")

        rewrite_weights(const, lambda s: s["conv1.weight"].zero_())  # blind to its input
        try:
            gallery = default_gallery(root=root / "gallery", per_class=1)
        except FileNotFoundError as e:
            pytest.fail(str(e))
        yield {
            "root": root,
            "a": a,
            "b": b,
            "std0": std0,
            "nan": nan,
            "const": const,
            "c": other,
            "gallery": gallery,
            "cache": root / "cache",
        }


def make_engine(env, **kw):
    models = kw.pop("models", [str(env["b"]), str(env["std0"]), str(env["nan"]), str(env["const"])])
    return core.SearchEngine(
        str(env["a"]), env["gallery"], cache_root=env["cache"], progress=False, models=models, **kw
    )


@pytest.fixture(scope="module")
def engine(env):
    return make_engine(env)


def first_image(gallery: Path) -> Path:
    return sorted(gallery.rglob("*.png"))[0]


class Recorder(BaseHTTPRequestHandler):
    """An HTTP server that records every request and answers 404."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        Recorder.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.requests.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(autouse=True)
def _online(monkeypatch, recorder):
    """Offline mode off (it would hide a request), and the Hugging Face Hub at the recorder:
    every download the page attempted, by URL or repo id, would show in ``Recorder.requests``."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "SMI_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", recorder)
    monkeypatch.setenv("HF_ENDPOINT", recorder)


# ============================================================================================
# What a visitor can make the page load
# ============================================================================================

UNOFFERED = {
    "etc": "/etc",
    "nonexistent": "/nonexistent/weights",
    "etc_passwd": "/etc/passwd",
    "home": "~",
    "parent": "../",
    "url_local": "{url}/x/",
    "url_archive": "{url}/w.zip#sha256=" + "0" * 64,
    "url_https": "https://example.invalid/weights/",
    "file_url": "file:///etc",
    "hf_repo_id": "someone/some-model",
    "unpublished_registry_name": "smi_resnet50_imagenet",
    "unlisted_good_folder": "{c}",
    "offered_folder_trailing_slash": "{b}/",
    "traversal_to_offered": "{b}/../model_b",
}


@pytest.mark.parametrize("field", ["name", "folder"])
@pytest.mark.parametrize("case", list(UNOFFERED))
def test_unoffered_model_refused_uniformly(env, engine, recorder, case, field):
    target = UNOFFERED[case].format(url=recorder, b=env["b"], c=env["c"])
    before = (engine.model, engine.model_name)
    Recorder.requests.clear()
    args = (target, "") if field == "name" else ("", target)
    msg = app.load_model_page(engine, *args)
    assert (engine.model, engine.model_name) == before
    assert Recorder.requests == []
    shown = target if len(target) <= 60 else target[:57] + "..."
    # the same answer for every value: nothing about whether it exists or what it holds
    reference = app.load_model_page(engine, "/nonexistent-reference", "")
    refusal = msg.rsplit("  \n", 1)[1]  # after the status lines, which did not change
    assert refusal.replace(repr(shown), "X") == reference.rsplit("  \n", 1)[1].replace(
        repr("/nonexistent-reference"), "X"
    )
    assert "does not offer the model" in refusal and msg.startswith(engine.status_markdown())


@pytest.mark.parametrize(
    "offered", ["b_by_name", "b_by_folder", "a_back"], ids=["name", "folder", "switch_back"]
)
def test_offered_models_load(env, offered):
    eng = make_engine(env)
    target = str(env["a"] if offered == "a_back" else env["b"])
    args = ("", target) if offered == "b_by_folder" else (target, "")
    if offered == "a_back":
        app.load_model_page(eng, str(env["b"]), "")
    app.load_model_page(eng, *args)
    assert eng.model_name == target and eng.model_error is None
    assert target in eng.offered


def test_offered_list_is_registry_plus_command_line(env):
    eng = make_engine(env, models=[str(env["b"])])
    assert eng.offered == [*core.available_models(), str(env["a"]), str(env["b"])]
    assert "smi_resnet50_imagenet" not in eng.offered  # not published: not offered


def test_allow_any_model_loads_unlisted_and_fetches(env, recorder):
    eng = make_engine(env, allow_any_model=True)
    app.load_model_page(eng, "", str(env["c"]))
    assert eng.model_name == str(env["c"]) and eng.model_error is None
    for target in (f"{recorder}/x/", "someone/some-model"):
        Recorder.requests.clear()
        msg = app.load_model_page(eng, "", target)
        assert Recorder.requests, f"with --allow-any-model {target} is fetched (the recorder works)"
        assert "Could not load model" in msg and eng.model_name == str(env["c"])


SELF_CHECK = {
    "std_zero_config": ("std0", "std = [0, 0, 0]"),
    "nan_weights": ("nan", "NaN or infinite"),
    "constant_features": ("const", "same features for different images"),
}


@pytest.mark.parametrize("case", list(SELF_CHECK))
def test_model_failing_self_check_refused_previous_stays(env, case):
    eng = make_engine(env)
    key, expected = SELF_CHECK[case]
    query = first_image(env["gallery"])
    before = eng.search(str(query), k=3)[2]
    with pytest.warns() if case == "nan_weights" else _nothing():
        msg = app.load_model_page(eng, "", str(env[key]))
    assert "Could not load model" in msg and expected in msg, msg
    assert eng.model_name == str(env["a"])
    assert [m.path for m in eng.search(str(query), k=3)[2]] == [m.path for m in before]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gallery_with_broken_link_and_locked_folder(env, tmp_path, deny_listing):
    import shutil

    gallery = Path(shutil.copytree(env["gallery"], tmp_path / "g"))
    (gallery / "Bag" / "dead.png").symlink_to(tmp_path / "nowhere.png")
    (gallery / "locked").mkdir()
    deny_listing(gallery / "locked")
    eng = core.SearchEngine(str(env["a"]), gallery, cache_root=tmp_path / "c", progress=False)
    assert eng.gallery_error is None and len(eng.index) == 10
    assert sorted(name for name, _ in eng.skipped) == ["dead.png", "locked"]
    assert "Skipped 2 unreadable" in eng.status_markdown()
    assert all(Path(p).is_file() for p in core.example_images(eng))


def test_self_check_at_start(env):
    eng = core.SearchEngine(
        str(env["const"]), env["gallery"], cache_root=env["cache"], progress=False
    )
    assert eng.model is None and "same features" in eng.status_markdown()


# ============================================================================================
# What a visitor can make the server decode
# ============================================================================================


QUERIES = {
    "1bit_7900": ((7900, 7900, 1, 0), "7900x7900 pixels is more than the limit of 40,000,000"),
    "rgb_10000": ((10000, 10000, 8, 2), "more than the limit of 40,000,000"),
    "pillow_bomb": ((20000, 20000, 8, 0), "more than the limit of 40,000,000"),
    "rgba_30mp_budget": ((6000, 5000, 8, 6), "more than the budget of 512 MiB"),
    "16bit_30mp_budget": ((6000, 5000, 16, 0), "more than the budget of 512 MiB"),
    "max_dimension": ((2**31 - 1, 1, 1, 0), "more than the limit"),
}


@pytest.mark.parametrize("case", list(QUERIES))
def test_large_query_refused_before_decoding(engine, tmp_path, case, monkeypatch):
    size, expected = QUERIES[case]
    path = tmp_path / "q.png"
    path.write_bytes(png_header_only(*size))
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    items, overlay, status = app.search_page(engine, str(path), 5, "similarity", 0.4)
    assert items == [] and expected in status, status
    assert decoded == []
    assert str(tmp_path) not in status


def test_large_pil_query_refused(engine):
    status = app.search_page(engine, Image.new("1", (7000, 7000)), 5, "similarity", 0.4)[2]
    assert "more than the limit of 40,000,000" in status


def test_keyed_pil_query_priced_as_its_composite(env):
    """An L image with a PNG transparency key is composited through RGBA (17 bytes a pixel):
    a budget that fits the plain L image (5 bytes a pixel) refuses the keyed one."""
    eng = make_engine(env, max_decode_bytes=28 * 28 * 10)
    plain = Image.new("L", (28, 28), 90)
    keyed = Image.new("L", (28, 28), 90)
    keyed.info["transparency"] = 90
    assert "budget" not in app.search_page(eng, plain, 5, "similarity", 0.4)[2]
    assert "more than the budget" in app.search_page(eng, keyed, 5, "similarity", 0.4)[2]


def test_max_pixels_configurable(env, tmp_path):
    eng = make_engine(env, max_pixels=100)
    big = tmp_path / "b.png"
    Image.new("L", (28, 28)).save(big)
    assert "28x28 pixels is more than the limit of 100" in app.search_page(eng, str(big))[2]


def test_decoding_outside_the_engine_lock(env, monkeypatch):
    """A query stuck in decoding does not hold the model lock: another search completes."""
    eng = make_engine(env)
    gallery = first_image(env["gallery"])
    slow = env["root"] / "slow.png"
    Image.open(gallery).save(slow)
    entered, release = threading.Event(), threading.Event()
    real = core.load_image

    def load_image(path, *args, **kw):
        if Path(path).name == "slow.png":
            entered.set()
            assert release.wait(60)
        return real(path, *args, **kw)

    monkeypatch.setattr(core, "load_image", load_image)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("slow", eng.run(str(slow), 3)))
    t.start()
    try:
        assert entered.wait(60)
        done = threading.Thread(target=lambda: results.setdefault("fast", eng.run(str(gallery), 3)))
        done.start()
        done.join(120)
        assert "fast" in results and len(results["fast"][0]) == 3
    finally:
        release.set()
        t.join(120)
    assert len(results["slow"][0]) == 3


def test_model_load_does_not_block_searches(env, tmp_path, monkeypatch):
    """While a new model embeds the gallery, searches go on with the current model."""
    eng = make_engine(env)
    eng.cache_root = tmp_path / "fresh"  # the new model's gallery index must be computed
    query = first_image(env["gallery"])
    entered, release = threading.Event(), threading.Event()
    real = core.smi_hub.extract_features

    def extract(model, images, **kw):
        if model is not eng.model and len(images) == len(eng.files):  # the new model's index
            entered.set()
            assert release.wait(60)
        return real(model, images, **kw)

    monkeypatch.setattr(core.smi_hub, "extract_features", extract)
    loader = threading.Thread(target=lambda: app.load_model_page(eng, str(env["b"]), ""))
    loader.start()
    try:
        assert entered.wait(60)
        assert eng.model_name == str(env["a"])
        found = {}
        search = threading.Thread(target=lambda: found.setdefault("r", eng.run(str(query), 3)))
        search.start()
        search.join(120)
        assert "r" in found and len(found["r"][0]) == 3
    finally:
        release.set()
        loader.join(120)
    assert eng.model_name == str(env["b"]) and eng.index_dir.parent == tmp_path / "fresh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(env):
    demo = app.build_app(
        str(env["a"]),
        env["gallery"],
        cache_root=env["cache"],
        progress=False,
        models=[str(env["b"])],
    )
    port = free_port()
    app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


@pytest.mark.parametrize("field", ["name", "folder"])
@pytest.mark.parametrize("case", ["etc", "nonexistent", "url_local", "hf_repo_id"])
def test_http_load_model_refused(server, env, recorder, case, field):
    demo, client = server
    target = UNOFFERED[case].format(url=recorder)
    Recorder.requests.clear()
    args = (target, "") if field == "name" else ("", target)
    msg = client.predict(*args, api_name="/load_model")
    reference = client.predict("", "/nonexistent-reference", api_name="/load_model")
    assert msg.replace(repr(target), "X") == reference.replace(repr("/nonexistent-reference"), "X")
    assert Recorder.requests == [] and demo.smi_engine.model_name == str(env["a"])


def test_http_offered_model_loads(server, env):
    demo, client = server
    msg = client.predict(str(env["b"]), "", api_name="/load_model")
    assert demo.smi_engine.model_name == str(env["b"]) and "does not offer" not in msg
    client.predict(str(env["a"]), "", api_name="/load_model")
    assert demo.smi_engine.model_name == str(env["a"])


def test_http_bomb_upload_not_decoded(server, tmp_path, monkeypatch):
    """Gradio itself must not decode the upload (it converted every upload to RGB)."""
    demo, client = server
    path = tmp_path / "bomb.png"
    Image.new("1", (7900, 7900)).save(path)  # 62 M pixels, a few KB
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    items, overlay, status = client.predict(
        handle_file(str(path)), 3, "similarity", 0.4, api_name="/search"
    )
    assert items == [] and "more than the limit of 40,000,000" in status
    assert (7900, 7900) not in decoded


def test_http_data_url_refused(server):
    _, client = server
    tiny = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
    with pytest.raises(Exception, match="data: URLs are not accepted"):
        client.predict(
            {"url": tiny, "meta": {"_type": "gradio.FileData"}},
            3,
            "similarity",
            0.4,
            api_name="/search",
        )


def raw_search(base: str, payload: dict) -> str:
    """The /search event of a hand-made request (no gradio_client, which uploads local files
    named in a FileData itself): the text of its last server-sent event."""
    import httpx

    with httpx.Client(base_url=base, timeout=120) as http:
        body = {"data": [payload, 3, "similarity", 0.4]}
        event = http.post("/gradio_api/call/search", json=body).json()["event_id"]
        return http.get(f"/gradio_api/call/search/{event}").text


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/nonexistent/x.png", "{gallery}"], ids=["etc", "missing", "gallery"]
)
def test_http_path_outside_uploads_refused(server, env, path):
    """A FileData path the client made up is never read, whatever it points to."""
    demo, client = server
    path = path.format(gallery=first_image(env["gallery"]))
    answer = raw_search(client.src, {"path": path, "meta": {"_type": "gradio.FileData"}})
    assert "event: error" in answer and "root:" not in answer, answer
    assert "1." not in answer  # no neighbours of a server file


def test_search_events_run_concurrently(server):
    demo, _ = server
    limits = {d.api_name: d.concurrency_limit for d in demo.fns.values()}
    assert limits["search"] == app.SEARCH_CONCURRENCY > 1
    assert limits["load_model"] in (1, "default")  # the queue's default: one at a time


# ============================================================================================
# The operator's command line
# ============================================================================================


def test_port_in_use(env, capsys):
    from smi_hub.cli import main as cli_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert app.main(["--model", str(env["a"]), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
        assert cli_main(["demo", "--port", str(port)]) == 2
        assert "pick another --port" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["192.0.2.1", "::ffff:bad"], ids=["not_this_machine", "bad_ipv6"])
def test_host_not_bindable(env, capsys, host):
    assert app.main(["--model", str(env["a"]), "--host", host]) == 2
    assert f"cannot listen on {host}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--port", "0"], ["--port", "70000"], ["--port", "http"], ["--max-pixels", "0"]],
    ids=["port_zero", "port_too_big", "port_text", "max_pixels_zero"],
)
def test_bad_demo_arguments(argv, capsys):
    from smi_hub.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["demo", *argv])
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_command_line_offers_models(env, monkeypatch):
    calls = []
    monkeypatch.setattr(app.gr.Blocks, "launch", lambda self, **kw: calls.append((self, kw)))
    monkeypatch.setenv("SMI_HUB_CACHE", str(env["cache"]))
    argv = ["--model", str(env["a"]), "--model", str(env["b"]), "--gallery", str(env["gallery"])]
    assert app.main(argv) == 0
    engine = calls[-1][0].smi_engine
    assert engine.model_name == str(env["a"]) and not engine.allow_any_model
    assert engine.offered[-2:] == [str(env["a"]), str(env["b"])]
    assert calls[-1][1]["server_name"] == "127.0.0.1" and calls[-1][1]["max_file_size"]
    assert app.main([*argv, "--allow-any-model"]) == 0
    assert calls[-1][0].smi_engine.allow_any_model


def test_cli_forwards_demo_flags(demo_argv):
    import smi_hub.cli as cli

    argv = ["demo", "--model", "m1", "--model", "m2", "--allow-any-model", "--max-pixels", "99"]
    assert cli.main(argv) == 0
    assert demo_argv() == [
        "--model",
        "m1",
        "--model",
        "m2",
        "--max-pixels",
        "99",
        "--allow-any-model",
    ]


def test_engine_never_decodes_before_size_check(engine, tmp_path):
    """A numpy array query is checked by size too (Image.fromarray copies without decoding)."""
    arr = np.zeros((7000, 7000), np.uint8)
    assert "more than the limit" in app.search_page(engine, arr, 5, "similarity", 0.4)[2]
