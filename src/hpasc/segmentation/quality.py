"""Segmentation quality against a reference label map: one-to-one matching at an IoU threshold.

With a threshold above 0.5 a predicted mask can overlap at most one truth mask with IoU over it,
so the matching needs no assignment step: every pair over the threshold is a true positive. The pair
overlaps come from one joint histogram of the two label maps (one ``bincount``), so the cost is one
pass over the pixels whatever the number of cells.
"""
from __future__ import annotations

import numpy as np

from .postprocess import relabel_consecutive


def overlap_matrix(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Shared pixels of every (pred label, truth label) pair: float64 ``(n_pred + 1, n_truth + 1)``,
    row/column 0 = background, indexed by label value (the row and column sums are the areas)."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {truth.shape}")
    if pred.size and (pred.min() < 0 or truth.min() < 0):
        raise ValueError("label maps must be non-negative")
    n_p = int(pred.max(initial=0)) + 1
    n_t = int(truth.max(initial=0)) + 1
    joint = np.bincount(pred.ravel().astype(np.int64) * n_t + truth.ravel(), minlength=n_p * n_t)
    return joint.reshape(n_p, n_t).astype(np.float64)


def iou_matrix(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every (pred label, truth label) pair: float64 ``(n_pred + 1, n_truth + 1)``, row/column 0 =
    background. Labels need not be consecutive; the matrix is indexed by label value."""
    return iou_from_overlap(overlap_matrix(pred, truth))


def iou_from_overlap(inter: np.ndarray) -> np.ndarray:
    """An ``overlap_matrix`` (background row and column included) -> the IoU of every pair, 0 where the
    union is empty."""
    area_p = inter.sum(axis=1, keepdims=True)
    area_t = inter.sum(axis=0, keepdims=True)
    union = area_p + area_t - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_counts(pred: np.ndarray, truth: np.ndarray, thr: float = 0.6) -> tuple[int, int, int]:
    """(true positives, number of predicted cells, number of truth cells) at IoU >= ``thr``."""
    if not 0.5 < thr <= 1.0:
        raise ValueError(f"thr must be in (0.5, 1] for one-to-one matching, got {thr}")
    pred, truth = _compact(pred), _compact(truth)  # sparse label values would blow up the matrix
    iou = iou_matrix(pred, truth)[1:, 1:]
    return int(np.count_nonzero(iou >= thr)), int(pred.max(initial=0)), int(truth.max(initial=0))


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of value (0 stays background)."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("label maps must be non-negative")
    return relabel_consecutive(labels)


def f1_at_iou(pred: np.ndarray, truth: np.ndarray, thr: float = 0.6) -> float:
    """F1 = 2 TP / (n_pred + n_true) with one-to-one matches at IoU >= ``thr``; 1.0 when both are empty."""
    tp, n_pred, n_true = match_counts(pred, truth, thr)
    if n_pred + n_true == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_true)
