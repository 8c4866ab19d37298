"""Cross-validation folds of the training images, stratified over all 19 classes at once.

``MultilabelStratifiedKFold`` (iterative stratification, Sechidis et al. 2011) keeps every class's
images spread evenly over the folds, which a plain KFold cannot do for the rare classes (11 Mitotic
spindle has 78 images, 18 Negative 34). The committed top-level ``folds.csv`` is the output of
``make_folds`` on the real ``train.csv`` with the default seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .fsutil import atomic_path, read_csv
from .labels import NUM_CLASSES, LabelError, multihot_matrix


class FoldsError(ValueError):
    """A train table that cannot be split (missing columns, duplicate IDs, too few images...)."""


def _check_table(df: pd.DataFrame, source: str) -> None:
    missing = [c for c in ("ID", "Label") if c not in df.columns]
    if missing:
        raise FoldsError(f"{source}: missing column(s) {missing}; expected ID,Label")
    dup = df["ID"][df["ID"].duplicated()]
    if len(dup):
        raise FoldsError(f"{source}: {len(dup)} duplicate ID(s), e.g. {dup.iloc[0]!r}")


def make_folds(train_df: pd.DataFrame, n_folds: int = 5, seed: int = 42,
               source: str = "train table") -> pd.DataFrame:
    """``ID,Label`` -> ``ID,Label,fold`` (fold in 0..n_folds-1), rows in the input order.

    Every image lands in exactly one validation fold. ``source`` names the table in errors.
    """
    _check_table(train_df, source)
    if n_folds < 2:
        raise FoldsError(f"{source}: n_folds must be at least 2, got {n_folds}")
    if len(train_df) < n_folds:
        raise FoldsError(f"{source}: {len(train_df)} images cannot fill {n_folds} folds")
    try:
        targets = multihot_matrix(train_df["Label"].astype(str))
    except LabelError as exc:
        raise FoldsError(f"{source}: {exc}") from exc
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(train_df), -1, dtype=np.int64)
    dummy_x = np.zeros((len(train_df), 1))
    for k, (_, val_idx) in enumerate(splitter.split(dummy_x, targets)):
        fold[val_idx] = k
    out = train_df[["ID", "Label"]].reset_index(drop=True).copy()
    out["fold"] = fold
    return out


def fold_class_counts(folds_df: pd.DataFrame) -> np.ndarray:
    """``(n_folds, 19)`` image counts per fold and class (the balance check of the folds)."""
    targets = multihot_matrix(folds_df["Label"].astype(str))
    n_folds = int(folds_df["fold"].max()) + 1
    counts = np.zeros((n_folds, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, folds_df["fold"].to_numpy(), targets.astype(np.int64))
    return counts


def write_folds(train_csv: os.PathLike | str, out: os.PathLike | str, n_folds: int = 5,
                seed: int = 42) -> pd.DataFrame:
    """Read ``train_csv``, split it, write ``out`` atomically; returns the table written."""
    train_csv = Path(train_csv)
    df = read_csv(train_csv, "CSV", FoldsError, dtype={"ID": str, "Label": str})
    folds = make_folds(df, n_folds=n_folds, seed=seed, source=str(train_csv))
    with atomic_path(out) as tmp:
        folds.to_csv(tmp, index=False)
    return folds
