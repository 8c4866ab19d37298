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


TINY_RUN = {  # a timm test network at 32 px: milliseconds per batch on a CPU
    "model.name": "test_efficientnet", "model.embedding_dim": 16, "cells.size": 32,
    "inference.batch_size": 16, "inference.tta": ["none", "hflip"],
}


def _make_run(root: Path, config: str, fold: int, seed: int, **changes) -> Path:
    """A run folder with a randomly initialised model: config.yaml + best.pt, as hpasc.train writes."""
    import torch

    from hpasc.config import Config, replace, save_config
    from hpasc.models import build_model

    cfg = replace(Config(name=config), **{**TINY_RUN, **changes})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    run = root / config / f"fold{fold}"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.save({"model": model.state_dict()}, run / "best.pt")
    return run


@pytest.fixture(scope="session")
def make_run():
    """``make_run(root, config, fold, seed, **changes)`` -> a run folder with a random tiny model."""
    return _make_run


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on 2 shared cores, OpenMP oversubscription slows steps several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
