"""Offline cross-validation over the out-of-fold predictions of trained runs.

A run folder ``runs/<config>/fold<k>/`` holds ``oof.csv``: one row per cell of fold k's validation images
(``ID,cell_id,p0..p18``). Gathering every fold of a config gives one prediction per training cell, made by
a model that never saw that image; that is the offline stand-in for the leaderboard.

Two scores come out:

- the cell-level **proxy** (``hpasc.metric.cell_proxy_scores``): every cell takes its image's labels as
  targets. It needs nothing but labels, so it works on the real data, but it rewards image-level guessing.
- the **competition mAP** where cell truth exists (synthetic data, ``data.truth_csv``): the cell
  probabilities go through the same confidence recipe as inference (``hpasc.confidence``) and are scored
  against the truth masks by the competition's rules.

The competition mAP is evaluated many times by the blend search, so it is not computed by writing and
re-scoring a submission each time. Predicted cells come from a label map and never overlap, so whether a
(cell, class) prediction is a true positive does not depend on the confidences: at most one disjoint cell
can reach IoU >= 0.6 with a truth cell. ``CompetitionTruth`` works those flags out once; then the mAP of
any confidence matrix is a sort per class (``fast_map``). ``tests/test_cv.py`` checks it against
``hpasc.metric.score`` on a written submission.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import runs
from .config import Config, InferenceConfig, load_config
from .fastmap import CompetitionTruth, build_competition_truth, fast_map
from .fsutil import read_csv
from .labels import CLASS_NAMES, NUM_CLASSES, parse_label, to_multihot
from .runs import PROB_COLUMNS


class CVError(ValueError):
    """Run folders or OOF files that cannot be evaluated; the message names the file."""


# --------------------------------------------------------------------------- run folders and OOF files

@dataclass(frozen=True)
class RunGroup:
    """One config's fold runs (an ensemble member): ``name`` is ``<config>``, folds map to run folders."""

    name: str
    fold_dirs: dict[int, Path]


def fold_of(run_dir: Path) -> int:
    """``.../fold3`` -> 3."""
    return runs.fold_of(run_dir, CVError)


def group_runs(run_dirs: Sequence[str | Path]) -> list[RunGroup]:
    """Run folders -> groups by config. Each argument is ``runs/<config>/fold<k>`` or a folder holding
    such runs (every run below it with an ``oof.csv`` is taken; ``hpasc.runs.find_runs``)."""
    groups: dict[str, dict[int, Path]] = {}
    for fold_dir in runs.find_runs(run_dirs, need=(runs.OOF_FILE,), error=CVError):
        name = runs.group_name(fold_dir)
        folds = groups.setdefault(name, {})
        k = fold_of(fold_dir)
        if k in folds and folds[k].resolve() != fold_dir.resolve():
            raise CVError(f"{fold_dir}: fold {k} of {name} given twice ({folds[k]})")
        folds[k] = fold_dir
    return [RunGroup(name, dict(sorted(folds.items()))) for name, folds in groups.items()]


def read_oof(path: str | Path) -> pd.DataFrame:
    """One ``oof.csv`` -> DataFrame ``ID, cell_id, p0..p18`` (validated by ``hpasc.runs.read_oof``)."""
    return runs.read_oof(path, CVError)[list(runs.OOF_COLUMNS)]


def load_group_oof(group: RunGroup) -> pd.DataFrame:
    """All folds of one config -> ``ID, cell_id, fold, p0..p18`` (an image belongs to one fold only)."""
    parts = []
    for k, fold_dir in group.fold_dirs.items():
        df = read_oof(fold_dir / runs.OOF_FILE)
        df.insert(2, "fold", k)
        parts.append(df)
    oof = pd.concat(parts, ignore_index=True)
    clash = oof.groupby("ID")["fold"].nunique()
    if (clash > 1).any():
        raise CVError(f"{group.name}: image {clash[clash > 1].index[0]} is out-of-fold in several folds")
    return oof


def run_config(group: RunGroup) -> Config:
    """The resolved config of the group's first fold."""
    first = next(iter(group.fold_dirs.values()))
    return load_config(first / runs.CONFIG_FILE)


# --------------------------------------------------------------------------- data paths from a config

