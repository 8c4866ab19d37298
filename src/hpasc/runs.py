"""Where things live: the run folder, the work folder and data files named in a config.

The one owner of these layouts; every module that reads or writes them calls the functions here.

**Run folder** ``<train.out_dir>/<config name>/fold<k>/`` (pseudo-label rounds:
``<out_dir>/<name>/round<r>/fold<k>/``) holds ``config.yaml`` (the resolved config, all inference
needs), ``best.pt`` / ``last.pt``, ``log.csv``, ``oof.csv`` (``ID,cell_id,p0..p18``) and ``curves.png``.
A folder is a run when it holds ``config.yaml``; what else it must hold depends on the reader
(``best.pt`` to predict, ``oof.csv`` to cross-validate).

**Work folder** ``<data.work_dir>/``: ``masks/<split>/`` (segmentation label maps, ``split`` = train or
test), ``cells/<backend>-s<size>-p<padding>-<neighbours>/`` (the crop cache) and ``folds.csv`` (folds
made when none is given).

**Data files** named in a config (``data.folds_csv``, ``data.train_csv``, ``data.truth_csv``): an
absolute path is taken as it is; a relative one is looked up under the data root first
(``hpasc.paths.data_root``) and then under the working directory.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .labels import NUM_CLASSES

CONFIG_FILE = "config.yaml"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
LOG_FILE = "log.csv"
OOF_FILE = "oof.csv"
CURVES_FILE = "curves.png"

PROB_COLUMNS: tuple[str, ...] = tuple(f"p{c}" for c in range(NUM_CLASSES))
OOF_COLUMNS: tuple[str, ...] = ("ID", "cell_id", *PROB_COLUMNS)
_FOLD_RE = re.compile(r"fold(\d+)$")
_ROUND_RE = re.compile(r"round(\d+)$")


class RunFolderError(ValueError):
    """A run folder, OOF file or data file that is missing or malformed (names the path)."""


# --------------------------------------------------------------------------- run folders

def run_dir(cfg: Any, fold: int, round_: int | None = 0) -> Path:
    """``<train.out_dir>/<name>/fold<k>``; ``.../round<r>/fold<k>`` for pseudo-label round r >= 1 (round 0,
    or None, is the plain fold folder)."""
    base = Path(cfg.train.out_dir) / cfg.name
    if round_:
        base = base / f"round{round_}"
    return base / f"fold{fold}"


def fold_of(path: os.PathLike | str, error: type[Exception] = RunFolderError) -> int:
    """``.../fold3`` -> 3."""
    match = _FOLD_RE.search(Path(path).name)
    if not match:
        raise error(f"{path}: a fold run folder must be named fold<k>")
    return int(match.group(1))


def round_of(path: os.PathLike | str) -> int:
    """``.../round2/fold3`` -> 2; a fold folder directly under its config folder is round 0."""
    match = _ROUND_RE.search(Path(path).parent.name)
    return int(match.group(1)) if match else 0


def group_name(path: os.PathLike | str) -> str:
    """The ensemble member a fold run belongs to: ``<config>``, or ``<config>/round<r>`` in a
    pseudo-label round (rounds of one config are compared, not mixed)."""
    parent = Path(path).parent
    return f"{parent.parent.name}/{parent.name}" if round_of(path) else parent.name


def is_run(path: os.PathLike | str, need: Sequence[str] = ()) -> bool:
    """A folder with ``config.yaml`` and every file in ``need``."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and all((path / name).is_file() for name in need)


