"""Ensemble blending: weights over runs from out-of-fold predictions, and averaging of submission files.

**Over runs** (``blend_runs``). Each config (``runs/<config>/fold*``) is one ensemble member. The search
looks for member weights and the confidence recipe's ``alpha`` that maximise the *mean over folds* of the
per-fold score — the competition mAP through the recipe where cell truth exists, else the cell-level proxy
mAP (alpha is then kept from the config: the proxy's targets are image labels, so it would always reward
the image factor). A mean over folds instead of one pooled ranking keeps a single lucky fold from steering
the weights; the leave-one-fold-out score (weights searched on the other folds, scored on the held-out
one) is the honest estimate of what the searched weights are worth. The search is coordinate ascent on
a grid: each member's share in steps of ``1/steps`` (the others rescaled), then alpha over ``alphas``,
repeated until nothing improves.

The weights file that ``hpasc predict --weights`` reads::

    runs:            # member name -> weight; "<config>" covers all its folds, "<config>/fold<k>" one fold
      b0: 0.7
      resnet50: 0.3
    alpha: 0.5       # the recipe's alpha (inference.alpha) to predict with

(read by ``hpasc.predict.read_weights``, which also accepts an ``inference:`` mapping of other settings).
**Over submissions** (``blend_submissions``). Confidences are averaged per (cell, class) with weights, a
class missing from a cell counting 0. Cells are the same when their mask strings are identical; otherwise
they are matched by IoU >= 0.6 (pairs taken in descending IoU, each cell at most once per submission),
with IoUs from the scorer's sweep over mask runs (no full-size masks); unmatched cells stay cells of their
own. The first submission's mask string represents a matched cell.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from .cv import CVData, load_cv_data, proxy_scores
from .fastmap import fast_map
from .fsutil import write_text_atomic
from .labels import NUM_CLASSES

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
MATCH_IOU = 0.6


class BlendError(ValueError):
    """Bad submission or weights list; the message names the file."""


# =========================================================================== weights over runs

@dataclass
class BlendResult:
    """The searched weights and what they score (means over folds of the objective)."""

    groups: list[str]
    weights: list[float]
    alpha: float
    objective: str  # "competition" | "proxy"
    score: float  # the searched weights, mean over folds
    equal_score: float  # equal weights and the config's alpha, mean over folds
    config_alpha: float  # the runs' inference.alpha (where the search starts)
    single_scores: dict[str, float] = field(default_factory=dict)  # each member alone, searched alpha
    lofo_score: float | None = None  # leave-one-fold-out estimate of the searched weights
    evaluations: int = 0

    def weights_file(self) -> dict:
        """The mapping written to the weights YAML (the format in the module docstring)."""
        return {"runs": {g: round(float(w), 6) for g, w in zip(self.groups, self.weights)},
                "alpha": float(self.alpha)}

    def summary(self) -> str:
        lines = [f"objective: {self.objective} mAP, mean over folds ({self.evaluations} evaluations); "
                 "members alone at the searched alpha"]
        lines += [f"  {g:<30} alone {self.single_scores.get(g, float('nan')):.4f}  weight {w:.3f}"
                  for g, w in zip(self.groups, self.weights)]
        lines.append(f"equal weights, alpha {self.config_alpha:g} (config): {self.equal_score:.4f}")
        lines.append(f"searched weights, alpha {self.alpha:g}: {self.score:.4f}")
        if self.lofo_score is not None:
            lines.append(f"leave-one-fold-out: {self.lofo_score:.4f}")
        return "\n".join(lines)


class FoldObjective:
    """Mean over chosen folds of the per-fold score of a (weights, alpha) pair, memoised."""

    def __init__(self, data: CVData):
        self.data = data
        self.kind = "competition" if data.truth is not None else "proxy"
        self.masks = {k: data.fold_masks(k) for k in data.folds}
        self._cache: dict[tuple, dict[int, float]] = {}

    def per_fold(self, weights: np.ndarray, alpha: float) -> dict[int, float]:
        w = np.asarray(weights, np.float64) / np.sum(weights)
        key = (tuple(np.round(w, 6)), round(float(alpha), 6) if self.kind == "competition" else None)
        if key not in self._cache:
            probs = self.data.blend(w)
            if self.kind == "competition":
                conf = self.data.confidences(probs, alpha)
                floor = self.data.infer_cfg.floor
                scores = {k: fast_map(conf, self.data.truth, rows, imgs, floor)[0]
                          for k, (rows, imgs) in self.masks.items()}
            else:
                scores = {k: proxy_scores(self.data.targets[rows], probs[rows])[0]
                          for k, (rows, _) in self.masks.items()}
            self._cache[key] = scores
        return self._cache[key]

    def __call__(self, weights: np.ndarray, alpha: float, folds: Sequence[int] | None = None) -> float:
        scores = self.per_fold(weights, alpha)
        vals = [scores[k] for k in (folds if folds is not None else scores) if np.isfinite(scores[k])]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def evaluations(self) -> int:
        return len(self._cache)


def _with_share(weights: np.ndarray, i: int, share: float) -> np.ndarray:
    """Weights where member i has ``share`` of the total and the others keep their proportions."""
    rest = np.delete(weights, i)
    rest = rest / rest.sum() if rest.sum() > 0 else np.full(len(rest), 1.0 / max(len(rest), 1))
    out = np.insert(rest * (1.0 - share), i, share)
    return out


def coordinate_search(objective: FoldObjective, alpha0: float, alphas: Sequence[float], steps: int = 10,
                      max_rounds: int = 5, folds: Sequence[int] | None = None) -> tuple[np.ndarray, float, float]:
    """Coordinate ascent from equal weights and ``alpha0`` -> (weights, alpha, score). Only strict
    improvements move, so on ties the simpler starting point (equal weights) wins."""
    n = len(objective.data.probs)
    weights = np.full(n, 1.0 / n)
    alpha = float(alpha0)
    best = objective(weights, alpha, folds)
    search_alpha = objective.kind == "competition" and len(alphas) > 0
    for _ in range(max_rounds):
        improved = False
        for i in range(n if n > 1 else 0):
            for share in np.linspace(0.0, 1.0, steps + 1):
                cand = _with_share(weights, i, share)
                score = objective(cand, alpha, folds)
                if score > best + 1e-12:
                    best, weights, improved = score, cand, True
        if search_alpha:
            for a in alphas:
                score = objective(weights, a, folds)
                if score > best + 1e-12:
                    best, alpha, improved = score, float(a), True
        if not improved:
            break
    return weights, alpha, best


def search_weights(data: CVData, alphas: Sequence[float] = DEFAULT_ALPHAS, steps: int = 10,
                   max_rounds: int = 5, lofo: bool = True) -> BlendResult:
    """Search member weights (and alpha where cell truth exists) on ``data``; see the module docstring."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    objective = FoldObjective(data)
    alpha0 = data.infer_cfg.alpha
    n = len(data.probs)
    weights, alpha, score = coordinate_search(objective, alpha0, alphas, steps, max_rounds)
    singles = {g: objective(np.eye(n)[i], alpha) for i, g in enumerate(data.groups)}
    result = BlendResult(list(data.groups), [float(w) for w in weights], alpha, objective.kind, score,
                         objective(np.ones(n), alpha0), float(alpha0), singles)
    folds = data.folds
    if lofo and len(folds) > 1:
        held = []
        for k in folds:
            w_k, a_k, _ = coordinate_search(objective, alpha0, alphas, steps, max_rounds,
                                            [f for f in folds if f != k])
            held.append(objective(w_k, a_k, [k]))
        held = [h for h in held if np.isfinite(h)]
        result.lofo_score = float(np.mean(held)) if held else None
    result.evaluations = objective.evaluations
    return result