def read_image_labels(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``ID,Label`` CSV (train.csv or folds.csv) -> {ID: class ids}."""
    path = Path(path)
    df = read_csv(path, "CSV", CVError, dtype={"ID": str, "Label": str})
    if not {"ID", "Label"} <= set(df.columns):
        raise CVError(f"{path}: expected columns ID,Label")
    return {i: parse_label(lab) for i, lab in zip(df.ID, df.Label)}


def find_labels_csv(cfg: Config) -> Path:
    """folds.csv if it exists, else train.csv, as the config names them."""
    for value in (cfg.data.folds_csv, cfg.data.train_csv):
        path = runs.resolve_data_file(cfg, value)
        if path is not None:
            return path
    raise CVError(f"{cfg.name}: neither {cfg.data.folds_csv} nor {cfg.data.train_csv} found "
                  f"(data.root={cfg.data.root}); pass the labels CSV explicitly")


# --------------------------------------------------------------------------- the evaluation data

@dataclass
class CVData:
    """Everything an evaluation needs, aligned row by row: (image, cell) keys, each group's probabilities,
    image-label targets, and the competition truth when it exists."""

    keys: pd.DataFrame  # ID, cell_id, fold, image (int code, ascending)
    image_ids: list[str]
    image_folds: np.ndarray  # (n_images,)
    groups: list[str]
    probs: list[np.ndarray]  # per group, (n_rows, 19) float32
    targets: np.ndarray  # (n_rows, 19) image labels as cell targets
    infer_cfg: InferenceConfig
    truth: CompetitionTruth | None = None

    @property
    def folds(self) -> list[int]:
        return sorted(set(self.image_folds.tolist()))

    def blend(self, weights: Sequence[float]) -> np.ndarray:
        """Weighted mean of the groups' probabilities."""
        w = np.asarray(weights, np.float64)
        if w.shape != (len(self.probs),) or w.sum() <= 0 or (w < 0).any():
            raise ValueError(f"need {len(self.probs)} non-negative weights with a positive sum, got {weights}")
        w = w / w.sum()
        return sum(wi * p for wi, p in zip(w, self.probs)).astype(np.float32)

    def confidences(self, probs: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Cell probabilities -> submission confidences through the run's recipe (optionally another
        alpha), image by image exactly as inference forms them."""
        from .confidence import combine_grouped

        cfg = self.infer_cfg if alpha is None else dataclasses.replace(self.infer_cfg, alpha=float(alpha))
        return combine_grouped(probs, self.keys["image"].to_numpy(), cfg, self.truth.border,
                               self.truth.rel_area)

    def fold_masks(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(row mask, image mask) of one fold."""
        return self.keys["fold"].to_numpy() == fold, self.image_folds == fold


def load_cv_data(run_dirs: Sequence[str | Path], labels_csv: str | Path | None = None,
                 truth_csv: str | Path | None = None, masks_dir: str | Path | None = None,
                 use_truth: bool = True, progress: bool = True) -> CVData:
    """Read every group's OOF, align them on the cells all groups predicted, attach labels and truth.

    Paths default to the first run's config: labels from ``data.folds_csv``/``data.train_csv``, truth from
    ``data.truth_csv`` (competition mAP only when it is set), label maps from ``<data.work_dir>/masks/train``.
    """
    groups = group_runs(run_dirs)
    cfg = run_config(groups[0])
    frames = [load_group_oof(g) for g in groups]
    keys = frames[0][["ID", "cell_id", "fold"]]
    for g, df in zip(groups[1:], frames[1:]):
        keys = keys.merge(df[["ID", "cell_id", "fold"]], on=["ID", "cell_id"], suffixes=("", "_other"))
        if (keys["fold"] != keys.pop("fold_other")).any():
            raise CVError(f"{g.name}: its folds do not split the images as {groups[0].name}'s do")
    if keys.empty:
        raise CVError(f"{', '.join(g.name for g in groups)}: no cell is predicted by every run")
    keys = keys.sort_values(["ID", "cell_id"], kind="stable").reset_index(drop=True)
    image_ids = sorted(keys["ID"].unique().tolist())
    keys["image"] = np.searchsorted(np.asarray(image_ids, dtype=object), keys["ID"].to_numpy())
    probs = []
    for df in frames:
        aligned = keys[["ID", "cell_id"]].merge(df, on=["ID", "cell_id"], how="left")
        probs.append(aligned[list(PROB_COLUMNS)].to_numpy(np.float32))
    image_folds = keys.groupby("image")["fold"].first().to_numpy()

    dropped = {g.name: len(df) - len(keys) for g, df in zip(groups, frames) if len(df) > len(keys)}
    if dropped:
        warnings.warn(f"cells not predicted by every run are left out: {dropped}", stacklevel=2)

    labels_path = Path(labels_csv) if labels_csv else find_labels_csv(cfg)
    labels = read_image_labels(labels_path)
    missing = [i for i in image_ids if i not in labels]
    if missing:
        raise CVError(f"{labels_path}: no label for image {missing[0]} ({len(missing)} images missing)")
    image_targets = np.stack([to_multihot(labels[i]) for i in image_ids])
    infer_cfg = cfg.inference
    if infer_cfg.image_agg == "head":  # OOF files hold no image-head output: aggregate the cells instead
        warnings.warn(f"{groups[0].name}: inference.image_agg 'head' is evaluated as 'mean' (no image-head "
                      "probabilities in oof.csv)", stacklevel=2)
        infer_cfg = dataclasses.replace(infer_cfg, image_agg="mean")
    data = CVData(keys, image_ids, image_folds, [g.name for g in groups], probs,
                  image_targets[keys["image"].to_numpy()], infer_cfg)
    truth_path = Path(truth_csv) if truth_csv else runs.resolve_data_file(cfg, cfg.data.truth_csv)
    if truth_path is None and cfg.data.truth_csv:
        truth_path = Path(cfg.data.truth_csv)  # named but not found: said below
    if use_truth and truth_path is not None:
        if not truth_path.is_file():
            raise CVError(f"{truth_path}: truth CSV not found")
        masks = Path(masks_dir) if masks_dir else runs.masks_dir(cfg.data.work_dir)
        data.truth = build_competition_truth(keys, image_ids, truth_path, masks, progress, error=CVError)
    return data


# --------------------------------------------------------------------------- results

def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else round(float(v), 6) for v in values]


