"""Each torch.hub entry point gives what its name promises: the registry entry (architecture,
weights, preprocessing), or, where no weights are published, an error naming that entry and
a docstring saying what to pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import smi_hub
from smi_hub.errors import WeightsNotPublishedError
from smi_hub.registry import REGISTRY
from smi_hub.script_modules import load_file_module

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {  # entry point -> the registry entry it loads
    "smi_default": "smi_resnet18_fmnist",
    "smi_resnet18": "smi_resnet18_fmnist",
    "smi_resnet50": "smi_resnet50_imagenet",
    **{name: name for name in REGISTRY},
}


def _hubconf():
    return load_file_module("hubconf_entries_under_test", REPO / "hubconf.py", register=False)


def _entries(module) -> list[str]:
    """What ``torch.hub.list`` shows: the module's public callables."""
    return sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))


def test_every_entry_point_is_known():
    assert _entries(_hubconf()) == sorted(EXPECTED)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("entry", sorted(EXPECTED))
def test_entry_point_returns_its_registry_entry(entry):
    name = EXPECTED[entry]
    reg = REGISTRY[name]
    fn = getattr(_hubconf(), entry)
    blank = fn(pretrained=False)  # the architecture and preprocessing of that entry
    assert {k: blank.config[k] for k in reg.model_config} == reg.model_config
    expected_tf = smi_hub.get_transforms(smi_hub.load(name, pretrained=False))
    assert repr(smi_hub.get_transforms(blank)) == repr(expected_tf)
    if reg.available:  # the defaults load the entry's own weights, checked by sha256
        model = fn()
        assert _same_state(model, smi_hub.load(name))
        assert model.weights_config["weights_sha256"] == reg.sha256
        assert repr(smi_hub.get_transforms(model)) == repr(smi_hub.get_transforms(name))
    else:  # the defaults fail naming this entry; the docstring says what to pass instead
        with pytest.raises(WeightsNotPublishedError, match=f"No pretrained weights of '{name}'"):
            fn()
        doc = " ".join((fn.__doc__ or "").split())
        assert "weights=" in doc and "pretrained=False" in doc, doc


def test_entry_point_passes_num_classes_through():
    model = _hubconf().smi_default(num_classes=7)
    assert model.num_classes == 7 and model(torch.zeros(2, 3, 28, 28)).shape == (2, 7)
