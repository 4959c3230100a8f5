"""Shared fixtures.

Real data is read from ``$MEDDIFFSEG_DATA`` (default: ``../shared/data`` beside the checkout);
tests that need it are skipped with a clear reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MEDDIFFSEG_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "totalsegmentator").is_dir():
        pytest.skip(f"real data not found at {root} (set MEDDIFFSEG_DATA)")
    return root


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch):
    """Never read or write the real ~/.meddiffseg during tests."""
    home = tmp_path_factory.mktemp("meddiffseg_home")
    monkeypatch.setenv("MEDDIFFSEG_HOME", str(home))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny tensors
    run faster so, and do not spin against other processes on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
