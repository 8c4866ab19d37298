"""Where the data lives. The one place that knows about ``/kaggle``.

Resolution order of the competition data root: explicit argument > ``$HPASC_INPUT`` >
``<kaggle>/input/hpa-single-cell-image-classification`` when present >
``./input/hpa-single-cell-image-classification``. ``$HPASC_KAGGLE_ROOT`` stands in for ``/kaggle``
(tests simulate a Kaggle tree with it).
"""
from __future__ import annotations

import os
from pathlib import Path

COMPETITION = "hpa-single-cell-image-classification"
MODELS_DATASET = "hpasc-models"
WHEELS_DATASET = "hpasc-wheels"


def kaggle_root() -> Path:
    """``$HPASC_KAGGLE_ROOT`` or ``/kaggle``."""
    return Path(os.environ.get("HPASC_KAGGLE_ROOT") or "/kaggle")


def kaggle_input(name: str) -> Path:
    """A dataset folder under the Kaggle input root."""
    return kaggle_root() / "input" / name


def kaggle_working() -> Path:
    return kaggle_root() / "working"


def on_kaggle() -> bool:
    """True when the competition data is mounted under the Kaggle input root."""
    return kaggle_input(COMPETITION).is_dir()


def data_root(arg: str | os.PathLike | None = None) -> Path:
    """The competition data root (holds ``train/``, ``test/``, ``train.csv``...)."""
    if arg:
        return Path(arg)
    env = os.environ.get("HPASC_INPUT")
    if env:
        return Path(env)
    if on_kaggle():
        return kaggle_input(COMPETITION)
    return Path("input") / COMPETITION
