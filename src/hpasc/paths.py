"""Where the data lives. The one place that knows about ``/kaggle``.

Resolution order of the competition data root: explicit argument > ``$HPASC_INPUT`` >
``<kaggle>/input/hpa-single-cell-image-classification`` when present >
``./input/hpa-single-cell-image-classification``. ``$HPASC_KAGGLE_ROOT`` stands in for ``/kaggle``
(tests simulate a Kaggle tree with it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

COMPETITION = "hpa-single-cell-image-classification"
MODELS_DATASET = "hpasc-models"
WHEELS_DATASET = "hpasc-wheels"


# a plain file-name stem: competition IDs are UUIDs, public HPA ones look like 10580_1610_C1_1
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class BadIDError(ValueError):
    """An image ID that is not a plain file-name stem (it would be joined into paths)."""


def is_plain_id(image_id: object) -> bool:
    """Whether ``check_id`` accepts ``image_id``."""
    return isinstance(image_id, str) and _PLAIN_ID.fullmatch(image_id) is not None


def check_id(image_id: object, where: str = "") -> str:
    """``image_id`` when it is a plain name (letters, digits, ``.``, ``_``, ``-``; not starting with a dot;
    at most 200 characters), else ``BadIDError``. Every path built from an ID goes through this, so an ID
    from a data file can never point outside its folder (``../x``, ``/abs``, ``C:x``, ``a\\b``)."""
    if is_plain_id(image_id):
        return image_id
    prefix = f"{where}: " if where else ""
    raise BadIDError(f"{prefix}image ID {image_id!r} is not a plain name (letters, digits, '.', '_', '-'; "
                     "no path separators, not starting with '.')")


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