@dataclass
class CVResult:
    """Scores of the (equal-weight, unless given) ensemble of the runs over all their OOF cells."""

    runs: list[str]
    n_images: int
    n_cells: int
    proxy_map: float
    proxy_auc: float
    per_class_ap: list[float | None]
    per_class_auc: list[float | None]
    comp_map: float | None = None
    comp_per_class_ap: list[float | None] | None = None
    alpha: float | None = None
    oracle_map: float | None = None  # the OOF cells given their true labels (the segmentation's ceiling)
    cell_auc: dict | None = None  # hpasc.cell_eval.cell_auc of the confidences on the matched cells
    folds: dict[int, dict[str, float | None]] = field(default_factory=dict)
    members: dict[str, dict[str, float | None]] = field(default_factory=dict)  # each run alone (if several)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self) -> str:
        """Readable per-class table with class names, then the per-fold and overall lines."""
        head = f"{'id':>2}  {'class':<42} {'proxy AP':>8} {'AUC':>6}"
        if self.comp_per_class_ap is not None:
            head += f" {'comp AP':>8}"
        lines = [f"runs: {', '.join(self.runs)}  ({self.n_images} images, {self.n_cells} cells)", head]
        fmt = lambda v, w: f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        for c, name in enumerate(CLASS_NAMES):
            line = f"{c:>2}  {name:<42} {fmt(self.per_class_ap[c], 8)} {fmt(self.per_class_auc[c], 6)}"
            if self.comp_per_class_ap is not None:
                line += f" {fmt(self.comp_per_class_ap[c], 8)}"
            lines.append(line)
        for label, table in (("fold", self.folds), ("alone", self.members)):
            for key, scores in table.items():
                text = "  ".join(f"{name} {fmt(v, 0)}" for name, v in scores.items())
                lines.append(f"{label} {key}: {text}")
        overall = f"overall: proxy mAP {self.proxy_map:.4f}  proxy AUC {self.proxy_auc:.4f}"
        if self.comp_map is not None:
            overall += f"  competition mAP {self.comp_map:.4f} (alpha {self.alpha:g})"
        lines.append(overall)
        if self.cell_auc is not None:
            worst = self.cell_auc["worst"]
            lines.append(f"cells: oracle mAP {fmt(self.oracle_map, 0)}  cell AUC within images "
                         f"{fmt(self.cell_auc['within'], 0)}  pooled {fmt(self.cell_auc['mean'], 0)}"
                         + (f"  worst {CLASS_NAMES[worst['class']]} {worst['auc']:.4f}" if worst else ""))
        return "\n".join(lines)


