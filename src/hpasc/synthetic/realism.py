"""How the synthetic world compares with real images: field statistics of images and their cell masks.

The synthetic segmentation and learning tests are only as hard as the world is realistic (issue #17).
:func:`field_stats` measures one image and its cell label map with scale-free numbers, so a 512 px
synthetic field and a 2048 px HPA image are comparable:

- ``cells``: cells in the image; ``diameter``: median equivalent cell diameter / image side;
  ``size_cv``: coefficient of variation of the cell areas;
- ``coverage``: fraction of the image inside cells (confluence);
- ``touching``: fraction of cells that touch another one (across a gap of at most
  ``TOUCH_GAP`` x the side, one pixel at least: hpacellseg leaves thin seams between cells);
- ``border``: fraction of cells cut by the image edge; ``solidity``: median area / convex-hull area
  (long processes and irregular outlines lower it);
- per channel: ``background`` (median outside cells), ``contrast`` (median inside cells minus
  background, over the channel's 99.9th percentile) and a histogram of the values (64 bins over [0, 1]).

:func:`compare` sets the per-image values of two sources side by side (median and range) and says where
the second's median lies outside the first's range. Geometry is measured on the label map reduced to at
most ``GEOMETRY_SIDE`` px (nearest neighbour): the measures are ratios, and a 3072 px map costs no more
than a 1024 px one.

A source is a synthetic world folder (``hpasc synth`` output: images of a split with the cells of
``truth/{split}.csv``) or an images folder whose label maps are ``{ID}.png`` or ``{ID}_cellmask.png``
(``hpasc segment`` output, the HPA samples) in a masks folder, by default the images folder itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from skimage.measure import regionprops
from skimage.segmentation import expand_labels

from ..io import CHANNELS, read_image

TOUCH_GAP = 0.002  # of the image side: seams this thin between two masks still mean touching
GEOMETRY_SIDE = 1024
HIST_BINS = 64
GEOMETRY = ("cells", "diameter", "size_cv", "coverage", "touching", "border", "solidity")
CHANNEL_MEASURES = ("background", "contrast")


@dataclass
class FieldStats:
    """The measures of one image (module doc); channel measures keyed by channel name."""

    image_id: str
    side: int
    cells: int
    diameter: float
    size_cv: float
    coverage: float
    touching: float
    border: float
    solidity: float
    background: dict[str, float]
    contrast: dict[str, float]
    hist: dict[str, list[float]]  # density of each channel's values over HIST_BINS bins in [0, 1]

    def values(self) -> dict[str, float]:
        """Every scalar measure by name (``red.background`` and so on for the channels)."""
        out = {name: float(getattr(self, name)) for name in GEOMETRY}
        for measure in CHANNEL_MEASURES:
            out.update({f"{c}.{measure}": getattr(self, measure)[c] for c in CHANNELS})
        return out


def _reduced(cells: np.ndarray) -> np.ndarray:
    from ..segmentation.postprocess import resize_labels

    f = GEOMETRY_SIDE / max(cells.shape)
    if f >= 1:
        return cells
    return resize_labels(cells, (max(1, round(cells.shape[0] * f)), max(1, round(cells.shape[1] * f))), "nearest")


def touching_cells(cells: np.ndarray, gap: int) -> np.ndarray:
    """Boolean per label 0..max: the cell has another cell within ``gap`` pixels (0: sharing an edge)."""
    n = int(cells.max()) + 1
    grown = expand_labels(cells, gap // 2 + gap % 2) if gap > 0 else cells
    out = np.zeros(n, bool)
    for a, b in ((grown[:, :-1], grown[:, 1:]), (grown[:-1, :], grown[1:, :])):
        pair = (a != b) & (a > 0) & (b > 0)
        out[a[pair]] = True
        out[b[pair]] = True
    out[0] = False
    return out


def field_stats(image: np.ndarray, cells: np.ndarray, image_id: str = "") -> FieldStats:
    """The measures of one image (``H x W x 4`` in [0, 1]) and its cell label map (module doc)."""
    if image.shape[:2] != cells.shape:
        raise ValueError(f"{image_id}: image {image.shape[:2]} and label map {cells.shape} differ in size")
    side = max(cells.shape)
    inside = cells > 0
    small = _reduced(cells)
    ids, areas = np.unique(small[small > 0], return_counts=True)
    n = len(ids)
    frame = np.zeros(small.max() + 1, bool)
    for edge in (small[0], small[-1], small[:, 0], small[:, -1]):
        frame[edge] = True
    gap = max(1, round(TOUCH_GAP * max(small.shape)))
    touch = touching_cells(small, gap)
    solidity = [r.solidity for r in regionprops(small)] if n else []
    background, contrast, hist = {}, {}, {}
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    for k, name in enumerate(CHANNELS):
        channel = image[..., k]
        bg = float(np.median(channel[~inside])) if (~inside).any() else 0.0
        fg = float(np.median(channel[inside])) if inside.any() else bg
        top = float(np.percentile(channel, 99.9))
        background[name] = bg
        contrast[name] = (fg - bg) / top if top > 0 else 0.0
        counts, _ = np.histogram(channel, bins=edges)
        hist[name] = (counts / max(channel.size, 1)).tolist()
    return FieldStats(
        image_id=image_id, side=int(side), cells=n,
        diameter=float(np.sqrt(4 * np.median(areas) / np.pi) / max(small.shape)) if n else 0.0,
        size_cv=float(areas.std() / areas.mean()) if n else 0.0,
        coverage=float(inside.mean()),
        touching=float(touch[ids].mean()) if n else 0.0,
        border=float(frame[ids].mean()) if n else 0.0,
        solidity=float(np.median(solidity)) if n else 0.0,
        background=background, contrast=contrast, hist=hist)


# --------------------------------------------------------------------------- sources

def _world_fields(root: Path, split: str, limit: int | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    from ..metric import read_truth, truth_cells
    from ..rle import decode_label_map

    frame = read_truth(root / "truth" / f"{split}.csv")
    for row in frame.head(limit).itertuples(index=False) if limit else frame.itertuples(index=False):
        image_id = str(row.ID)
        masks, _ = truth_cells(image_id, str(row.PredictionString))
        cells = decode_label_map(masks, int(row.ImageHeight), int(row.ImageWidth))
        yield image_id, read_image(root / split, image_id), cells


def _folder_fields(images: Path, masks: Path, limit: int | None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    from ..segmentation.evaluate import reference_path
    from ..segmentation.folder import _read_label_png, list_image_ids

    found = [(i, p) for i in list_image_ids(images) if (p := reference_path(masks, i)) is not None]
    if not found:
        raise FileNotFoundError(f"{masks}: no label map ({{ID}}.png or {{ID}}_cellmask.png) for any image "
                                f"of {images}")
    for image_id, path in found[:limit] if limit else found:
        yield image_id, read_image(images, image_id), _read_label_png(path)


def source_fields(source: os.PathLike | str, masks: os.PathLike | str | None = None, split: str = "train",
                  limit: int | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(ID, image, cell label map)`` of each image of a source (module doc), at most ``limit``."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: folder not found")
    if masks is None and (source / "truth" / f"{split}.csv").is_file():
        return _world_fields(source, split, limit)
    return _folder_fields(source, Path(masks) if masks is not None else source, limit)


def measure_source(source: os.PathLike | str, masks: os.PathLike | str | None = None, split: str = "train",
                   limit: int | None = None) -> list[FieldStats]:
    from tqdm import tqdm

    fields = source_fields(source, masks, split, limit)
    return [field_stats(image, cells, image_id)
            for image_id, image, cells in tqdm(fields, desc=f"measuring {Path(source).name}", leave=False)]


# --------------------------------------------------------------------------- comparison

@dataclass
class MeasureRow:
    measure: str
    reference: tuple[float, float, float]  # median, min, max over the reference images
    other: tuple[float, float, float]
    verdict: str  # "within" the reference range, or the other source's median is "higher" / "lower"


def _summary(values: list[float]) -> tuple[float, float, float]:
    return float(np.median(values)), float(np.min(values)), float(np.max(values))


def compare(reference: list[FieldStats], other: list[FieldStats]) -> list[MeasureRow]:
    """Every measure of two sources: median and range of each, and where ``other``'s median lies."""
    if not reference or not other:
        raise ValueError("compare needs at least one image on each side")
    rows = []
    for name in reference[0].values():
        ref = _summary([s.values()[name] for s in reference])
        oth = _summary([s.values()[name] for s in other])
        verdict = "higher" if oth[0] > ref[2] else "lower" if oth[0] < ref[1] else "within"
        rows.append(MeasureRow(name, ref, oth, verdict))
    return rows


