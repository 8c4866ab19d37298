"""One synthetic 4-channel image in memory: layout, per-cell weak labels, stains, optics and noise.

Weak labels as in the competition: the image's label set comes from the caller (drawn from the real
label table by ``synthesize``); every cell then carries a non-empty subset of it or is Negative (18),
and the image label is the union over its cells (Negative aside; all-negative images are ``(18,)``).
``heterogeneity`` in [0, 1] sets how often a cell drops image labels (up to 60 % per label) or is
Negative (up to 35 % of cells); at 0 every cell carries the whole set. Mitotic spindle (11) is only
ever carried by the few dividing cells of an image, as in real data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..labels import NEGATIVE, NUM_CLASSES
from .draw import sample_points, smooth_noise
from .layout import Layout, make_layout
from .patterns import PAINTERS, CellCtx, microtubules, nucleus_stain, reticulum

SPINDLE = 11
MIN_SIZE = 32  # below this a field holds too few cells of a visible size to be worth rendering


@dataclass
class SyntheticImage:
    image: np.ndarray  # H x W x 4 float32 in [0, 1], (red, green, blue, yellow)
    cells: np.ndarray  # int32 label map, 0 = background, cells 1..n
    nuclei: np.ndarray  # int32, nucleus i belongs to cell i
    cell_labels: list[tuple[int, ...]]  # per cell (index i-1 for cell i), sorted class ids
    mitotic: np.ndarray  # bool per cell

    @property
    def label(self) -> tuple[int, ...]:
        return image_label(self.cell_labels)


def as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def image_label(cell_labels: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Union of the cells' labels without Negative; ``(18,)`` when no cell carries a class."""
    union = sorted({c for labels in cell_labels for c in labels if c != NEGATIVE})
    return tuple(union) if union else (NEGATIVE,)


def assign_cell_labels(rng: np.random.Generator, image_labels, mitotic: np.ndarray,
                       heterogeneity: float = 0.5) -> list[tuple[int, ...]]:
    """Per-cell label sets whose union is ``image_labels`` (Negative and unplaceable 11 aside)."""
    if not 0.0 <= heterogeneity <= 1.0:
        raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")
    wanted = {int(c) for c in image_labels if int(c) != NEGATIVE}
    if any(not 0 <= c < NUM_CLASSES for c in wanted):
        raise ValueError(f"class ids must be in 0..{NUM_CLASSES - 1}, got {sorted(wanted)}")
    spindle = SPINDLE in wanted and bool(mitotic.any())
    others = sorted(wanted - {SPINDLE})
    p_negative, p_drop = 0.35 * heterogeneity, 0.6 * heterogeneity
    cells: list[set[int]] = []
    for mit in mitotic:
        keep = {c for c in others if rng.random() >= p_drop}
        if spindle and mit:
            cells.append(keep | {SPINDLE})
        elif not others or rng.random() < p_negative:
            cells.append(set())
        else:
            cells.append(keep or {others[int(rng.integers(len(others)))]})
    # every image label must show up somewhere: give a missing one to a random cell
    for c in others:
        if not any(c in s for s in cells):
            cells[int(rng.integers(len(cells)))].add(c)
    return [tuple(sorted(s)) if s else (NEGATIVE,) for s in cells]