def write_weights(result: BlendResult, path: str | os.PathLike) -> Path:
    """The weights YAML (with the scores as a comment header), written atomically."""
    header = "# hpasc blend: " + result.summary().replace("\n", "\n# ") + "\n"
    write_text_atomic(path, header + yaml.safe_dump(result.weights_file(), sort_keys=False))
    return Path(path)


def blend_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
               alphas: Sequence[float] = DEFAULT_ALPHAS, steps: int = 10, lofo: bool = True,
               labels_csv: str | os.PathLike | None = None, truth_csv: str | os.PathLike | None = None,
               masks_dir: str | os.PathLike | None = None, progress: bool = True) -> BlendResult:
    """Load the runs' OOF predictions, search the weights, write them to ``out`` (YAML)."""
    data = load_cv_data(run_dirs, labels_csv, truth_csv, masks_dir, progress=progress)
    result = search_weights(data, alphas, steps, lofo=lofo)
    write_weights(result, out)
    return result


# =========================================================================== averaging submissions

@dataclass
class _Cell:
    """One cell of the blended image: its mask string, weighted confidence sums and (lazily) its runs."""

    mask: str
    conf: np.ndarray
    runs: tuple[np.ndarray, np.ndarray] | None = None  # ``hpasc.rle.mask_runs``: decoded when needed


def cell_confidences(text: object, where: str = "") -> dict[str, np.ndarray]:
    """``"c conf mask c conf mask ..."`` -> {mask: (19,) confidences}, in first-seen order (parsed by
    ``hpasc.submission.parse_prediction_string``; a bad token is a ``BlendError`` naming ``where``)."""
    from .submission import SubmissionError, parse_prediction_string

    try:
        triples = parse_prediction_string(text, where)
    except SubmissionError as exc:
        raise BlendError(str(exc)) from None
    cells: dict[str, np.ndarray] = {}
    for c, p, mask in zip(triples.classes, triples.conf, triples.masks):
        vec = cells.setdefault(mask, np.zeros(NUM_CLASSES))
        vec[c] = max(vec[c], p)  # a class repeated for one cell counts once, at its best confidence
    return cells


