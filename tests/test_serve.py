"""`smi-hub serve`: the search service, the /v1/ JSON API (TestClient and one real uvicorn
server) and the out-of-domain profile recorded at build."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import png_header_only
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

import smi_hub
from smi_hub.cli import main
from smi_hub.gallery import default_gallery, label_of
from smi_hub.index import EmbeddingIndex
from smi_hub.ood import neighbour_profile, threshold_score, verdict
from smi_hub.search_service import SearchService
from smi_hub.serve import BodyLimit, create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_torch_thread):
    """A 30-image Fashion-MNIST gallery indexed by `smi-hub index` (flat, default model)."""
    root = tmp_path_factory.mktemp("serve")
    os.environ.setdefault("SMI_HUB_CACHE", str(root / "cache"))
    gallery = default_gallery(root=root / "gallery", per_class=3)
    (gallery / "secret.txt").write_text("not an image")
    assert main(["index", str(gallery), "-o", str(root / "idx"), "--kind", "flat"]) == 0
    service = SearchService(root / "idx")
    return {"root": root, "gallery": gallery, "index": root / "idx", "service": service}


@pytest.fixture(scope="module")
def client(built):
    return TestClient(create_app(built["service"]), raise_server_exceptions=False)


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def test_search_upload_matches_naive_reference(built, client):
    """ids, paths, labels and float scores agree with a float64 cosine loop over features
    extracted independently of the index."""
    files = sorted(built["gallery"].rglob("*.png"))
    query = files[7]
    r = client.post("/v1/search", files={"image": ("q.png", png_bytes(query))}, data={"k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    feats = smi_hub.extract_features(smi_hub.load(), [str(p) for p in files], progress=False)
    g = torch.nn.functional.normalize(feats.features.double(), dim=1)
    q = g[[str(p) for p in feats.paths].index(str(query))]
    scores = (g @ q).numpy()
    order = np.argsort(-scores)[:5]
    got = [Path(x["path"]) for x in body["results"]]
    assert got[0] == query.resolve() or got[0] == query
    assert [p.name for p in got] == [Path(feats.paths[i]).name for i in order]
    np.testing.assert_allclose([x["score"] for x in body["results"]], scores[order], atol=1e-4)
    assert all(isinstance(x["score"], float) and isinstance(x["id"], int) for x in body["results"])
    assert [x["label"] for x in body["results"]] == [label_of(p) for p in got]
    assert body["in_domain"] is True and 0 <= body["percentile"] <= 100
    assert body["k"] == 5 and body["top_score"] == pytest.approx(1.0, abs=1e-5)


def test_search_by_id_and_min_score(built, client):
    r = client.post("/v1/search", data={"id": "4", "k": "10", "min_score": "0.99"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["id"] == 4 and results[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(x["score"] >= 0.99 for x in results)
    r = client.post("/v1/search", data={"id": "4", "k": "10"})
    assert len(r.json()["results"]) == 10


def test_items_serves_only_indexed_images(built, client):
    service = built["service"]
    r = client.get("/v1/items/3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == Path(service.gallery_path(3)).read_bytes()
    for bad in ("30", "-1", "999999999999", "..%2Fsecret.txt", "secret.txt", "0.5"):
        r = client.get(f"/v1/items/{bad}")
        assert r.status_code in (404, 422), (bad, r.status_code)
        assert b"not an image" not in r.content
    assert client.get("/v1/items/../../etc/passwd").status_code == 404


@pytest.mark.parametrize(
    ("data", "files", "status", "says"),
    [
        ({}, None, 400, "exactly one of"),
        ({"id": "1"}, {"image": ("q.png", b"x")}, 400, "exactly one of"),
        ({"id": "1", "k": "0"}, None, 422, "greater than or equal"),
        ({"id": "1", "k": "101"}, None, 422, "less than or equal"),
        ({"id": "1", "k": "two"}, None, 422, "integer"),
        ({"id": "1", "min_score": "nan"}, None, 422, ""),
        ({"id": "30"}, None, 404, "no gallery item 30"),
        ({}, {"image": ("q.png", b"")}, 400, "empty"),
        ({}, {"image": ("q.png", b"GIF89a not really")}, 400, "not a readable image"),
        ({}, {"image": ("q.png", png_header_only(7900, 7900))}, 413, "more than the limit"),
        ({}, {"image": ("q.png", png_header_only(6000, 5000, 16))}, 413, "budget"),
    ],
    ids=[
        "none",
        "both",
        "k0",
        "k101",
        "kword",
        "nan",
        "id_out",
        "empty",
        "garbage",
        "bomb",
        "16bit",
    ],
)
def test_bad_inputs(client, data, files, status, says, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    r = client.post("/v1/search", data=data, files=files)
    assert r.status_code == status, r.text
    assert says in r.text
    assert all(w * h < 1_000_000 for w, h in decoded)  # nothing large was decoded


def test_body_limit_before_reading(built):
    app = BodyLimit(create_app(built["service"], max_upload=1000), 1000)
    with TestClient(app) as c:
        r = c.post("/v1/search", files={"image": ("q.png", b"\0" * 5000)})
        assert r.status_code == 413 and "limit of 1,000 bytes" in r.text

        def chunks():  # no Content-Length: counted while streaming
            yield b'--xx\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
            yield b"\0" * 800
            yield b"\0" * 800

        kind = {"content-type": "multipart/form-data; boundary=xx"}
        r = c.post("/v1/search", content=chunks(), headers=kind)
        assert r.status_code == 413, r.text
        assert c.get("/v1/healthz").status_code == 200


def test_failing_query_does_not_take_server_down(built, client, monkeypatch):
    def broken(image):
        raise RuntimeError("boom")

    monkeypatch.setattr(built["service"], "embed", broken)
    query = png_bytes(sorted(built["gallery"].rglob("*.png"))[0])
    r = client.post("/v1/search", files={"image": ("q.png", query)})
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]
    monkeypatch.undo()
    assert client.post("/v1/search", files={"image": ("q.png", query)}).status_code == 200


def test_info_healthz_openapi(built, client):
    assert client.get("/v1/healthz").json() == {"status": "ok", "items": 30}
    info = client.get("/v1/info").json()
    assert info["model"] == "smi_resnet18_fmnist" and info["index"]["kind"] == "flat"
    assert info["index"]["count"] == 30 and info["index"]["recall_at_10"] == 1.0
    assert info["index"]["refine"] == 0  # exact: nothing to re-rank
    assert info["preprocessing"]["input_size"] == [3, 28, 28]
    assert 0 < info["out_of_domain"]["threshold_score"] <= 1
    schema = client.get("/v1/openapi.json").json()
    assert {"/v1/search", "/v1/items/{item}", "/v1/healthz", "/v1/info"} <= set(schema["paths"])


def test_neighbour_profile_matches_naive_leave_one_out(built):
    """The recorded profile equals a float64 leave-one-out nearest-neighbour computation."""
    index = built["service"].index
    x = torch.nn.functional.normalize(index.embeddings.double(), dim=1)
    s = x @ x.T
    s.fill_diagonal_(-2)
    naive = np.percentile(s.max(dim=1).values.numpy(), np.arange(101))
    profile = index.metadata["neighbour_profile"]
    assert profile["queries"] == 30
    np.testing.assert_allclose(profile["percentiles"], naive, atol=1e-5)


def test_verdict_rule():
    """in_domain is false below the 1st percentile; the percentile is a rank in the table."""
    index = EmbeddingIndex().add(torch.eye(4).repeat(2, 1) + 0.01 * torch.randn(8, 4))
    ids = torch.arange(8)
    profile = neighbour_profile(index, index.embeddings[ids], ids)
    cut = threshold_score(profile)
    assert cut == pytest.approx(profile["percentiles"][1])
    low, high = verdict(cut - 1e-3, profile), verdict(max(profile["percentiles"]), profile)
    assert low.in_domain is False and low.percentile < 1
    assert high.in_domain is True and high.percentile == 100
    assert verdict(0.5, {}) == (None, None)
    assert verdict(float("nan"), profile) == (None, None)


@pytest.mark.slow
def test_out_of_domain_photos_flagged_in_domain_not(fmnist_test, one_torch_thread):
    """Real colour photos are flagged against a 600-image Fashion-MNIST gallery; held-out
    Fashion-MNIST images rarely are (benchmarks/ood_eval.py measures the rates at scale)."""
    import skimage.data

    images, _ = fmnist_test
    model = smi_hub.load()

    def embed(pils):
        return smi_hub.extract_features(model, pils, progress=False).features

    index = EmbeddingIndex.build(embed([Image.fromarray(a, mode="L") for a in images[:600]]))
    profile = index.metadata["neighbour_profile"]
    held_out = embed([Image.fromarray(a, mode="L") for a in images[600:700]])
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    photos = embed([Image.fromarray(getattr(skimage.data, n)()) for n in names])
    inside = [verdict(s, profile) for s in index.search(held_out, 1).scores[:, 0].tolist()]
    outside = [verdict(s, profile) for s in index.search(photos, 1).scores[:, 0].tolist()]
    assert sum(v.in_domain is False for v in inside) <= 5
    assert sum(v.in_domain is False for v in outside) >= len(names) // 2
    assert (
        np.median([v.percentile for v in outside]) < 5 < np.median([v.percentile for v in inside])
    )


def test_flat_index_is_memory_mapped(built):
    index = EmbeddingIndex.load(built["index"])
    maps = Path("/proc/self/maps").read_text()
    assert str((built["index"] / "embeddings.safetensors").resolve()) in maps
    eager = EmbeddingIndex.load(built["index"], mmap=False)
    assert torch.equal(index.embeddings, eager.embeddings)


def test_serve_cli_refusals(built, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(built["index"]), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", str(built["root"] / "nope"), "--port", "1"]) in (1, 2)
    assert main(["serve", str(built["gallery"]), "--port", str(port)]) == 1
    assert "not an index folder" in capsys.readouterr().err


@pytest.mark.slow
def test_real_uvicorn_two_workers(built):
    """`smi-hub serve` in a subprocess with 2 workers on 127.0.0.1: answers, and survives a
    bad request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smi_hub.cli", "serve", str(built["index"]), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--workers", "2"], env=env, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300  # two workers each load the model and the index
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        bad = httpx.post(f"{base}/search", files={"image": ("q.png", b"junk")})
        assert bad.status_code == 400
        query = png_bytes(sorted(built["gallery"].rglob("*.png"))[2])
        ok = httpx.post(f"{base}/search", files={"image": ("q.png", query)}, data={"k": "3"})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 3
        assert httpx.get(f"{base}/items/0").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_predict_with_index_prints_the_verdict(built, tmp_path, capsys):
    """`smi-hub predict --index` prints the out-of-domain line for an image unlike the index
    (a strict profile: only near-copies pass) and the in-domain line for a gallery image."""
    import shutil

    import skimage.data

    smi_hub.load(num_classes=3).save_pretrained(tmp_path / "clf")
    index = tmp_path / "idx"
    shutil.copytree(built["index"], index)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    query = sorted(built["gallery"].rglob("*.png"))[0]
    argv = ["predict", str(tmp_path / "clf"), str(photo), str(query), "--index", str(index)]
    strict = EmbeddingIndex.load(index)
    strict.metadata["neighbour_profile"] = {"percentiles": [0.9999] * 101}
    strict.save(index)
    assert main(argv) == 0
    photo_part, query_part = capsys.readouterr().out.split(str(query))
    assert "OUT OF DOMAIN" in photo_part and "in domain (percentile 100.0)" in query_part