def proxy_scores(targets: np.ndarray, probs: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mAP, mean AUC, per-class AP, per-class AUC) of the cell-level proxy; NaN where undefined."""
    from .metric import cell_proxy_scores

    res = cell_proxy_scores(targets, probs)
    ap = np.array([np.nan if res["ap"][c] is None else res["ap"][c] for c in range(NUM_CLASSES)])
    auc = np.array([np.nan if res["auc"][c] is None else res["auc"][c] for c in range(NUM_CLASSES)])
    nan = float("nan")
    return (nan if res["mAP"] is None else res["mAP"]), (nan if res["mAUC"] is None else res["mAUC"]), ap, auc


def evaluate(data: CVData, weights: Sequence[float] | None = None, alpha: float | None = None) -> CVResult:
    """Score the weighted blend of ``data``'s groups: proxy over all cells, competition mAP per fold and
    over all folds (one ranking across every OOF image, as the leaderboard ranks across test images).
    With several groups, each one alone is scored too (``members``)."""
    n = len(data.probs)
    if n > 1:
        members = {name: _overall(data, np.eye(n)[i], alpha) for i, name in enumerate(data.groups)}
    probs = data.blend(weights if weights is not None else [1.0] * n)
    pmap, pauc, ap, auc = proxy_scores(data.targets, probs)
    result = CVResult(data.groups, len(data.image_ids), len(data.keys), pmap, pauc,
                      _nan_to_none(ap), _nan_to_none(auc))
    conf = None
    if data.truth is not None:
        result.alpha = float(data.infer_cfg.alpha if alpha is None else alpha)
        conf = data.confidences(probs, result.alpha)
        cmap, cap = fast_map(conf, data.truth, floor=data.infer_cfg.floor)
        result.comp_map, result.comp_per_class_ap = cmap, _nan_to_none(cap)
        result.oracle_map = fast_map(data.truth.tp.astype(np.float32), data.truth)[0]
        result.cell_auc = cell_level(data, conf)
    for k in data.folds:
        rows, images = data.fold_masks(k)
        fold_scores: dict[str, float | None] = {"proxy_map": proxy_scores(data.targets[rows], probs[rows])[0]}
        if conf is not None:
            fold_scores["comp_map"] = fast_map(conf, data.truth, rows, images, data.infer_cfg.floor)[0]
        result.folds[k] = {name: _nan_to_none([v])[0] for name, v in fold_scores.items()}
    if n > 1:
        result.members = members
    return result


def cell_level(data: CVData, conf: np.ndarray) -> dict:
    """Cell AUCs (``hpasc.cell_eval.cell_auc``) of OOF confidences against the truth: a cell is positive
    for the classes of the truth cell it matches (IoU >= 0.6, ``CompetitionTruth.tp``); unmatched cells
    are left out, as ``hpasc.cell_eval`` leaves out unmatched truth cells."""
    from .cell_eval import MatchedCells, cell_auc

    tp = data.truth.tp
    rows = tp.any(axis=1)
    matched = MatchedCells(data.keys["ID"].to_numpy()[rows].tolist(), tp[rows].astype(np.float64),
                           np.asarray(conf, np.float64)[rows], int(rows.sum()), {})
    return cell_auc(matched)


def _overall(data: CVData, weights: np.ndarray, alpha: float | None) -> dict[str, float | None]:
    """Overall proxy mAP and competition mAP of one weighting."""
    probs = data.blend(weights)
    out = {"proxy_map": proxy_scores(data.targets, probs)[0]}
    if data.truth is not None:
        conf = data.confidences(probs, alpha)
        out["comp_map"] = fast_map(conf, data.truth, floor=data.infer_cfg.floor)[0]
        out["cell_auc_within"] = cell_level(data, conf)["within"]
    return {name: _nan_to_none([v])[0] for name, v in out.items()}


def cross_validate(run_dirs: Sequence[str | Path], labels_csv: str | Path | None = None,
                   truth_csv: str | Path | None = None, masks_dir: str | Path | None = None,
                   weights: Sequence[float] | None = None, alpha: float | None = None,
                   use_truth: bool = True, progress: bool = True) -> CVResult:
    """Gather the OOF predictions of ``run_dirs`` and score them (see the module docstring)."""
    data = load_cv_data(run_dirs, labels_csv, truth_csv, masks_dir, use_truth, progress)
    return evaluate(data, weights, alpha)
