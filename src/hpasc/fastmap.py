"""The competition mAP of many confidence matrices over fixed cell label maps (CV, blend search).

Predicted cells come from a label map and never overlap, so whether a (cell, class) prediction is a true
positive does not depend on the confidences: at most one disjoint cell can reach IoU >= 0.6 with a truth
cell. ``build_competition_truth`` works those flags out once per image (the scorer's run sweep over
``hpasc.rle`` runs); then the mAP of any confidence matrix is a sort per class (``fast_map``), equal to
``hpasc.metric.score`` of the submission those confidences would write (``tests/test_cv.py``).
No torch here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import NUM_CLASSES
from .metric import IOU_THRESHOLD, average_precision, read_truth, runs_iou, truth_cells
from .rle import label_map_runs, mask_runs
from .segmentation.folder import read_label_map


class FastMapError(ValueError):
    """Truth or label maps that do not fit the OOF predictions (names the file and image)."""


def match_image(label_map: np.ndarray, truth_labels: list[tuple[int, ...]],
                truth_masks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (tp (n_pred, 19) bool, n_truth (19,) int).

    tp[p, c]: the class-c truth cell that predicted cell p+1 overlaps best has IoU >= 0.6 (float32, first
    cell on ties, as ``hpasc.metric`` does). Intersections come from the scorer's sweep over mask runs.
    """
    height, width = label_map.shape
    pred_runs = label_map_runs(label_map)
    truth_runs = [mask_runs(m, height, width) for m in truth_masks]
    n_pred = len(pred_runs)
    tp = np.zeros((n_pred, NUM_CLASSES), bool)
    n_truth = np.zeros(NUM_CLASSES, np.int64)
    if not truth_runs or not n_pred:
        for labs in truth_labels:
            n_truth[list(labs)] += 1
        return tp, n_truth
    iou = runs_iou(truth_runs, pred_runs)
    for c in range(NUM_CLASSES):
        cols = [t for t, labs in enumerate(truth_labels) if c in labs]
        n_truth[c] = len(cols)
        if cols:
            sub = iou[:, cols]
            tp[:, c] = sub[np.arange(n_pred), np.argmax(sub, axis=1)] >= np.float32(IOU_THRESHOLD)
    return tp, n_truth


@dataclass
class CompetitionTruth:
    """Per OOF row: TP flag and relevance of each class; per image: truth instance counts.

    ``relevant[r, c]`` is False when the row's image has no class-c truth (``verified="gt"`` ignores such
    predictions). ``border`` and ``rel_area`` per row feed the confidence recipe.
    """

    tp: np.ndarray  # (n_rows, 19) bool
    relevant: np.ndarray  # (n_rows, 19) bool
    n_truth: np.ndarray  # (n_images, 19) int
    border: np.ndarray  # (n_rows,) bool
    rel_area: np.ndarray  # (n_rows,) float


def build_competition_truth(keys: pd.DataFrame, image_ids: Sequence[str], truth_csv: Path,
                            masks_dir: Path, progress: bool = True,
                            error: type[Exception] = FastMapError) -> CompetitionTruth:
    """Precompute the TP flags of every OOF row against the truth CSV (one pass per image); problems
    raise ``error`` naming the file and image."""
    from tqdm import tqdm

    truth = read_truth(truth_csv).drop_duplicates("ID").set_index("ID")
    n = len(keys)
    out = CompetitionTruth(np.zeros((n, NUM_CLASSES), bool), np.zeros((n, NUM_CLASSES), bool),
                           np.zeros((len(image_ids), NUM_CLASSES), np.int64), np.zeros(n, bool), np.ones(n))
    img_codes = keys["image"].to_numpy()
    cell_ids = keys["cell_id"].to_numpy()
    starts = np.searchsorted(img_codes, np.arange(len(image_ids) + 1))
    for i, image_id in enumerate(tqdm(image_ids, desc="truth", disable=None if progress else True)):
        if image_id not in truth.index:
            raise error(f"{truth_csv}: image {image_id} of the OOF predictions has no truth row")
        row = truth.loc[image_id]
        labels_map, border, rel_area = read_label_map(masks_dir, image_id)
        if labels_map.shape != (int(row.ImageHeight), int(row.ImageWidth)):
            raise error(f"{masks_dir}/{image_id}.png: label map {labels_map.shape} but the truth says "
                          f"{row.ImageHeight}x{row.ImageWidth}")
        t_masks, t_labels = truth_cells(image_id, row.PredictionString)
        tp, n_truth = match_image(labels_map, t_labels, t_masks)
        rows = slice(starts[i], starts[i + 1])
        cells = cell_ids[rows]
        if len(cells) and cells.max() > tp.shape[0]:
            raise error(f"{masks_dir}/{image_id}.png: has {tp.shape[0]} cells but the OOF names cell "
                          f"{cells.max()}")
        out.tp[rows] = tp[cells - 1]
        out.relevant[rows] = n_truth > 0
        out.n_truth[i] = n_truth
        out.border[rows] = border[cells - 1]
        out.rel_area[rows] = rel_area[cells - 1]
    return out


def fast_map(conf: np.ndarray, truth: CompetitionTruth, rows: np.ndarray | None = None,
             images: np.ndarray | None = None, floor: float = 0.0) -> tuple[float, np.ndarray]:
    """Competition mAP (``verified="gt"``) of confidences (n_rows, 19) -> (mAP, per-class AP with NaN).

    As in a written submission, a confidence that is 0 or below ``floor`` is not a prediction.
    ``rows``/``images`` (boolean masks) restrict to a subset of images, e.g. one fold. Ties rank in row
    order (the scorer ranks ties in submission order; distinct confidences give identical results).
    """
    tp, rel, n_truth = truth.tp, truth.relevant, truth.n_truth
    if rows is not None:
        conf, tp, rel = conf[rows], tp[rows], rel[rows]
    if images is not None:
        n_truth = n_truth[images]
    written = (conf > 0) & (conf >= floor)
    totals = n_truth.sum(axis=0)
    ap = np.full(NUM_CLASSES, np.nan)
    for c in range(NUM_CLASSES):
        if totals[c] > 0:
            sel = rel[:, c] & written[:, c]
            order = np.argsort(-conf[sel, c], kind="stable")
            ap[c] = average_precision(tp[sel, c][order], int(totals[c]))
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else float("nan")), ap
