"""Pseudo-label rounds: out-of-fold cell predictions of round r-1 become the cell targets of round r.

Round 0 learns from the image labels given to every cell (weak, noisy). Its out-of-fold predictions
say, for each training cell, how much it looks like each class — measured by a model that never saw
that cell's image. Round r >= 1 trains on soft cell targets made from them (``pseudo_targets``):

1. **restricted to the image's labels** — a class the image does not carry is 0 for all its cells (the
   image labels are right about what is absent);
2. **scaled within the image** (``pseudo.scale``): ``image_max`` divides each class column by its
   largest value among the image's cells, so the most typical cell of every image label is a full
   positive (every image label is carried by at least one cell); ``raw`` keeps the probabilities;
3. **sharpened** by ``pseudo.power`` (q ** power; > 1 pushes uncertain cells toward 0);
4. **per-cell Negative** (``pseudo.negative``): in a positive image a cell is Negative as much as it
   carries none of the image's labels, ``1 - max_c q_c``; all cells of a Negative image stay Negative;
5. **mixed** with the image labels: ``weight * pseudo + (1 - weight) * image labels``.

A round may be shorter than round 0 and start where round r-1 ended (``round_config``): ``pseudo.init:
previous`` loads round r-1's ``best.pt`` of the same fold, ``pseudo.epochs`` and ``pseudo.lr`` replace
``train.epochs`` and ``train.lr``. A warm round is a fine-tuning on better targets, at a fraction of a
round from scratch (the demo: 4 epochs at lr 0.002 after 12).

Cells without an out-of-fold row (their image's fold was not trained in round r-1) keep their image
labels; ``round_targets`` says how many. The validation fold's own predictions of round r-1 were made by
models that trained on the images of this fold's training set — weak labels only, never the cells'
truth; this is how the winning teams ran their rounds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import runs
from ..labels import NEGATIVE, NUM_CLASSES

log = logging.getLogger(__name__)

PSEUDO_SCALES = ("image_max", "raw")  # pseudo.scale (checked when a config loads)
PSEUDO_INITS = ("scratch", "previous")  # pseudo.init: a round's starting weights


class PseudoLabelError(ValueError):
    """A pseudo-label round that cannot start (no out-of-fold predictions of the round before)."""


def pseudo_targets(probs: np.ndarray, image_targets: np.ndarray, image_ids, scale: str = "image_max",
                   power: float = 1.0, negative: bool = True, weight: float = 1.0) -> np.ndarray:
    """Soft cell targets (n, 19) from out-of-fold probabilities (n, 19), the cells' image labels (n, 19)
    and their image ids (n,) — the steps of the module doc."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(image_targets, np.float64) > 0.5
    ids = np.asarray(image_ids)
    if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != NUM_CLASSES or len(ids) != len(probs):
        raise ValueError(f"pseudo_targets: probs {probs.shape}, image targets {labels.shape} and "
                         f"{len(ids)} image ids must describe the same (n, {NUM_CLASSES}) cells")
    if scale not in PSEUDO_SCALES:
        raise ValueError(f"pseudo.scale {scale!r}: expected one of {', '.join(PSEUDO_SCALES)}")
    q = np.where(labels, np.clip(probs, 0.0, 1.0), 0.0)
    q[:, NEGATIVE] = 0.0
    if scale == "image_max" and len(q):
        _, group = np.unique(ids, return_inverse=True)
        group = group.reshape(-1)
        top = np.zeros((int(group.max()) + 1, NUM_CLASSES))
        np.maximum.at(top, group, q)
        q = np.divide(q, top[group], out=np.zeros_like(q), where=top[group] > 0)
    if power != 1.0:
        q = q ** power
    negative_image = labels[:, NEGATIVE]
    if negative:
        q[:, NEGATIVE] = np.where(negative_image, 1.0, 1.0 - q.max(axis=1))
    else:
        q[:, NEGATIVE] = negative_image
    out = weight * q + (1.0 - weight) * labels
    return out.astype(np.float32)


def round_epochs(cfg, round_: int) -> int:
    """Epochs of round ``round_``: ``train.epochs`` for round 0, ``pseudo.epochs`` (when set) after it."""
    return cfg.pseudo.epochs if round_ > 0 and cfg.pseudo.epochs is not None else cfg.train.epochs


def round_config(cfg, fold: int, round_: int):
    """The config fold ``fold`` of round ``round_`` trains with: ``cfg`` itself for round 0; for a
    later round ``pseudo.epochs`` / ``pseudo.lr`` (when set) as its epochs and learning rate and, with
    ``pseudo.init: previous``, round r-1's best weights of the same fold as its starting point."""
    from ..config import replace

    if round_ == 0:
        return cfg
    pc, changes = cfg.pseudo, {}
    if round_epochs(cfg, round_) != cfg.train.epochs:
        changes["train.epochs"] = round_epochs(cfg, round_)
    if pc.lr is not None:
        changes["train.lr"] = pc.lr
    if pc.init == "previous":
        best = runs.run_dir(cfg, fold, round_ - 1) / runs.BEST_FILE
        if not best.is_file():
            raise PseudoLabelError(f"pseudo-label round {round_} starts from round {round_ - 1}'s weights "
                                   f"(pseudo.init: previous), but {best} does not exist: train that round's "
                                   f"fold {fold} first")
        changes["model.pretrained"] = str(best)
    return replace(cfg, **changes) if changes else cfg


def round_oof(cfg, round_: int) -> pd.DataFrame:
    """``ID, cell_id, p0..p18``: the out-of-fold predictions of every trained fold of ``round_``."""
    frames = []
    for fold in cfg.train.folds:
        path = runs.run_dir(cfg, fold, round_) / runs.OOF_FILE
        if path.is_file():
            frames.append(runs.read_oof(path))
    if not frames:
        raise PseudoLabelError(f"pseudo-label round {round_ + 1} needs the out-of-fold predictions of round "
                               f"{round_} ({runs.run_dir(cfg, cfg.train.folds[0], round_) / runs.OOF_FILE}, ...): "
                               "train that round's folds first")
    return pd.concat(frames, ignore_index=True).drop_duplicates(["ID", "cell_id"], keep="last")


@dataclass
class RoundTargets:
    targets: np.ndarray  # (n, 19) float32
    covered: int  # cells whose targets come from out-of-fold predictions


def round_targets(cfg, round_: int, table: pd.DataFrame, rows: np.ndarray, image_targets: np.ndarray) -> RoundTargets:
    """The training targets of round ``round_`` >= 1 for the selected crop ``rows`` of a cache ``table``."""
    oof = round_oof(cfg, round_ - 1)
    cells = table.loc[rows, ["ID", "cell_id"]].reset_index(drop=True)
    merged = cells.merge(oof, on=["ID", "cell_id"], how="left")
    probs = merged[list(runs.PROB_COLUMNS)].to_numpy(np.float64)
    have = ~np.isnan(probs).any(axis=1)
    targets = np.asarray(image_targets, np.float32).copy()
    pc = cfg.pseudo
    if have.any():
        targets[have] = pseudo_targets(probs[have], image_targets[have], cells["ID"].to_numpy()[have],
                                       pc.scale, pc.power, pc.negative, pc.weight)
    if not have.all():
        n_img = cells.loc[~have, "ID"].nunique()
        log.warning("pseudo-label round %d: %d of %d training cells (%d images) have no out-of-fold "
                    "prediction of round %d and keep their image labels", round_, int((~have).sum()),
                    len(have), n_img, round_ - 1)
    return RoundTargets(targets, int(have.sum()))
