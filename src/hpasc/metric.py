"""The competition metric (mAP over cell instances at mask IoU >= 0.6) and a cell-level proxy.

Rules, as the organisers' Open Images style scoring applies them:

* Truth instances are (cell, class) pairs: a truth cell labelled ``0|16`` is a class-0 instance and a
  class-16 instance with the same mask.
* Per image and class, predictions are taken in descending confidence. Each is compared only with the
  truth cell of that class it overlaps best (mask IoU; the first such cell in truth order on ties). IoU
  >= the threshold (0.6) with a cell not yet matched is a true positive; anything else is a false
  positive. There is no fall-back to the second-best cell, so duplicate predictions of one cell give one
  TP and FPs.
* Predictions with an empty mask are dropped; submission images absent from the truth are ignored;
  truth images absent from the submission count as misses.
* ``verified="gt"`` (default, the organisers' setting): predictions of a class without a truth instance
  in that image are ignored. ``verified="all"``: they are false positives.
* Per class, all kept predictions are ranked by confidence; AP is the all-points interpolated area under
  the precision-recall curve (precision at each rank replaced by the best precision at that rank or
  below, recall padded to [0, 1]). A class without truth instances has no AP (None) and is left out of
  the mean; one with truth but no predictions scores 0. mAP is the mean of the others.

**Ties.** Equal confidences keep submission order: rows in the order of the submission file, triples in
the order of their PredictionString (a stable sort on descending confidence), both within an image and
in the per-class ranking. The organisers' code ranks with ``np.argsort(scores)[::-1]`` (unstable), so
with tied confidences its AP can differ slightly from ours; distinct confidences give identical results.

**IoU** is computed as in the organisers' code in float32 (``inter / union`` with float32 areas,
compared with ``float32(0.6)``), so a cell with IoU exactly 0.6 matches.

IoUs never touch full-size masks: every mask becomes its foreground runs in column-major order
(``hpasc.rle.mask_runs``), and one sweep over the runs of an image gives the whole truth x prediction
intersection table (a joint histogram over runs instead of pixels). Each distinct mask string is
decoded once per image, since a cell's mask repeats for each of its classes. No torch here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd
from tqdm import tqdm

from .labels import CLASS_NAMES, NUM_CLASSES
from .rle import MaskDecodeError, mask_runs
from .submission import (
    COLUMNS,
    SubmissionError,
    parse_prediction_string,
    parse_truth_string,
    read_submission,
)

IOU_THRESHOLD = 0.6
VERIFIED = ("gt", "all")


class ScoreError(ValueError):
    """Truth or submission content that cannot be scored. Names the image and what is wrong."""


@dataclass
class ScoreResult:
    """mAP and its parts. Dicts are keyed by class id 0..18; AP is None for a class without truth."""

    mAP: float
    per_class_ap: dict[int, float | None]
    n_truth: dict[int, int] = field(default_factory=dict)  # truth instances
    n_pred: dict[int, int] = field(default_factory=dict)  # predictions ranked (after the rules)
    n_tp: dict[int, int] = field(default_factory=dict)
    verified: str = "gt"

    def to_json(self) -> str:
        """The contract line: ``{"mAP": float, "per_class_ap": {"0": float|null, ..., "18": ...}}``."""
        aps = {str(c): self.per_class_ap.get(c) for c in range(NUM_CLASSES)}
        return json.dumps({"mAP": self.mAP, "per_class_ap": aps})

    def table(self) -> str:
        """A readable per-class table with class names."""
        lines = [f"{'id':>2}  {'class':<42} {'AP':>7} {'truth':>7} {'pred':>8} {'TP':>7}"]
        for c in range(NUM_CLASSES):
            ap = self.per_class_ap.get(c)
            ap_text = "-" if ap is None else f"{ap:.4f}"
            lines.append(
                f"{c:>2}  {CLASS_NAMES[c]:<42} {ap_text:>7} {self.n_truth.get(c, 0):>7} "
                f"{self.n_pred.get(c, 0):>8} {self.n_tp.get(c, 0):>7}"
            )
        n_classes = sum(ap is not None for ap in self.per_class_ap.values())
        lines.append(f"mAP {self.mAP:.4f} over {n_classes} classes (verified={self.verified})")
        return "\n".join(lines)


def read_truth(path: os.PathLike | str) -> pd.DataFrame:
    """Cell-level truth CSV -> DataFrame ``ID,ImageWidth,ImageHeight,PredictionString``.

    PredictionString holds ``labels mask`` pairs, labels ``|``-joined for a multi-label cell. The pairs
    themselves are checked when scoring (with the image named).
    """
    return read_submission(path, kind="truth")


def _frame(obj: os.PathLike | str | pd.DataFrame, reader) -> pd.DataFrame:
    if isinstance(obj, pd.DataFrame):
        missing = set(COLUMNS) - set(obj.columns)
        if missing:
            raise ScoreError(f"frame lacks columns {sorted(missing)}")
        return obj.assign(PredictionString=obj.PredictionString.fillna(""))  # read_csv turns "" into NaN
    return reader(obj)


# ---------------------------------------------------------------------------------------------------
# geometry


@numba.njit(cache=True, nogil=True)
def _intersections(t_starts, t_ends, t_owner, p_starts, p_ends, p_owner, n_truth, n_pred):
    """Pixel counts shared by every (prediction mask, truth cell): one sweep over the runs.

    Truth runs are disjoint and sorted (so their ends are sorted too). Prediction runs come grouped by
    mask, each mask's runs sorted: one binary search per mask finds its first overlapping truth run,
    then a pointer only moves forward while the mask's runs are walked.
    """
    inter = np.zeros((n_pred, n_truth), np.int64)
    n_t = t_starts.shape[0]
    n_p = p_starts.shape[0]
    r = 0
    while r < n_p:
        q = p_owner[r]
        k = np.searchsorted(t_ends, p_starts[r], side="right")
        while r < n_p and p_owner[r] == q:
            ps = p_starts[r]
            pe = p_ends[r]
            while k < n_t and t_ends[k] <= ps:
                k += 1
            j = k
            while j < n_t and t_starts[j] < pe:
                inter[q, t_owner[j]] += min(pe, t_ends[j]) - max(ps, t_starts[j])
                j += 1
            r += 1
    return inter


def _concat_runs(runs: list[tuple[np.ndarray, np.ndarray]]):
    starts = np.concatenate([s for s, _ in runs]) if runs else np.zeros(0, np.int64)
    ends = np.concatenate([e for _, e in runs]) if runs else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(runs)), [len(s) for s, _ in runs]).astype(np.int64)
    return starts, ends, owner


def intersection_table(
    truth_runs: list[tuple[np.ndarray, np.ndarray]], pred_runs: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """(n_pred, n_truth) int64 pixel intersections of masks given as runs (``hpasc.rle.mask_runs``).

    Truth masks are normally disjoint (one sweep); if some overlap, each truth mask is swept on its own.
    """
    t_starts, t_ends, t_owner = _concat_runs(truth_runs)
    p_starts, p_ends, p_owner = _concat_runs(pred_runs)
    order = np.argsort(t_starts, kind="stable")
    t_starts, t_ends, t_owner = t_starts[order], t_ends[order], t_owner[order]
    if len(t_starts) < 2 or (t_starts[1:] >= t_ends[:-1]).all():
        return _intersections(t_starts, t_ends, t_owner, p_starts, p_ends, p_owner, len(truth_runs), len(pred_runs))
    inter = np.zeros((len(pred_runs), len(truth_runs)), np.int64)
    for j, (s, e) in enumerate(truth_runs):
        owner = np.zeros(len(s), np.int64)
        inter[:, j] = _intersections(s, e, owner, p_starts, p_ends, p_owner, 1, len(pred_runs))[:, 0]
    return inter


def iou_table(inter: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray) -> np.ndarray:
    """float32 IoU from intersections and areas, as the organisers' code computes it."""
    inter32 = inter.astype(np.float32)
    union = pred_area.astype(np.float32)[:, None] + truth_area.astype(np.float32)[None, :] - inter32
    return inter32 / np.maximum(union, np.float32(1e-10))


