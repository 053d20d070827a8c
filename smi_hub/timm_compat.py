"""timm's conventions for smi-hub's ResNets: the classifier accessors, gradient checkpointing,
parameter groups and ``forward_intermediates`` (``TimmCompatMixin``, mixed into
``SMIModel``), and the ``features_only`` model (``SMIFeatures``).

The mixin reads what ``SMIModel`` defines: ``fc``, ``conv1``/``bn1``/``relu``/``maxpool``,
``_stage(i, x)``, ``_check_input(x)``, ``feature_info``, ``reset_classifier``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None -> all, int k -> the last k, else these
    (negative from the end); out-of-range values raise ``ValueError``."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: take the last 1 to {n} stages.")
        return list(range(n - indices, n))
    take = []
    for i in indices:
        j = n + i if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"Stage index {i} is out of range for {n} stages ({list(STAGES)}).")
        take.append(j)
    return take


class TimmCompatMixin:
    """timm's model methods, for a torchvision-layout ResNet (mixed into ``SMIModel``)."""

    grad_checkpointing: bool

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier head (``nn.Identity`` when there is none), or its name ``"fc"``
        with ``name_only``, as timm."""
        if name_only:
            return "fc"
        return self.fc if self.fc is not None else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass instead of storing
        them (less memory, about one more forward of compute), as timm."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups of a ResNet (for layer-wise learning-rate decay): the stem,
        then one group per stage (``coarse``) or per block; the head and projector fall into
        timm's last group."""
        return dict(
            stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exempt from weight decay beyond timm's default rule (which
        already exempts every bias and norm weight): none, as timm's ResNet."""
        return set()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: feature maps of stages 0 (stem, before the max-pool) to 4
        (``layer4``). ``indices``: the last n stages if an int, all if None, else these stage
        indices (negative from the end). Returns ``(final map, intermediates)``, or only the
        list with ``intermediates_only``. ``norm`` is accepted for timm compatibility (ResNets
        have no final norm). See :meth:`forward_stages` for maps keyed by stage name."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}.")
        self._check_input(x)
        take = take_indices(len(STAGES), indices)
        intermediates: list[torch.Tensor] = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        last = max(take) if stop_early else len(STAGES) - 1
        for i in range(1, last + 1):
            x = self._stage(i, x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


class FeatureInfo(list):
    """timm's ``FeatureInfo`` of the maps a features-only model returns: a list of dicts
    (``num_chs``, ``reduction``, ``module``) with timm's accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class SMIFeatures(nn.Module):
    """A backbone returning a list of feature maps, as timm's ``features_only=True`` models
    (``smi_hub.load(name, features_only=True, out_indices=(1, 2, 3, 4))``). ``out_indices``
    are stage indices: 0 the stem activation, 1-4 ``layer1``-``layer4`` (negative from the
    end); only as deep as needed is computed."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        take = take_indices(len(STAGES), list(out_indices))
        model.projector, model.projector_dims = None, []
        model.reset_classifier(0)
        self.model = model
        self.out_indices = take
        self.feature_info = FeatureInfo(model.feature_info[i] for i in take)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(  # type: ignore[return-value]
            x, indices=self.out_indices, stop_early=True, intermediates_only=True
        )
