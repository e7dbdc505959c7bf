"""Fixtures for the model tests: small thread count (the machine is shared) and per-model debug inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from distseg.models import available_models

# Odd sizes that no network's total stride divides: exercises pad-to-multiple and crop-back.
ODD_2D = (37, 45)
ODD_3D = (19, 23, 21)


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)


def _odd_input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    spatial = ODD_2D if model.spatial_dims == 2 else ODD_3D
    return torch.randn(batch, model.in_channels, *spatial)


@pytest.fixture
def odd_input() -> Callable[..., torch.Tensor]:
    """`odd_input(model, batch=2)`: random (batch, in_channels, 37, 45) or (batch, in_channels, 19, 23, 21)."""
    return _odd_input


@pytest.fixture(params=available_models())
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param
