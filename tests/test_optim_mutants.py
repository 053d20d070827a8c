"""training.optim: what its mutation run (docs/testing.md) found untested."""

from __future__ import annotations

import pytest
import torch

from training.optim import LARS, build_optimizer


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_a_group_added_later_trains_like_the_weights(name):
    """The optimizer's defaults are the weights group's hyperparameters, so a parameter group
    added later (add_param_group, e.g. a layer unfrozen during fine-tuning) gets the asked LR
    and weight decay, not the optimizer class's own defaults."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, name, lr=0.37, weight_decay=0.021, momentum=0.6, lars_eta=0.05)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})
    added, weights = opt.param_groups[-1], opt.param_groups[0]
    assert added["lr"] == weights["lr"] == 0.37
    assert added["weight_decay"] == weights["weight_decay"] == 0.021
    if name != "adamw":
        assert added["momentum"] == 0.6
    if name == "lars":
        assert type(opt) is LARS and added["eta"] == 0.05 and added["lars"] is True
