"""Shared fixtures: small captured models at random init, and the ../shared data when present."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch

import hyq_fx

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (the ../shared folder beside the project)")
    return path


@pytest.fixture()
def one_thread():
    """Small ops on a shared, loaded machine run faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def xxs_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilevit_xxs", num_classes=10).eval()


@pytest.fixture(scope="session")
def xxs_input() -> torch.Tensor:
    return torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def _xxs_captured(xxs_model, xxs_input):
    return hyq_fx.capture(xxs_model, xxs_input[:2])


@pytest.fixture()
def xxs_gm(_xxs_captured):
    """A fresh copy of the captured mobilevit_xxs graph (passes rewrite in place)."""
    return copy.deepcopy(_xxs_captured)
