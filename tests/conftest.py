"""Shared fixtures: the real HPA files beside the checkout, and a small synthetic dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_HPA = Path(os.environ.get("HPASC_SHARED_HPA", REPO.parent / "shared" / "hpa"))


@pytest.fixture(scope="session")
def real_hpa() -> Path:
    """``../shared/hpa`` (real train.csv, sample_submission.csv and three sample images)."""
    if not (SHARED_HPA / "train.csv").is_file():
        pytest.skip(f"real HPA files not found at {SHARED_HPA} (set HPASC_SHARED_HPA)")
    return SHARED_HPA


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic competition tree: 8 train and 3 test images of 256 px (seed 0)."""
    from hpasc.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth_small")
    synthesize(out, n_train=8, n_test=3, size=256, seed=0)
    return out


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on 2 shared cores, OpenMP oversubscription slows steps several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
