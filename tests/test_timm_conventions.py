"""timm's model conventions on SMIModel, checked against timm's own ResNet where it has them:
reset_classifier's signature, model(x) == forward_head(forward_features(x)), feature_info,
features_only, gradient checkpointing, group_matcher, no_weight_decay; and one num_classes
rule (the config's range) for smi_hub.load, SMIModel.from_pretrained and reset_classifier."""

from __future__ import annotations

import pytest
import timm
import timm.models
import timm.optim
import torch

import smi_hub
from smi_hub import SMIModel
from smi_hub.schema import MAX_NUM_CLASSES, validate_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(num_classes=0):
    torch.manual_seed(0)
    ours = SMIModel(arch="resnet18", projector_dims=[], image_size=64, num_classes=num_classes)
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def test_reset_classifier_has_timms_signature():
    ours, theirs = _pair(10)
    for m in (ours, theirs):
        m.reset_classifier(7, "avg")
        m.reset_classifier(5)  # global_pool=None keeps the pooling
        assert m.num_classes == 5 and m.get_classifier().out_features == 5
        assert m.get_classifier(name_only=True) == "fc"
    ours.reset_classifier(2, class_names=["cat", "dog"])
    assert ours.class_names == ["cat", "dog"]
    with pytest.raises(ValueError, match="class names go by keyword"):
        ours.reset_classifier(2, ["cat", "dog"])
    with pytest.raises(ValueError, match="global average only"):
        ours.reset_classifier(2, "max")


def test_model_equals_forward_head_of_forward_features_with_a_projector():
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", base_width=8, projector_dims=[32, 16], image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert torch.equal(model(x), model.forward_head(fmap))
        assert model(x).shape == (2, 16)
        assert torch.equal(model.forward_head(fmap, pre_logits=True), model.embed(x))
        model.reset_classifier(3)  # a classifier head takes the projector's place
        assert torch.equal(model(x), model.forward_head(fmap))
        assert model(x).shape == (2, 3)


def test_feature_info_and_features_only_match_timm():
    ours, _ = _pair()
    tm_info = timm.create_model("resnet18", pretrained=False).feature_info
    assert [(f["num_chs"], f["reduction"]) for f in ours.feature_info] == [
        (f["num_chs"], f["reduction"]) for f in tm_info
    ]
    assert [f["module"] for f in ours.feature_info][1:] == [f["module"] for f in tm_info][1:]
    small = SMIModel(arch="resnet50", base_width=4, small_stem=True, projector_dims=[])
    assert [f["reduction"] for f in small.feature_info] == [1, 1, 2, 4, 8]
    assert [f["num_chs"] for f in small.feature_info] == [4, 16, 32, 64, 128]


@pytest.mark.slow
def test_load_features_only(tmp_path):
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", projector_dims=[16], image_size=64, num_classes=3).eval()
    model.save_pretrained(tmp_path / "w", with_projector=True)
    feats = smi_hub.load(tmp_path / "w", features_only=True, out_indices=(1, 2, 3, 4))
    theirs = timm.create_model("resnet18", pretrained=False, features_only=True,
                               out_indices=(1, 2, 3, 4)).eval()  # fmt: skip
    theirs.load_state_dict(model.backbone_state_dict(), strict=True)
    assert feats.feature_info.channels() == theirs.feature_info.channels()
    assert feats.feature_info.reduction() == theirs.feature_info.reduction()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, ref = feats(x), theirs(x)
    assert len(ours) == 4
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", base_width=8, projector_dims=[16], image_size=32)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_group_matcher_and_no_weight_decay_group_like_timms_resnet():
    ours, theirs = _pair(10)
    for coarse in (False, True):
        assert ours.group_matcher(coarse) == theirs.group_matcher(coarse)
        mine = timm.models.group_parameters(ours, ours.group_matcher(coarse))
        ref = timm.models.group_parameters(theirs, theirs.group_matcher(coarse))
        assert mine == ref
    assert ours.no_weight_decay() == set()
    opt = timm.optim.create_optimizer_v2(ours, "sgd", lr=0.1, weight_decay=1e-4,
                                         layer_decay=0.7)  # fmt: skip
    ref = timm.optim.create_optimizer_v2(theirs, "sgd", lr=0.1, weight_decay=1e-4,
                                         layer_decay=0.7)  # fmt: skip
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (g["lr_scale"], g["weight_decay"], len(g["params"])) for g in ref.param_groups
    ]


BAD = [(1.5, TypeError), (True, TypeError), ("3", TypeError), ([3], TypeError),
       (10**7, ValueError), (100_001, ValueError), (-1, ValueError)]  # fmt: skip


@pytest.mark.parametrize(("value", "error"), BAD)
def test_num_classes_uses_the_configs_range(tmp_path, value, error):
    validate_config({"num_classes": MAX_NUM_CLASSES})  # the config's own upper bound
    with pytest.raises(smi_hub.WeightsError):
        validate_config({"num_classes": MAX_NUM_CLASSES + 1})
    with pytest.raises(error, match="must be an integer from 0"):
        smi_hub.load(num_classes=value)
    folder = smi_hub.load().save_pretrained(tmp_path / "w")
    with pytest.raises(error, match="must be an integer from 0"):
        SMIModel.from_pretrained(folder, num_classes=value)
    with pytest.raises(error, match="must be an integer from 0"):
        SMIModel(arch="resnet18", base_width=4, projector_dims=[], num_classes=value)


@pytest.mark.slow
def test_from_pretrained_num_classes_behaves_like_load(tmp_path):
    folder = smi_hub.load().save_pretrained(tmp_path / "w")
    torch.manual_seed(3)
    a = SMIModel.from_pretrained(folder, num_classes=10)
    torch.manual_seed(3)
    b = smi_hub.load(folder, num_classes=10)
    assert a.num_classes == b.num_classes == 10 and not a.training
    assert torch.equal(a.fc.weight, b.fc.weight)
    a.save_pretrained(tmp_path / "clf")
    kept = SMIModel.from_pretrained(tmp_path / "clf", num_classes=10)
    assert torch.equal(kept.fc.weight, a.fc.weight)  # a head of that size is kept
    assert SMIModel.from_pretrained(tmp_path / "clf", num_classes=0).fc is None
    big = smi_hub.load(folder, num_classes=MAX_NUM_CLASSES)  # the largest allowed loads back
    big.save_pretrained(tmp_path / "big")
    assert smi_hub.load(tmp_path / "big").num_classes == MAX_NUM_CLASSES
