"""Fixtures of the method tests: the image windows and masks their tiny models are fed (two of 32×32)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def images():
    """Two image windows ``[2,1,32,32]`` in [-1, 1] (seed 123)."""
    import torch

    return torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(123)) * 2 - 1


@pytest.fixture(scope="module")
def masks():
    """Two random binary masks ``[2,1,32,32]`` (seed 2)."""
    import torch

    return (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
