"""An HTML report over trained runs: what the models learned, per class, with pictures.

``build_report(run_dirs, out_dir)`` writes ``out_dir/index.html`` and, beside it, the PNGs it shows:

- ``ap_bars.png`` — per-class AP of the out-of-fold predictions (proxy, and competition AP where cell
  truth exists), next to the per-class table with class names;
- ``curves_<config>.png`` — every fold's training curves (losses; validation mAP/AUC) from ``log.csv``;
- ``cooccurrence.png`` — how often classes share an image in the training labels (row-normalised:
  P(column | row)), which shows which classes the weak image labels cannot tell apart;
- ``examples.png`` — for each class the cells the ensemble scores highest, with their probability, their
  image's labels and the cell's own top predictions (needs the training images and cached label maps;
  skipped with a note otherwise).

The page has no external resources (inline CSS, images by relative path), so the folder can be copied or
zipped as it is. Figures use matplotlib's object API (no pyplot state, no display needed).
"""
from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import runs
from .config import Config
from .cv import (
    CVData,
    CVResult,
    RunGroup,
    evaluate,
    find_labels_csv,
    group_runs,
    load_cv_data,
    read_image_labels,
    run_config,
)
from .fsutil import atomic_path, read_csv, write_text_atomic
from .labels import CLASS_NAMES, NUM_CLASSES
from .paths import data_root
from .segmentation.folder import read_label_map

CURVE_LOSSES = ("bce", "triplet", "val_loss")
CURVE_SCORES = ("val_map", "val_auc", "val_comp_map")


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[:n - 1] + "…"


# --------------------------------------------------------------------------- plots

def plot_ap_bars(result: CVResult, path: str | os.PathLike) -> Path:
    """Horizontal bars of per-class AP (proxy; competition AP beside it when present)."""
    fig = _figure(7, 6.5)
    ax = fig.add_subplot()
    y = np.arange(NUM_CLASSES)
    series = [("proxy AP", result.per_class_ap)]
    if result.comp_per_class_ap is not None:
        series.append(("competition AP", result.comp_per_class_ap))
    h = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        vals = [np.nan if v is None else v for v in values]
        ax.barh(y + (k - (len(series) - 1) / 2) * h, vals, height=h, label=label)
    ax.set_yticks(y, [f"{c} {_short(n)}" for c, n in enumerate(CLASS_NAMES)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.set_title(f"out-of-fold AP per class (proxy mAP {result.proxy_map:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def read_log(path: str | os.PathLike) -> pd.DataFrame:
    """A run's ``log.csv`` (must have an ``epoch`` column)."""
    path = Path(path)
    df = read_csv(path, "training log")
    if "epoch" not in df.columns:
        raise ValueError(f"{path}: no 'epoch' column in the training log")
    return df


def plot_curves(logs: dict[int, pd.DataFrame], title: str, path: str | os.PathLike) -> Path:
    """Losses (left) and validation scores (right) against epoch, one line style per fold."""
    fig = _figure(11, 4)
    ax_loss, ax_score = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {"bce": "C0", "triplet": "C1", "val_loss": "C3", "val_map": "C2", "val_auc": "C4",
               "val_comp_map": "C5"}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 2, 5, 2))]
    for i, (fold, log) in enumerate(sorted(logs.items())):
        for ax, cols in ((ax_loss, CURVE_LOSSES), (ax_score, CURVE_SCORES)):
            for col in cols:
                if col in log.columns and log[col].notna().any():
                    known = log[log[col].notna()]  # train.val_every: validation only on some epochs
                    ax.plot(known["epoch"], known[col], linestyle=styles[i % len(styles)], color=colours[col],
                            marker="o", markersize=3, label=f"{col} fold {fold}")
    ax_loss.set_title(f"{title}: losses")
    ax_score.set_title(f"{title}: validation")
    ax_score.set_ylim(0, 1)
    for ax in (ax_loss, ax_score):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def cooccurrence(labels: dict[str, tuple[int, ...]]) -> np.ndarray:
    """(19, 19) counts of images labelled with both classes (diagonal: images with the class)."""
    hot = np.zeros((len(labels), NUM_CLASSES), np.int64)
    for r, ids in enumerate(labels.values()):
        hot[r, list(ids)] = 1
    return hot.T @ hot


