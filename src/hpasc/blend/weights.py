"""Ensemble weights over runs from out-of-fold predictions (``hpasc blend runs``).

Each config (``runs/<config>/fold*``) is one ensemble member. The search
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
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from ..cv import CVData, load_cv_data, proxy_scores
from ..fastmap import fast_map
from ..fsutil import write_text_atomic

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


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