def reticular_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A reticular net: thin ridges along the zero crossings of band-pass noise, with granules."""
    # band-pass noise is smooth at scale sigma: make it on a grid ~2 px per sigma, then upsample (big
    # blur kernels on the full frame would dominate the cost of large images)
    factor = max(1.0, sigma / 2.0)
    small = (max(4, math.ceil(shape[0] / factor)), max(4, math.ceil(shape[1] / factor)))
    white = rng.standard_normal(small, dtype=np.float32)
    s = sigma / factor
    band = cv2.GaussianBlur(white, (0, 0), s) - cv2.GaussianBlur(white, (0, 0), 2.0 * s)
    if factor > 1.0:
        band = cv2.resize(band, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    net = np.exp(-((band / (0.45 * float(band.std()) + 1e-12)) ** 2))
    return (net * (0.65 + 0.35 * np.clip(smooth_noise(rng, shape, sigma), -1, 1))).astype(np.float32)


def _edge_distance(cell: np.ndarray, box: tuple[slice, slice], size: int) -> np.ndarray:
    """Distance to the cell border; the image border does not count as border (the cell goes on)."""
    (ys, xs) = box
    pad = [(0 if ys.start == 0 else 1, 0 if ys.stop == size else 1),
           (0 if xs.start == 0 else 1, 0 if xs.stop == size else 1)]
    padded = np.pad(cell.astype(np.uint8), pad)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
    return dist[pad[0][0]: pad[0][0] + cell.shape[0], pad[1][0]: pad[1][0] + cell.shape[1]]


def _cell_ctx(rng, layout: Layout, idx: int, net: np.ndarray, size: int) -> CellCtx:
    g = layout.geoms[idx - 1]
    cell = layout.cells[g.box] == idx
    nucleus = layout.nuclei[g.box] == idx
    ctx = CellCtx(cell=cell, nucleus=nucleus, s_nuc=g.s_nuc, edge=_edge_distance(cell, g.box, size),
                  cy=g.cy - g.box[0].start, cx=g.cx - g.box[1].start, radius=g.radius,
                  nuc_radius=g.nuc_radius, angle=g.angle, mitotic=g.mitotic, reticulum=net[g.box])
    if not g.mitotic:
        k = int(rng.integers(1, 5))
        pts = sample_points(rng, nucleus & (g.s_nuc < 0.55), k)
        sig = rng.uniform(0.09, 0.16, len(pts)) * g.nuc_radius
        ctx.nucleoli = np.column_stack([pts, sig]).astype(np.float32)
    return ctx


def generate_image(rng_or_seed, size: int, labels, heterogeneity: float = 0.5) -> SyntheticImage:
    """A ``size`` px square image whose cells carry subsets of ``labels`` (see module doc)."""
    rng = as_rng(rng_or_seed)
    if int(size) < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    size = int(size)
    wanted = {int(c) for c in labels}
    n_cells = int(rng.integers(10, 33))
    n_mitotic = int(rng.integers(1, 3)) if SPINDLE in wanted else int(rng.binomial(n_cells, 0.02))
    layout = make_layout(rng, size, n_cells, n_mitotic)
    while not layout.geoms:  # every cell cut away (practically never): draw another field
        layout = make_layout(rng, size, n_cells, n_mitotic)
    mitotic = np.array([g.mitotic for g in layout.geoms], bool)
    cell_labels = assign_cell_labels(rng, wanted, mitotic, heterogeneity)

    net = reticular_field(rng, (size, size), max(0.7, 0.045 * layout.mean_radius))
    signal = np.zeros((size, size, 4), np.float32)
    levels = rng.lognormal(0.0, [0.3, 0.5, 0.25, 0.3], size=(len(layout.geoms), 4)).astype(np.float32)
    for idx, cell_lab in enumerate(cell_labels, start=1):
        ctx = _cell_ctx(rng, layout, idx, net, size)
        ctx.red = microtubules(ctx, rng)
        ctx.yellow = reticulum(ctx, rng)
        green = np.zeros(ctx.shape, np.float32)
        for c in cell_lab:
            if c != NEGATIVE:
                green += rng.uniform(0.55, 1.0) * PAINTERS[c](ctx, rng)
        box = layout.geoms[idx - 1].box
        for k, canvas in enumerate((ctx.red, green, nucleus_stain(ctx, rng), ctx.yellow)):
            signal[box[0], box[1], k] += canvas * ctx.cell * levels[idx - 1, k]
    image = _optics_and_noise(rng, signal, layout.mean_radius)
    return SyntheticImage(image, layout.cells, layout.nuclei, cell_labels, mitotic)


def _optics_and_noise(rng: np.random.Generator, signal: np.ndarray, mean_radius: float) -> np.ndarray:
    """Point-spread blur, per-image gain (sometimes faint staining), offset, shot and read noise."""
    h, w, _ = signal.shape
    gain = rng.uniform([0.25, 0.15, 0.3, 0.4], [0.7, 0.5, 0.6, 0.9])  # red, green, blue, yellow
    if rng.random() < 0.15:
        gain[1] = rng.uniform(0.04, 0.12)  # faint protein staining
    offset = rng.uniform(0.003, 0.03, 4)
    read = rng.uniform(0.003, 0.012)
    shot = rng.uniform(0.008, 0.025)
    psf = max(0.5, 0.012 * mean_radius)
    out = np.empty_like(signal)
    for k in range(4):
        chan = cv2.GaussianBlur(signal[..., k], (0, 0), psf) * np.float32(gain[k]) + np.float32(offset[k])
        noise = rng.standard_normal((h, w), dtype=np.float32)
        chan += noise * (np.float32(read) + np.float32(shot) * np.sqrt(chan))
        out[..., k] = np.clip(chan, 0.0, 1.0)
    return out


def make_image(rng_or_seed, size: int, labels, heterogeneity: float = 0.5
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """``(image H x W x 4 float32 [0, 1], cells int32 H x W, cell_labels)`` — no disk involved."""
    img = generate_image(rng_or_seed, size, labels, heterogeneity)
    return img.image, img.cells, img.cell_labels
