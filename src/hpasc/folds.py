"""Cross-validation folds of the training images, stratified over all 19 classes at once.

``MultilabelStratifiedKFold`` (iterative stratification, Sechidis et al. 2011) keeps every class's
images spread evenly over the folds, which a plain KFold cannot do for the rare classes (11 Mitotic
spindle has 78 images, 18 Negative 34). The committed top-level ``folds.csv`` is the output of
``make_folds`` on the real ``train.csv`` with the default seed.

With several sources (competition + public HPA images, ``hpasc external``) images of one antibody must
share a fold, or a validation antibody leaks into training: ``make_group_folds`` assigns whole groups
(multilabel-stratified, greedy) and can keep the folds of images already split (the committed
``folds.csv``), so the competition split does not move when public images join.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .fsutil import atomic_path, read_csv
from .labels import NUM_CLASSES, LabelError, multihot_matrix


COMPETITION = "competition"  # the source name of the competition images in label tables


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


def make_group_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42, group: str = "antibody",
                     keep: pd.DataFrame | None = None, source: str = "train table") -> pd.DataFrame:
    """``ID,Label[,group][,...]`` -> the same rows with ``fold``: images of one ``group`` value in one
    fold (an image without a value is its own group), classes balanced over folds.

    ``keep`` (ID, fold) fixes the fold of the images it lists, and with them of their whole group (a group
    kept in two folds is an error). The other groups are placed one by one — those holding the rarest
    classes and the most images first, ties in a seeded random order — each into the fold where it
    reduces most the squared shortfall of every class (and of the image count) against an even split.
    """
    _check_table(df, source)
    if n_folds < 2:
        raise FoldsError(f"{source}: n_folds must be at least 2, got {n_folds}")
    try:
        targets = multihot_matrix(df["Label"].astype(str)).astype(np.float64)
    except LabelError as exc:
        raise FoldsError(f"{source}: {exc}") from exc
    ids = df["ID"].astype(str).to_numpy()
    raw = df[group] if group in df else pd.Series([None] * len(df))
    keys = np.array([f"g:{g}" if isinstance(g, str) and g.strip() else f"i:{i}"
                     for g, i in zip(raw.tolist(), ids)], dtype=object)
    codes, uniques = pd.factorize(keys)
    n_groups = len(uniques)
    if n_groups < n_folds:
        raise FoldsError(f"{source}: {n_groups} group(s) cannot fill {n_folds} folds")
    g_counts = np.zeros((n_groups, NUM_CLASSES + 1))
    np.add.at(g_counts, codes, np.hstack([targets, np.ones((len(df), 1))]))  # last column: images
    fixed = np.full(n_groups, -1)
    if keep is not None:
        kept = dict(zip(keep["ID"].astype(str), keep["fold"].astype(int)))
        for code, image_id in zip(codes, ids):
            k = kept.get(image_id)
            if k is None:
                continue
            if not 0 <= k < n_folds:
                raise FoldsError(f"{source}: kept fold {k} of {image_id} is outside 0..{n_folds - 1}")
            if fixed[code] not in (-1, k):
                raise FoldsError(f"{source}: group {uniques[code][2:]!r} has kept images in folds {fixed[code]} "
                                 f"and {k}; one group must stay in one fold")
            fixed[code] = k
    totals = g_counts.sum(axis=0)
    scale = 1.0 / np.maximum(totals, 1.0) ** 2  # each class (and the image count) weighs the same
    load = np.zeros((n_folds, NUM_CLASSES + 1))
    for code in np.flatnonzero(fixed >= 0):
        load[fixed[code]] += g_counts[code]
    fold_of = fixed.copy()
    free = np.flatnonzero(fixed < 0)
    rarity = (g_counts[free, :NUM_CLASSES] / np.maximum(totals[:NUM_CLASSES], 1.0)).max(axis=1)
    jitter = np.random.default_rng(seed).permutation(len(free))
    order = free[np.lexsort((jitter, -g_counts[free, -1], -rarity))]
    target = totals / n_folds
    for code in order:
        g = g_counts[code]
        # adding g to fold k changes sum_k (load - target)^2 by 2 (load_k - target) g + g^2: pick the least
        gain = ((load - target) * (g * scale)).sum(axis=1)
        k = int(np.argmin(gain))
        load[k] += g
        fold_of[code] = k
    out = df.reset_index(drop=True).copy()
    out["fold"] = fold_of[codes].astype(np.int64)
    return out


def fold_class_counts(folds_df: pd.DataFrame) -> np.ndarray:
    """``(n_folds, 19)`` image counts per fold and class (the balance check of the folds)."""
    targets = multihot_matrix(folds_df["Label"].astype(str))
    n_folds = int(folds_df["fold"].max()) + 1
    counts = np.zeros((n_folds, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, folds_df["fold"].to_numpy(), targets.astype(np.int64))
    return counts


def read_label_tables(csvs: list[os.PathLike | str]) -> pd.DataFrame:
    """Several label CSVs (``ID,Label[,source][,antibody]...``) -> one table with a ``source`` column (the
    CSV's own, else ``competition``); an ID listed by two files is an error naming both."""
    frames, where = [], {}
    for csv in csvs:
        path = Path(csv)
        df = read_csv(path, "CSV", FoldsError, dtype=str, keep_default_na=False)
        _check_table(df, str(path))
        for image_id in df["ID"]:
            if image_id in where:
                raise FoldsError(f"{path}: image {image_id!r} is also in {where[image_id]}")
            where[image_id] = path
        if "source" not in df:
            df["source"] = COMPETITION
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def write_folds(train_csv: os.PathLike | str | list, out: os.PathLike | str, n_folds: int = 5,
                seed: int = 42, group: str = "antibody", keep: os.PathLike | str | None = None) -> pd.DataFrame:
    """Read one or several label CSVs, split them, write ``out`` atomically; returns the table written.

    One CSV without a ``group`` column and nothing kept: ``make_folds`` (ID,Label,fold — how the
    committed folds.csv is made). Otherwise ``make_group_folds`` over all the CSVs (ID, Label, source,
    the group column, fold), keeping the folds listed in ``keep``.
    """
    csvs = [train_csv] if isinstance(train_csv, (str, os.PathLike)) else list(train_csv)
    if not csvs:
        raise FoldsError("folds: no label CSV given")
    name = ", ".join(map(str, csvs))
    df = read_label_tables(csvs)
    if len(csvs) == 1 and group not in df and keep is None:
        folds = make_folds(df, n_folds=n_folds, seed=seed, source=name)
    else:
        kept = None
        if keep is not None:
            kept = read_csv(keep, "folds CSV", FoldsError, dtype={"ID": str})
            if not {"ID", "fold"} <= set(kept.columns):
                raise FoldsError(f"{keep}: expected columns ID,fold (a folds.csv)")
        folds = make_group_folds(df, n_folds=n_folds, seed=seed, group=group, keep=kept, source=name)
        columns = ["ID", "Label", "source"] + ([group] if group in folds else []) + ["fold"]
        folds = folds[columns]
    with atomic_path(out) as tmp:
        folds.to_csv(tmp, index=False)
    return folds