def find_runs(paths: Iterable[os.PathLike | str], need: Sequence[str] = (),
              error: type[Exception] = RunFolderError) -> list[Path]:
    """Run folders from arguments that are run folders or folders holding runs at any depth.

    A folder given directly is a run when it holds ``config.yaml`` or every file of ``need``; it must
    then hold all of ``need`` (else ``error`` names the missing file). Below a parent, folders without
    them are skipped. Order: as given, each parent's runs sorted; no duplicates.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for arg in paths:
        path = Path(arg)
        if (path / CONFIG_FILE).is_file() or (need and all((path / n).is_file() for n in need)):
            missing = [name for name in need if not (path / name).is_file()]
            if missing:
                raise error(f"{path / missing[0]}: not found in the run folder")
            found = [path]
        else:
            found = sorted(p.parent for p in path.rglob(CONFIG_FILE) if is_run(p.parent, need))
            if not found:
                wanted = " + ".join((CONFIG_FILE, *need))
                raise error(f"{path}: not a run folder ({wanted}) nor a folder of them: no "
                            f"{need[-1] if need else CONFIG_FILE} here nor in any run folder below")
        for run in found:
            key = run.resolve()
            if key not in seen:
                seen.add(key)
                out.append(run)
    return out


# --------------------------------------------------------------------------- out-of-fold predictions

def write_oof(path: os.PathLike | str, ids: Sequence[str], cell_ids: Sequence[int], probs: np.ndarray) -> None:
    """``ID, cell_id, p0..p18`` (atomic). 7 significant digits keep every float32 probability distinct
    from 0: rounding to fixed decimals turned tiny probabilities into 0, which the metric reads as
    "no prediction"."""
    from .fsutil import atomic_path

    probs = np.asarray(probs, np.float32)
    frame = pd.DataFrame({"ID": np.asarray(ids), "cell_id": np.asarray(cell_ids)})
    for c, column in enumerate(PROB_COLUMNS):
        frame[column] = probs[:, c]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.7g")


def read_oof(path: os.PathLike | str, error: type[Exception] = RunFolderError) -> pd.DataFrame:
    """One ``oof.csv`` (or a ``.cells.csv`` beside a submission) -> ``ID, cell_id, p0..p18`` validated:
    columns present, probabilities finite, each cell once, cell ids >= 1; problems name file and row."""
    from .fsutil import read_csv

    path = Path(path)
    df = read_csv(path, "out-of-fold file", error, dtype={"ID": str})
    missing = [c for c in OOF_COLUMNS if c not in df.columns]
    if missing:
        raise error(f"{path}: missing column(s) {', '.join(missing)}")
    probs = df[list(PROB_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(probs).all():
        bad = int(np.flatnonzero(~np.isfinite(probs).all(axis=1))[0])
        raise error(f"{path}: non-finite probability in row {bad + 2} (ID {df.ID.iloc[bad]})")
    df[list(PROB_COLUMNS)] = probs
    if df.duplicated(["ID", "cell_id"]).any():
        dup = df[df.duplicated(["ID", "cell_id"])].iloc[0]
        raise error(f"{path}: cell {dup.cell_id} of {dup.ID} appears twice")
    cell_ids = pd.to_numeric(df["cell_id"], errors="coerce")
    if cell_ids.isna().any() or (cell_ids != cell_ids.round()).any():
        bad = int(np.flatnonzero((cell_ids.isna() | (cell_ids != cell_ids.round())).to_numpy())[0])
        raise error(f"{path}: cell id {df.cell_id.iloc[bad]!r} in row {bad + 2} is not an integer")
    df["cell_id"] = cell_ids.astype(np.int64)
    if (df["cell_id"] < 1).any():  # cell k is row k-1 of an image's cells: 0 would silently read the last one
        bad = int(np.flatnonzero(df["cell_id"].to_numpy() < 1)[0])
        raise error(f"{path}: cell id {df.cell_id.iloc[bad]} in row {bad + 2} (ID {df.ID.iloc[bad]}) is not >= 1")
    return df


# --------------------------------------------------------------------------- the work folder

def masks_dir(work_dir: os.PathLike | str, split: str = "train") -> Path:
    """``<work>/masks/<split>``: the label maps ``hpasc segment`` writes for a split's images."""
    return Path(work_dir) / "masks" / split


def folds_file(work_dir: os.PathLike | str) -> Path:
    """``<work>/folds.csv``: folds made for a run when the config names none that exists."""
    return Path(work_dir) / "folds.csv"


def cells_cache_dir(work_dir: os.PathLike | str, backend: str, cells_cfg: Any) -> Path:
    """``<work>/cells/<backend>-s<size>-p<padding>-<neighbours>``: the crop cache of a config."""
    return (Path(work_dir) / "cells"
            / f"{backend}-s{cells_cfg.size}-p{cells_cfg.padding:g}-{cells_cfg.neighbours}")


# --------------------------------------------------------------------------- data files of a config

def resolve_data_file(cfg: Any, value: str | None) -> Path | None:
    """A data file named in the config, by the rule of the module docstring; None when absent."""
    from .paths import data_root

    if not value:
        return None
    path = Path(value)
    if path.is_absolute():
        return path if path.is_file() else None
    for candidate in (data_root(cfg.data.root) / path, path):
        if candidate.is_file():
            return candidate
    return None