def run_areas(runs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """int64 pixel count of each mask given as runs."""
    return np.array([int((e - s).sum()) for s, e in runs], dtype=np.int64)


def runs_iou(
    truth_runs: list[tuple[np.ndarray, np.ndarray]], pred_runs: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """(n_pred, n_truth) float32 IoU of masks given as runs (``intersection_table`` + ``iou_table``)."""
    return iou_table(intersection_table(truth_runs, pred_runs), run_areas(pred_runs), run_areas(truth_runs))


# ---------------------------------------------------------------------------------------------------
# AP


def average_precision(tp: np.ndarray, n_truth: int) -> float | None:
    """All-points interpolated AP of predictions already in rank order (``tp`` True = hit)."""
    if n_truth <= 0:
        return None
    tp = np.asarray(tp, dtype=bool)
    if tp.size == 0:
        return 0.0
    hits = np.cumsum(tp)
    precision = hits / np.arange(1, tp.size + 1)
    # best precision at this rank or below, i.e. the running max from the end
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    # recall rises by 1/n_truth exactly at each hit
    return float(envelope[tp].sum() / n_truth)


# ---------------------------------------------------------------------------------------------------
# parsing


def truth_cells(image_id: str, text: str) -> tuple[list[str], list[tuple[int, ...]]]:
    """Truth PredictionString (``labels mask`` pairs) -> (mask strings, labels per cell); ScoreError if bad."""
    try:
        return parse_truth_string(text, f"truth {image_id}")
    except SubmissionError as exc:
        raise ScoreError(str(exc)) from None


def _predictions(image_id: str, text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        triples = parse_prediction_string(text, f"submission {image_id}")
    except SubmissionError as exc:
        raise ScoreError(str(exc)) from None
    return triples.classes, triples.conf, triples.masks


# ---------------------------------------------------------------------------------------------------
# per image


@dataclass
class _ImageOutcome:
    classes: np.ndarray  # per ranked prediction (after the rules), in submission order
    conf: np.ndarray
    tp: np.ndarray


def _score_image(
    image_id: str,
    height: int,
    width: int,
    truth_masks: list[str],
    truth_labels: list[tuple[int, ...]],
    pred_text: str,
    verified: str,
    iou_threshold: float,
) -> _ImageOutcome:
    classes, conf, masks = _predictions(image_id, pred_text)
    truth_classes = {c for labels in truth_labels for c in labels}
    if verified == "gt":
        keep = np.isin(classes, list(truth_classes))
        classes, conf = classes[keep], conf[keep]
        masks = [m for m, k in zip(masks, keep) if k]

    cache: dict[str, int] = {}  # mask string -> index into runs (decoded once per image)
    runs: list[tuple[np.ndarray, np.ndarray]] = []

    def index(mask: str, who: str) -> int:
        if mask not in cache:
            try:
                runs.append(mask_runs(mask, height, width))
            except MaskDecodeError as exc:
                raise ScoreError(f"{who} {image_id}: mask does not decode at {width}x{height}: {exc}") from None
            cache[mask] = len(runs) - 1
        return cache[mask]

    truth_idx = np.array([index(m, "truth") for m in truth_masks], dtype=np.int64)
    pred_idx = np.array([index(m, "submission") for m in masks], dtype=np.int64)
    area = run_areas(runs)
    if len(pred_idx):
        nonempty = area[pred_idx] > 0
        classes, conf, pred_idx = classes[nonempty], conf[nonempty], pred_idx[nonempty]
    tp = np.zeros(len(classes), dtype=bool)
    if len(classes) and len(truth_idx):
        used = np.unique(pred_idx)  # distinct predicted masks
        inter = intersection_table([runs[i] for i in truth_idx], [runs[i] for i in used])
        iou = iou_table(inter, area[used], area[truth_idx])
        row_of = np.searchsorted(used, pred_idx)
        threshold = np.float32(iou_threshold)
        for c in np.unique(classes):
            cells = np.array([j for j, labels in enumerate(truth_labels) if c in labels], dtype=np.int64)
            if not len(cells):
                continue  # only under verified="all": all false positives
            preds = np.flatnonzero(classes == c)
            preds = preds[np.argsort(-conf[preds], kind="stable")]
            sub = iou[row_of[preds]][:, cells]
            best = np.argmax(sub, axis=1)  # first cell on ties
            matched = np.zeros(len(cells), dtype=bool)
            for k, (p, b) in enumerate(zip(preds, best)):
                if sub[k, b] >= threshold and not matched[b]:
                    matched[b] = True
                    tp[p] = True
    return _ImageOutcome(classes, conf, tp)


# ---------------------------------------------------------------------------------------------------
# the score


def score(
    truth: os.PathLike | str | pd.DataFrame,
    submission: os.PathLike | str | pd.DataFrame,
    verified: str = "gt",
    iou_threshold: float = IOU_THRESHOLD,
    progress: bool | None = None,
) -> ScoreResult:
    """The competition mAP of ``submission`` against cell-level ``truth`` (paths or DataFrames).

    Masks are decoded at the truth's image size. See the module docstring for the rules and the tie
    order. ``progress=None`` shows a bar only on a terminal.
    """
    if verified not in VERIFIED:
        raise ValueError(f"verified must be one of {VERIFIED}, got {verified!r}")
    if not 0 < iou_threshold <= 1:  # also catches NaN
        raise ScoreError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
    truth_df = _frame(truth, read_truth)
    sub_df = _frame(submission, read_submission)
    for name, df in (("truth", truth_df), ("submission", sub_df)):
        dup = df.ID[df.ID.duplicated()]
        if len(dup):
            raise ScoreError(f"{name} has duplicate IDs, e.g. {dup.iat[0]}")

    truth_rows = {
        str(r.ID): (int(r.ImageHeight), int(r.ImageWidth), *truth_cells(str(r.ID), str(r.PredictionString)))
        for r in truth_df.itertuples(index=False)
    }
    n_truth = np.zeros(NUM_CLASSES, np.int64)
    for _, _, _, labels in truth_rows.values():
        for cell_labels in labels:
            n_truth[list(cell_labels)] += 1
    if n_truth.sum() == 0:
        raise ScoreError("truth has no cell instances")

    # submission order decides ties, so walk the submission; truth images it lacks only add misses
    outcomes = []
    pairs = [(str(i), str(t)) for i, t in zip(sub_df.ID, sub_df.PredictionString) if str(i) in truth_rows]
    for image_id, text in tqdm(pairs, desc="score", unit="img", disable=None if progress is None else not progress):
        h, w, masks, labels = truth_rows[image_id]
        outcomes.append(_score_image(image_id, h, w, masks, labels, text, verified, iou_threshold))

    classes = np.concatenate([o.classes for o in outcomes]) if outcomes else np.zeros(0, np.int64)
    conf = np.concatenate([o.conf for o in outcomes]) if outcomes else np.zeros(0)
    tp = np.concatenate([o.tp for o in outcomes]) if outcomes else np.zeros(0, bool)
    per_class: dict[int, float | None] = {}
    n_pred: dict[int, int] = {}
    n_tp: dict[int, int] = {}
    for c in range(NUM_CLASSES):
        sel = np.flatnonzero(classes == c)
        ranked = sel[np.argsort(-conf[sel], kind="stable")]
        per_class[c] = average_precision(tp[ranked], int(n_truth[c]))
        n_pred[c] = int(len(sel))
        n_tp[c] = int(tp[sel].sum())
    values = [ap for ap in per_class.values() if ap is not None]
    return ScoreResult(
        mAP=float(np.mean(values)),
        per_class_ap=per_class,
        n_truth={c: int(n_truth[c]) for c in range(NUM_CLASSES)},
        n_pred=n_pred,
        n_tp=n_tp,
        verified=verified,
    )


# ---------------------------------------------------------------------------------------------------
# cell-level proxy (no cell truth: each cell inherits its image's labels)


def _binary_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision as a step function over distinct score thresholds (tied scores act together)."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each group of equal scores
    hits = np.cumsum(y)[last]
    precision = hits / (last + 1)
    recall_gain = np.diff(np.r_[0, hits]) / hits[-1]
    return float((recall_gain * precision).sum())


def _binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic with average ranks for ties."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(len(s), np.float64)
    # average rank (1-based) of each group of equal scores
    bounds = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1, len(s)]
    group_rank = (bounds[:-1] + bounds[1:] + 1) / 2.0
    ranks[order] = np.repeat(group_rank, np.diff(bounds))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _mean(values: Mapping[int, float | None]) -> float | None:
    kept = [v for v in values.values() if v is not None]
    return float(np.mean(kept)) if kept else None


def cell_proxy_scores(targets: np.ndarray, probs: np.ndarray) -> dict:
    """Per-class AP and ROC AUC of cell probabilities against (image-inherited) cell targets.

    ``targets`` and ``probs`` are ``(N, C)``. Returns ``{"ap": {c: float|None}, "auc": {c: ...},
    "mAP": float|None, "mAUC": float|None, "n_pos": {c: int}}``; a class without positives gets None for
    both, AUC is also None without negatives. Means skip the Nones.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    if targets.ndim != 2 or targets.shape != probs.shape:
        raise ValueError(f"targets {targets.shape} and probs {probs.shape} must be the same (N, C) shape")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    y_all = targets > 0.5
    ap: dict[int, float | None] = {}
    auc: dict[int, float | None] = {}
    n_pos: dict[int, int] = {}
    for c in range(targets.shape[1]):
        y, s = y_all[:, c], probs[:, c]
        n_pos[c] = int(y.sum())
        ap[c] = _binary_ap(y, s) if n_pos[c] else None
        auc[c] = _binary_auc(y, s) if 0 < n_pos[c] < len(y) else None
    return {"ap": ap, "auc": auc, "mAP": _mean(ap), "mAUC": _mean(auc), "n_pos": n_pos}