def plot_cooccurrence(counts: np.ndarray, path: str | os.PathLike) -> Path:
    """Heatmap of P(column | row) = counts[r, c] / counts[r, r]; diagonal counts in the tick labels."""
    diag = np.diag(counts).astype(np.float64)
    cond = np.divide(counts, diag[:, None], out=np.zeros(counts.shape), where=diag[:, None] > 0)
    fig = _figure(9, 8)
    ax = fig.add_subplot()
    im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1)
    ticks = np.arange(NUM_CLASSES)
    ax.set_xticks(ticks, [str(c) for c in ticks], fontsize=8)
    ax.set_yticks(ticks, [f"{_short(n)} ({int(d)})" for n, d in zip(CLASS_NAMES, diag)], fontsize=8)
    for r in range(NUM_CLASSES):
        for c in range(NUM_CLASSES):
            if r != c and cond[r, c] >= 0.1:
                ax.text(c, r, f"{cond[r, c]:.1f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel("class (column)")
    ax.set_title("training labels: P(column class | row class) per image")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def composite(crop: np.ndarray, stretch: bool = False) -> np.ndarray:
    """(S, S, 4) crop (red, green, blue, yellow) -> RGB float image for display (yellow = red + green).

    ``stretch`` scales each colour by its 99.5th percentile: confocal stains are dim, and a per-crop
    stretch shows the pattern (not the absolute brightness)."""
    x = crop.astype(np.float32) / (255.0 if crop.dtype == np.uint8 else 1.0)
    rgb = np.stack([x[..., 0] + 0.5 * x[..., 3], x[..., 1] + 0.5 * x[..., 3], x[..., 2]], axis=-1)
    if stretch:
        rgb = rgb / np.maximum(np.percentile(rgb, 99.5, axis=(0, 1)), 1e-3)
    return np.clip(rgb, 0, 1)


def pick_examples(data: CVData, probs: np.ndarray, per_class: int) -> dict[int, list[int]]:
    """Rows of the highest-probability cells per class, at most one cell per image (varied examples)."""
    picks: dict[int, list[int]] = {}
    images = data.keys["image"].to_numpy()
    for c in range(NUM_CLASSES):
        chosen, seen = [], set()
        for r in np.argsort(-probs[:, c], kind="stable"):
            if images[r] not in seen:
                chosen.append(int(r))
                seen.add(images[r])
            if len(chosen) == per_class:
                break
        picks[c] = chosen
    return picks


def example_title(probs: np.ndarray, targets: np.ndarray, cls: int, top: int = 2) -> str:
    """Caption of one example cell: p(cls), whether its image carries cls (+/-), the image's labels, and
    the cell's own ``top`` predictions, so a wrong example shows what the model took the cell for."""
    labels = ",".join(str(c) for c in np.flatnonzero(targets))
    best = np.argsort(-probs, kind="stable")[:top]
    preds = " ".join(f"{c}:{probs[c]:.2f}" for c in best)
    return f"p={probs[cls]:.2f} {'+' if targets[cls] > 0 else '-'} [{labels}]\npred {preds}"


def plot_examples(data: CVData, probs: np.ndarray, images_dir: Path, masks_dir: Path, cells_cfg,
                  path: str | os.PathLike, per_class: int = 4) -> Path:
    """Grid: a row per class, its top cells (crops as the model saw them, ``cells_cfg``) captioned by
    ``example_title``."""
    from .cells import extract_crops
    from .io import read_image
    picks = pick_examples(data, probs, per_class)
    crops: dict[int, np.ndarray] = {}
    by_image: dict[str, list[int]] = {}
    for rows in picks.values():
        for r in rows:
            by_image.setdefault(data.keys.at[r, "ID"], []).append(r)
    for image_id, rows in by_image.items():
        image = read_image(images_dir, image_id)
        cells = read_label_map(masks_dir, image_id)[0]
        ids = data.keys.loc[rows, "cell_id"].to_numpy()
        all_crops = extract_crops(image, cells, cells_cfg.size, cells_cfg.padding, cells_cfg.neighbours)
        for r, cid in zip(rows, ids):
            crops[r] = all_crops[cid - 1]
    fig = _figure(1.6 * per_class + 1.5, 1.85 * NUM_CLASSES)
    axes = fig.subplots(NUM_CLASSES, per_class, squeeze=False)
    for c in range(NUM_CLASSES):
        for k in range(per_class):
            ax = axes[c, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(picks[c]):
                r = picks[c][k]
                ax.imshow(composite(crops[r], stretch=True))
                ax.set_title(example_title(probs[r], data.targets[r], c), fontsize=7)
            else:
                ax.axis("off")
            if k == 0:
                ax.set_ylabel(f"{c} {_short(CLASS_NAMES[c], 16)}", fontsize=7)
    fig.suptitle("top out-of-fold cells per class: p(class), + if the image has the class, [image labels];\n"
                 "pred: the cell's two most probable classes", fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- the page

_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td.name,th.name{text-align:left}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#a55}h2{border-bottom:1px solid #ddd;padding-bottom:3px}"""


def _fmt(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.4f}"


def class_table(result: CVResult, positives: np.ndarray) -> str:
    """HTML table: id, name, cells with the class among their image labels, proxy AP/AUC, competition AP."""
    comp = result.comp_per_class_ap is not None
    auc = result.cell_auc
    head = "<tr><th>id</th><th class=name>class</th><th>cells (image label)</th><th>proxy AP</th>" \
           "<th>proxy AUC</th>" + ("<th>competition AP</th>" if comp else "") \
           + ("<th>cell AUC within images</th><th>cell AUC pooled</th><th>truth cells (images)</th>"
              if auc else "") + "</tr>"
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        cells = f"<td>{c}</td><td class=name>{html.escape(name)}</td><td>{int(positives[c])}</td>" \
                f"<td>{_fmt(result.per_class_ap[c])}</td><td>{_fmt(result.per_class_auc[c])}</td>"
        if comp:
            cells += f"<td>{_fmt(result.comp_per_class_ap[c])}</td>"
        if auc:
            cells += f"<td>{_fmt(auc['per_class_within'][str(c)])}</td><td>{_fmt(auc['per_class'][str(c)])}</td>"
            n, images = auc["per_class_support"][str(c)]
            cells += f"<td>{n} ({images})</td>"
        rows.append(f"<tr>{cells}</tr>")
    total = f"<tr><th></th><th class=name>mean (all cells)</th><th>{result.n_cells}</th>" \
            f"<th>{_fmt(result.proxy_map)}</th>" \
            f"<th>{_fmt(result.proxy_auc)}</th>" + (f"<th>{_fmt(result.comp_map)}</th>" if comp else "") \
            + (f"<th>{_fmt(auc['within'])}</th><th>{_fmt(auc['mean'])}</th><th></th>" if auc else "") + "</tr>"
    return f"<table>{head}{''.join(rows)}{total}</table>"


def score_table(key: str, table: dict) -> str:
    """HTML table of {row key: {score name: value}} (per fold, per run)."""
    names = list(next(iter(table.values()), {}))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(f"<tr><td class=name>{html.escape(str(k))}</td>"
                   + "".join(f"<td>{_fmt(scores.get(n))}</td>" for n in names) + "</tr>"
                   for k, scores in table.items())
    return f"<table><tr><th class=name>{key}</th>{head}</tr>{rows}</table>"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def build_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 labels_csv: str | os.PathLike | None = None, images_dir: str | os.PathLike | None = None,
                 masks_dir: str | os.PathLike | None = None, truth_csv: str | os.PathLike | None = None,
                 examples_per_class: int = 4, progress: bool = True) -> Path:
    """Write ``out_dir/index.html`` and its PNGs for the runs; returns the HTML path.

    Data paths (labels, truth, label maps, images) default to those in the first run's config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(run_dirs)
    cfg = run_config(groups[0])
    data = load_cv_data(run_dirs, labels_csv, truth_csv, masks_dir, progress=progress)
    result = evaluate(data)
    sections = [
        _ap_section(result, data, out),
        "<h2>Training curves</h2>" + "".join(_curves(group, out) for group in groups),
        _cooccurrence_section(Path(labels_csv) if labels_csv else find_labels_csv(cfg), out),
        "<h2>Example cells per class</h2>" + _examples_section(data, cfg, out, images_dir, masks_dir,
                                                               examples_per_class),
    ]
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hpasc report</title>" \
           f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n"
    path = out / "index.html"
    write_text_atomic(path, page)
    return path


def _ap_section(result: CVResult, data: CVData, out: Path) -> str:
    plot_ap_bars(result, out / "ap_bars.png")
    comp = (f"; competition mAP {_fmt(result.comp_map)} (alpha {result.alpha:g}) of the oracle's "
            f"{_fmt(result.oracle_map)} (these masks with their true labels)" if result.comp_map is not None else "")
    return (f"<h1>hpasc report</h1><p>runs: {html.escape(', '.join(result.runs))} — {result.n_images} "
            f"out-of-fold images, {result.n_cells} cells. Proxy mAP {_fmt(result.proxy_map)}, "
            f"AUC {_fmt(result.proxy_auc)}{comp}.</p>"
            "<h2>Per-class AP (out of fold)</h2>" + class_table(result, data.targets.sum(axis=0))
            + '<p><img src="ap_bars.png" alt="AP per class"></p>'
            + "<h3>Per fold</h3>" + score_table("fold", result.folds)
            + ("<h3>Each run alone</h3>" + score_table("run", result.members) if result.members else ""))


def _curves(group: RunGroup, out: Path) -> str:
    logs = {k: read_log(d / runs.LOG_FILE) for k, d in group.fold_dirs.items() if (d / runs.LOG_FILE).is_file()}
    if not logs:
        return f"<p class=note>{html.escape(group.name)}: no log.csv in its fold folders.</p>"
    name = f"curves_{_slug(group.name)}.png"
    plot_curves(logs, group.name, out / name)
    return f'<p><img src="{name}" alt="training curves of {html.escape(group.name)}"></p>'


def _cooccurrence_section(labels_path: Path, out: Path) -> str:
    labels = read_image_labels(labels_path)
    plot_cooccurrence(cooccurrence(labels), out / "cooccurrence.png")
    return (f"<h2>Class co-occurrence of the training labels</h2><p>{len(labels)} images of "
            f"{html.escape(str(labels_path))}; cell (r, c) is the share of images with class r that also "
            'have class c.</p><p><img src="cooccurrence.png" alt="class co-occurrence"></p>')


def _examples_section(data: CVData, cfg: Config, out: Path, images_dir, masks_dir, per_class: int) -> str:
    images = Path(images_dir) if images_dir else data_root(cfg.data.root) / "train"
    masks = Path(masks_dir) if masks_dir else runs.masks_dir(cfg.data.work_dir)
    if per_class < 1:
        return "<p class=note>examples disabled.</p>"
    if not images.is_dir() or not masks.is_dir():
        return (f"<p class=note>No example cells: images ({html.escape(str(images))}) or label maps "
                f"({html.escape(str(masks))}) not found.</p>")
    probs = data.blend([1.0] * len(data.probs))
    plot_examples(data, probs, images, masks, cfg.cells, out / "examples.png", per_class)
    return '<p><img src="examples.png" alt="example cells per class"></p>'
