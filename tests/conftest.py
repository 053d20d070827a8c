"""Shared test setup. Real images come from installed packages (see docs/data.md)."""

import pytest
import torch

from smi_hub import fashion_mnist


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist_test():
    """Fashion-MNIST test split (images N x 28 x 28 uint8, labels), from Debian's package."""
    try:
        return fashion_mnist.load_arrays("test")
    except FileNotFoundError as e:  # a missing install step is an error, not a skip
        pytest.fail(str(e))
