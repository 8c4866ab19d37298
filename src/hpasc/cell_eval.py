"""How well a submission tells cells apart, measured against cell-level truth (synthetic worlds).

The competition mAP mixes segmentation and classification. These numbers separate them:

* **oracle mAP** — the submission's own cell masks, each given the labels of the truth cell it matches
  (IoU >= 0.6) with confidence 1: the ceiling the segmentation allows a classifier.
* **cell AUC** — each truth cell matched to a submitted cell (the one it overlaps best, IoU >= 0.6);
  per class, the ROC AUC of the submitted confidences (0 where a class is not listed) against the truth:
  *pooled* over all matched cells, and *within* — only the cells of images that hold the class, the
  question the metric really asks (which cells of a positive image carry the label).

No torch here; masks are compared as run-length intervals, as the scorer does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .labels import NUM_CLASSES
from .metric import (
    IOU_THRESHOLD,
    _binary_auc,
    _frame,
    read_truth,
    runs_iou,
    score,
    truth_cells,
)
from .rle import mask_runs
from .submission import parse_prediction_string, read_submission


@dataclass
class MatchedCells:
    """Truth cells matched to submitted cells: one row per matched truth cell."""

    image_ids: list[str]
    targets: np.ndarray  # (n, 19) 0/1 truth labels
    scores: np.ndarray  # (n, 19) submitted confidences of the matched cell (0 = not listed)
    n_truth: int  # truth cells in all (matched or not)
    oracle_rows: dict[str, str]  # ID -> oracle PredictionString (submitted masks, truth labels, conf 1)


def _submitted_cells(text: str, where: str) -> tuple[list[str], np.ndarray]:
    """Distinct masks of a PredictionString (first-seen order) and their (n, 19) confidences."""
    triples = parse_prediction_string(text, where)
    index: dict[str, int] = {}
    for mask in triples.masks:
        index.setdefault(mask, len(index))
    conf = np.zeros((len(index), NUM_CLASSES))
    for c, p, mask in zip(triples.classes, triples.conf, triples.masks):
        row = index[mask]
        conf[row, c] = max(conf[row, c], p)
    return list(index), conf


def match_cells(truth: os.PathLike | str | pd.DataFrame, submission: os.PathLike | str | pd.DataFrame,
                iou_threshold: float = IOU_THRESHOLD) -> MatchedCells:
    """Match every truth cell to the submitted cell it overlaps best (IoU >= threshold)."""
    truth_df = _frame(truth, read_truth)
    sub = _frame(submission, read_submission)
    texts = dict(zip(sub.ID.astype(str), sub.PredictionString.astype(str)))
    ids, targets, scores, oracle, n_truth = [], [], [], {}, 0
    threshold = np.float32(iou_threshold)
    for row in truth_df.itertuples(index=False):
        image_id, h, w = str(row.ID), int(row.ImageHeight), int(row.ImageWidth)
        t_masks, t_labels = truth_cells(image_id, str(row.PredictionString))
        n_truth += len(t_masks)
        masks, conf = _submitted_cells(texts.get(image_id, ""), f"submission {image_id}")
        if not t_masks or not masks:
            continue
        iou = runs_iou([mask_runs(m, h, w) for m in t_masks], [mask_runs(m, h, w) for m in masks])  # (pred, truth)
        best_pred = np.argmax(iou, axis=0)
        best_truth = np.argmax(iou, axis=1)
        for j, labels in enumerate(t_labels):
            p = best_pred[j]
            if iou[p, j] >= threshold:
                ids.append(image_id)
                targets.append(np.isin(np.arange(NUM_CLASSES), labels).astype(np.float64))
                scores.append(conf[p])
        parts = []
        for p, mask in enumerate(masks):
            j = best_truth[p]
            if iou[p, j] >= threshold:
                parts += [f"{c} 1 {mask}" for c in t_labels[j]]
        oracle[image_id] = " ".join(parts)
    empty = np.zeros((0, NUM_CLASSES))
    return MatchedCells(ids, np.array(targets) if targets else empty, np.array(scores) if scores else empty,
                        n_truth, oracle)


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    n_pos = int(y.sum())
    return _binary_auc(y, s) if 0 < n_pos < len(y) else None


def _mean(values: dict[int, float | None]) -> float | None:
    kept = [v for v in values.values() if v is not None]
    return float(np.mean(kept)) if kept else None


def cell_auc(matched: MatchedCells) -> dict:
    """``{"within": mean, "mean": pooled mean, "worst": (class, AUC), "per_class": {c: pooled},
    "per_class_within": {c: within}, "per_class_support": {c: [positive cells, images holding them]}}``;
    a class without both positive and negative cells is None. The support says how much an AUC can be
    trusted: a class whose positives are five cells of one image moves by 0.2 with one cell."""
    y_all = matched.targets > 0.5
    ids = np.asarray(matched.image_ids)
    pooled: dict[int, float | None] = {}
    within: dict[int, float | None] = {}
    support: dict[int, list[int]] = {}
    for c in range(NUM_CLASSES):
        y, s = y_all[:, c], matched.scores[:, c]
        pooled[c] = _auc(y, s)
        images = np.unique(ids[y])
        support[c] = [int(y.sum()), len(images)]
        holding = np.isin(ids, images)  # no positive: no image, no cell
        within[c] = _auc(y[holding], s[holding])
    known = {c: v for c, v in pooled.items() if v is not None}
    worst = min(known.items(), key=lambda kv: kv[1]) if known else None
    return {"within": _mean(within), "mean": _mean(pooled),
            "worst": None if worst is None else {"class": worst[0], "auc": worst[1]},
            "per_class": {str(c): v for c, v in pooled.items()},
            "per_class_within": {str(c): v for c, v in within.items()},
            "per_class_support": {str(c): v for c, v in support.items()}}


def evaluate_cells(truth: os.PathLike | str | pd.DataFrame, submission: os.PathLike | str | pd.DataFrame,
                   mAP: float | None = None) -> dict:
    """``{"mAP", "oracle_mAP", "oracle_share", "matched_cells", "truth_cells", "cell_auc": {...}}``.

    ``mAP``: the submission's score when the caller has it already (else it is scored here, as
    ``hpasc.metric.score`` does by default); the oracle is always scored here."""
    truth_df = _frame(truth, read_truth)
    sub = _frame(submission, read_submission)
    matched = match_cells(truth_df, sub)
    result = score(truth_df, sub, progress=False).mAP if mAP is None else mAP
    oracle_sub = sub.assign(PredictionString=[matched.oracle_rows.get(str(i), "") for i in sub.ID])
    oracle = score(truth_df, oracle_sub, progress=False).mAP
    return {"mAP": result, "oracle_mAP": oracle, "oracle_share": result / oracle if oracle > 0 else None,
            "matched_cells": len(matched.image_ids), "truth_cells": matched.n_truth,
            "cell_auc": cell_auc(matched)}


def format_cell_eval(ev: dict) -> str:
    """A short readable block: mAP against its ceiling and the cell AUCs."""
    from .labels import CLASS_NAMES

    auc = ev["cell_auc"]
    fmt = (lambda v: "   -" if v is None else f"{v:.3f}")
    lines = [f"mAP {ev['mAP']:.4f} of oracle {ev['oracle_mAP']:.4f} "
             f"({fmt(ev['oracle_share'])} of the ceiling); {ev['matched_cells']} of {ev['truth_cells']} "
             "truth cells matched",
             f"cell AUC within-image {fmt(auc['within'])}, pooled {fmt(auc['mean'])}"]
    for c in range(NUM_CLASSES):
        p, w = auc["per_class"][str(c)], auc["per_class_within"][str(c)]
        if p is not None or w is not None:
            cells, images = auc["per_class_support"][str(c)]
            lines.append(f"  {c:>2} {CLASS_NAMES[c]:<42} pooled {fmt(p)}  within {fmt(w)}  "
                         f"({cells} cells in {images} image{'s' * (images != 1)})")
    return "\n".join(lines)
