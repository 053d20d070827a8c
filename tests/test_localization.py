"""Localization maps on real photos bundled with scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

import smi_hub
from smi_hub import SMIModel
from smi_hub.localization import _input_tensor

# 1-5 s each (ResNet forwards and backwards on photos); not on make test-fast's critical paths
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> SMIModel:
    torch.manual_seed(0)
    # small stem: stride 8 and a ~110 px receptive field, so random features stay local
    return SMIModel(
        arch="resnet18", base_width=8, small_stem=True, projector_dims=[], image_size=64
    ).eval()


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(data, name)())


@pytest.mark.parametrize("name", ["chelsea", "astronaut", "coffee", "camera"])
def test_similarity_shape_range_and_reference(model, name):
    img = photo(name)
    h = smi_hub.localization_map(model, img)
    assert h.shape == (img.height, img.width)
    assert h.min() == 0 and h.max() == 1
    # independent reference: cosine of each location with the mean feature, upsampled
    x = _input_tensor(model, img.convert("RGB"), None)
    with torch.no_grad():
        fmap = model.forward_features(x)
    sim = F.cosine_similarity(fmap, fmap.mean(dim=(2, 3), keepdim=True), dim=1)
    up = F.interpolate(sim[None], size=h.shape, mode="bilinear", align_corners=False)[0, 0]
    ref = (up - up.min()) / (up.max() - up.min())
    assert torch.allclose(h, ref, atol=1e-5)


def test_query_feature_peaks_at_its_location(model):
    img = photo("chelsea")  # 451 x 300
    x = _input_tensor(model, img, 150)
    with torch.no_grad():
        fmap = model.forward_features(x)[0]  # C x h x w, stride 8
    gh, gw = fmap.shape[1:]
    for i, j in [(3, 5), (gh - 4, gw - 6), (gh // 2, gw // 2)]:
        h = smi_hub.localization_map(model, img, query=fmap[:, i, j], input_size=150)
        y, xx = np.unravel_index(h.numpy().argmax(), h.shape)
        # that cell covers image rows [i, i+1) * H / gh and columns [j, j+1) * W / gw
        assert i - 0.5 <= y * gh / img.height <= i + 1.5, (i, y)
        assert j - 0.5 <= xx * gw / img.width <= j + 1.5, (j, xx)


def test_pasted_patch_is_found(model):
    """A patch of the astronaut pasted into the coffee photo: the patch's own embedding (at the
    same scale) peaks inside the pasted region."""
    background, source = photo("coffee"), photo("astronaut")
    patch = source.crop((180, 40, 340, 200))  # the helmet and face, 160 x 160
    for px, py in [(20, 30), (400, 200), (230, 120)]:
        canvas = background.copy()
        canvas.paste(patch, (px, py))
        query = _input_tensor(model, patch, 160)
        with torch.no_grad():
            q = model.embed(query)[0]
        h = smi_hub.localization_map(model, canvas, query=q, input_size=400)
        y, x = np.unravel_index(h.numpy().argmax(), h.shape)
        assert px <= x < px + 160 and py <= y < py + 160, (px, py, x, y)


def test_query_image_path(model, tmp_path):
    img = photo("astronaut")
    img.crop((0, 0, 200, 200)).save(tmp_path / "q.png")
    h = smi_hub.localization_map(model, img, query=tmp_path / "q.png")
    assert h.shape == (512, 512) and float(h.min()) >= 0 and float(h.max()) <= 1
    with pytest.raises(ValueError, match="query has"):
        smi_hub.localization_map(model, img, query=torch.zeros(7))


def test_gradcam_equals_cam_of_the_probe(model):
    """For a linear probe on average-pooled features Grad-CAM is ReLU(w_target . A(x, y))."""
    img = photo("astronaut")
    probe = torch.nn.Linear(model.num_features, 3)
    h = smi_hub.localization_map(model, img, method="gradcam", probe=probe, target=2)
    x = _input_tensor(model, img, None)
    with torch.no_grad():
        fmap = model.forward_features(x)[0]
    cam = F.relu(torch.einsum("chw,c->hw", fmap, probe.weight[2].detach()))
    up = F.interpolate(cam[None, None], size=h.shape, mode="bilinear", align_corners=False)[0, 0]
    ref = (up - up.min()) / (up.max() - up.min())
    assert h.shape == (512, 512) and torch.allclose(h, ref, atol=1e-5)
    default = smi_hub.localization_map(model, img, method="gradcam", probe=probe)
    with torch.no_grad():
        top = int(probe(model.embed(x)).argmax())
    assert torch.allclose(
        default, smi_hub.localization_map(model, img, method="gradcam", probe=probe, target=top)
    )


def test_gradcam_points_at_the_target_object(model):
    """The cat photo on the left, a uniform gray area on the right. The probe's class 0 is the
    cat photo's embedding made orthogonal to the gray area's feature vector (blind to it):
    Grad-CAM must put its mass on the cat, and be ~0 inside the gray area."""
    canvas = Image.new("RGB", (600, 200), (128, 128, 128))
    cat = photo("chelsea").resize((300, 200))
    canvas.paste(cat, (0, 0))
    with torch.no_grad():
        fmap = model.forward_features(_input_tensor(model, canvas, 200))[0]
        gray = fmap[:, fmap.shape[1] // 2, fmap.shape[2] * 3 // 4]  # deep inside the gray area
        e_cat = model.embed(_input_tensor(model, cat, 200))[0]
    probe = torch.nn.Linear(model.num_features, 2, bias=False)
    with torch.no_grad():
        probe.weight[0] = e_cat - (e_cat @ gray) / (gray @ gray) * gray
        probe.weight[1] = gray
    h = smi_hub.localization_map(
        model, canvas, method="gradcam", probe=probe, target=0, input_size=200
    )
    assert h[:, :300].mean() > 3 * h[:, 300:].mean()
    assert h[60:140, 450:550].max() < 0.05  # the interior of the gray area
    h1 = smi_hub.localization_map(
        model, canvas, method="gradcam", probe=probe, target=1, input_size=200
    )
    assert h1[60:140, 420:580].std() < 0.01  # identical features -> an identical response


def test_gradcam_errors(model):
    img = photo("coffee")
    with pytest.raises(ValueError, match="needs probe"):
        smi_hub.localization_map(model, img, method="gradcam")
    with pytest.raises(ValueError, match="takes 10 features"):
        smi_hub.localization_map(model, img, method="gradcam", probe=torch.nn.Linear(10, 2))
    with pytest.raises(ValueError, match="outside"):
        smi_hub.localization_map(
            model, img, method="gradcam", probe=torch.nn.Linear(model.num_features, 2), target=5
        )
    with pytest.raises(ValueError, match="method"):
        smi_hub.localization_map(model, img, method="attention")


def test_overlay(model):
    img = photo("chelsea")
    h = smi_hub.localization_map(model, img)
    out = smi_hub.overlay(img, h, alpha=0.4)
    assert out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(smi_hub.overlay(img, h, alpha=0.0)), np.asarray(img))
    hot = smi_hub.overlay(img, torch.ones(10, 10), alpha=1.0)  # resized; 1.0 maps to red
    assert np.asarray(hot)[..., 0].min() > 100 and np.asarray(hot)[..., 2].max() < 30
    gray = smi_hub.overlay(photo("camera"), torch.zeros(512, 512))
    assert gray.mode == "RGB"
    with pytest.raises(ValueError):
        smi_hub.overlay(img, torch.zeros(3, 4, 5))