def format_comparison(rows: list[MeasureRow], names: tuple[str, str] = ("real", "synthetic")) -> str:
    head = f"{'measure':<18} {names[0] + ' median [range]':>28} {names[1] + ' median [range]':>28}  verdict"
    lines = [head]
    for r in rows:
        cells = [f"{m:.3g} [{lo:.3g}, {hi:.3g}]" for m, lo, hi in (r.reference, r.other)]
        lines.append(f"{r.measure:<18} {cells[0]:>28} {cells[1]:>28}  {r.verdict}")
    return "\n".join(lines)


def comparison_json(rows: list[MeasureRow], reference: list[FieldStats], other: list[FieldStats]) -> str:
    return json.dumps({"measures": [asdict(r) for r in rows],
                       "reference_images": [s.image_id for s in reference],
                       "other_images": [s.image_id for s in other]})


def plot_comparison(reference: list[FieldStats], other: list[FieldStats], path: os.PathLike | str,
                    names: tuple[str, str] = ("real", "synthetic")) -> Path:
    """One panel per geometric measure (each image a dot) and a log-scale histogram per channel."""
    from matplotlib.figure import Figure

    from ..report import save_figure

    fig = Figure(figsize=(14, 7), layout="constrained")
    axes = fig.subplots(3, 4).ravel()
    colours = ("tab:blue", "tab:orange")
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, GEOMETRY):
        for x, (stats, colour) in enumerate(zip((reference, other), colours)):
            values = [getattr(s, name) for s in stats]
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=colour, alpha=0.7)
            ax.hlines(np.median(values), x - 0.25, x + 0.25, color="k")
        ax.set_xticks([0, 1], names)
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(name, fontsize=9)
    centres = (np.arange(HIST_BINS) + 0.5) / HIST_BINS
    for ax, channel in zip(axes[len(GEOMETRY):], CHANNELS):
        for stats, colour, label in zip((reference, other), colours, names):
            mean = np.mean([s.hist[channel] for s in stats], axis=0)
            ax.semilogy(centres, np.maximum(mean, 1e-7), color=colour, label=label)
        ax.set_title(f"{channel} values (fraction of pixels)", fontsize=9)
        ax.set_xlim(0, 1)
    axes[len(GEOMETRY)].legend(fontsize=8)
    for ax in axes[len(GEOMETRY) + len(CHANNELS):]:
        ax.axis("off")
    fig.suptitle(f"{names[0]}: {len(reference)} images, {names[1]}: {len(other)} images", fontsize=10)
    return save_figure(fig, path)
