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

from .config import Config, InferenceConfig, load_config
from .fsutil import read_csv
from .labels import CLASS_NAMES, NUM_CLASSES, parse_label, to_multihot
from . import runs
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
        name = fold_dir.parent.name
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

def read_label_map(masks_dir: str | Path, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached segmentation of one image -> (cell label map, border flags, rel_area), the per-cell
    geometry as the segmentation post-processing records it (``cell_stats``)."""
    from .segmentation import cell_stats, read_masks

    cells, _ = read_masks(masks_dir, image_id)
    border, rel_area = cell_stats(cells)
    return cells, border, rel_area


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


# --------------------------------------------------------------------------- the competition mAP, fast

def label_map_runs(labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label map -> per cell 1..n its foreground runs in the codec's column-major order (``mask_runs``
    form), from one pass over the pixels."""
    flat = np.asarray(labels).ravel(order="F")
    n = int(flat.max(initial=0))
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.r_[0, change].astype(np.int64)
    ends = np.r_[change, flat.size].astype(np.int64)
    owner = flat[starts]
    keep = owner > 0
    starts, ends, owner = starts[keep], ends[keep], owner[keep]
    order = np.argsort(owner, kind="stable")  # runs stay sorted within each cell
    bounds = np.searchsorted(owner[order], np.arange(1, n + 2))
    return [(starts[order[bounds[i]:bounds[i + 1]]], ends[order[bounds[i]:bounds[i + 1]]]) for i in range(n)]


def match_image(pred_labels: np.ndarray, truth_labels: list[tuple[int, ...]],
                truth_masks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (tp (n_pred, 19) bool, n_truth (19,) int).

    tp[p, c]: the class-c truth cell that predicted cell p+1 overlaps best has IoU >= 0.6 (float32, first
    cell on ties, as ``hpasc.metric`` does). Intersections come from the scorer's sweep over mask runs.
    """
    from .metric import IOU_THRESHOLD, runs_iou
    from .rle import mask_runs

    height, width = pred_labels.shape
    pred_runs = label_map_runs(pred_labels)
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
                            masks_dir: Path, progress: bool = True) -> CompetitionTruth:
    """Precompute the TP flags of every OOF row against the truth CSV (one pass per image)."""
    from tqdm import tqdm

    from .metric import read_truth, truth_cells

    truth = read_truth(truth_csv).drop_duplicates("ID").set_index("ID")
    n = len(keys)
    out = CompetitionTruth(np.zeros((n, NUM_CLASSES), bool), np.zeros((n, NUM_CLASSES), bool),
                           np.zeros((len(image_ids), NUM_CLASSES), np.int64), np.zeros(n, bool), np.ones(n))
    img_codes = keys["image"].to_numpy()
    cell_ids = keys["cell_id"].to_numpy()
    starts = np.searchsorted(img_codes, np.arange(len(image_ids) + 1))
    for i, image_id in enumerate(tqdm(image_ids, desc="truth", disable=None if progress else True)):
        if image_id not in truth.index:
            raise CVError(f"{truth_csv}: image {image_id} of the OOF predictions has no truth row")
        row = truth.loc[image_id]
        labels_map, border, rel_area = read_label_map(masks_dir, image_id)
        if labels_map.shape != (int(row.ImageHeight), int(row.ImageWidth)):
            raise CVError(f"{masks_dir}/{image_id}.png: label map {labels_map.shape} but the truth says "
                          f"{row.ImageHeight}x{row.ImageWidth}")
        t_masks, t_labels = truth_cells(image_id, row.PredictionString)
        tp, n_truth = match_image(labels_map, t_labels, t_masks)
        rows = slice(starts[i], starts[i + 1])
        cells = cell_ids[rows]
        if len(cells) and cells.max() > tp.shape[0]:
            raise CVError(f"{masks_dir}/{image_id}.png: has {tp.shape[0]} cells but the OOF names cell "
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
    from .metric import average_precision

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
        data.truth = build_competition_truth(keys, image_ids, truth_path,
                                             Path(masks_dir) if masks_dir else runs.masks_dir(cfg.data.work_dir), progress)
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
    for k in data.folds:
        rows, images = data.fold_masks(k)
        fold_scores: dict[str, float | None] = {"proxy_map": proxy_scores(data.targets[rows], probs[rows])[0]}
        if conf is not None:
            fold_scores["comp_map"] = fast_map(conf, data.truth, rows, images, data.infer_cfg.floor)[0]
        result.folds[k] = {name: _nan_to_none([v])[0] for name, v in fold_scores.items()}
    if n > 1:
        result.members = members
    return result


def _overall(data: CVData, weights: np.ndarray, alpha: float | None) -> dict[str, float | None]:
    """Overall proxy mAP and competition mAP of one weighting."""
    probs = data.blend(weights)
    out = {"proxy_map": proxy_scores(data.targets, probs)[0]}
    if data.truth is not None:
        out["comp_map"] = fast_map(data.confidences(probs, alpha), data.truth, floor=data.infer_cfg.floor)[0]
    return {name: _nan_to_none([v])[0] for name, v in out.items()}


def cross_validate(run_dirs: Sequence[str | Path], labels_csv: str | Path | None = None,
                   truth_csv: str | Path | None = None, masks_dir: str | Path | None = None,
                   weights: Sequence[float] | None = None, alpha: float | None = None,
                   use_truth: bool = True, progress: bool = True) -> CVResult:
    """Gather the OOF predictions of ``run_dirs`` and score them (see the module docstring)."""
    data = load_cv_data(run_dirs, labels_csv, truth_csv, masks_dir, use_truth, progress)
    return evaluate(data, weights, alpha)