def _runs(mask: str, height: int, width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    from .rle import MaskDecodeError, mask_runs

    try:
        return mask_runs(mask, height, width)
    except MaskDecodeError as exc:
        raise BlendError(f"{where}: a mask does not decode at {width}x{height} ({exc})") from None


def _match_by_iou(cells: list[_Cell], free: list[int], new_runs: list, height: int, width: int,
                  where: str) -> list[int | None]:
    """For each new mask, the free blended cell it is matched to (IoU >= 0.6), or None. Pairs are taken
    greedily in descending IoU, each cell at most once. IoUs come from the scorer's sweep over runs."""
    from .metric import runs_iou

    assign: list[int | None] = [None] * len(new_runs)
    if not free or not new_runs:
        return assign
    for j in free:
        if cells[j].runs is None:
            cells[j].runs = _runs(cells[j].mask, height, width, where)
    old_runs = [cells[j].runs for j in free]
    iou = runs_iou(old_runs, new_runs)  # (new, free)
    threshold = np.float32(MATCH_IOU)
    used = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        p, f = divmod(int(flat), len(free))
        if iou[p, f] < threshold:
            break
        if assign[p] is None and f not in used:
            assign[p] = free[f]
            used.add(f)
    return assign


def blend_image(strings: Sequence[object], weights: Sequence[float], height: int, width: int,
                where: str = "") -> list[_Cell]:
    """One image's prediction strings from several submissions -> blended cells (conf = weighted mean).

    Per submission: a mask identical to a blended cell's joins it; the others are matched by IoU to the
    blended cells this submission has not matched yet; the rest become new cells (in order of appearance).
    """
    total = float(np.sum(weights))
    cells: list[_Cell] = []
    by_mask: dict[str, int] = {}
    for s, (text, w) in enumerate(zip(strings, weights)):
        who = f"{where} (submission {s + 1})"
        taken: set[int] = set()  # blended cells already matched by a cell of this submission
        rest = []
        for mask, conf in cell_confidences(text, who).items():
            if mask in by_mask:  # identical masks first: they must not lose their cell to a look-alike
                cells[by_mask[mask]].conf += w * conf
                taken.add(by_mask[mask])
            else:
                rest.append((mask, conf))
        free = [j for j in range(len(cells)) if j not in taken]
        new_runs = [_runs(mask, height, width, who) for mask, _ in rest] if free else [None] * len(rest)
        for (mask, conf), j, runs in zip(rest, _match_by_iou(cells, free, new_runs, height, width, who), new_runs):
            if j is None:
                j = by_mask[mask] = len(cells)
                cells.append(_Cell(mask, np.zeros(NUM_CLASSES), runs))
            cells[j].conf += w * conf
    for cell in cells:
        cell.conf /= total
    return cells


def format_cells(cells: Sequence[_Cell], floor: float = 0.0) -> str:
    """Blended cells -> PredictionString (``hpasc.submission.prediction_string``: classes >= floor, > 0)."""
    from .submission import prediction_string

    if not cells:
        return ""
    conf = np.stack([cell.conf for cell in cells])
    return prediction_string([cell.mask for cell in cells], conf, np.arange(len(cells)), floor=floor)


def blend_submissions(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                      weights: Sequence[float] | None = None, sample_submission: str | os.PathLike | None = None,
                      floor: float = 0.0, progress: bool = True) -> Path:
    """Weighted average of several submission CSVs -> ``out``, with the IDs, order and sizes of
    ``sample_submission`` (default: the first file). Returns the output path."""
    from tqdm import tqdm

    from .submission import read_submission, write_submission

    if len(paths) < 1:
        raise BlendError("blend needs at least one submission")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise BlendError(f"{len(weights)} weights for {len(paths)} submissions")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise BlendError(f"weights must be non-negative with a positive sum, got {weights}")
    subs = [read_submission(p) for p in paths]
    sample = read_submission(sample_submission, kind="sample submission") if sample_submission else subs[0]
    texts = []
    for path, sub in zip(paths, subs):
        if sub.ID.duplicated().any():
            raise BlendError(f"{path}: image {sub.ID[sub.ID.duplicated()].iat[0]} appears twice")
        texts.append(dict(zip(sub.ID, sub.PredictionString)))
    rows = {}
    for image_id, width, height in tqdm(zip(sample.ID, sample.ImageWidth, sample.ImageHeight), total=len(sample),
                                        desc="blend", disable=None if progress else True):
        strings = []
        for path, text in zip(paths, texts):
            if image_id not in text:
                raise BlendError(f"{path}: image {image_id} is missing")
            strings.append(text[image_id])
        cells = blend_image(strings, weights, int(height), int(width), f"{image_id}")
        rows[image_id] = format_cells(cells, floor)
    write_submission(rows, sample, out)
    return Path(out)
