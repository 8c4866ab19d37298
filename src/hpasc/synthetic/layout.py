"""Cell geometry of a synthetic field of view: touching cells of varied size and shape, one nucleus each.

Each cell is a star-shaped blob (an ellipse whose radius is modulated by a few low harmonics) around
its nucleus, another such blob. Cells compete for pixels by their normalised radial distance
``rho / r(theta)`` (a multiplicatively weighted Voronoi diagram), so neighbours touch along curved
borders, big cells push small ones, and free edges stay rounded; a smooth noise field roughens the free
edges. Nucleus pixels always belong to their own cell, so every nucleus sits inside its cell. Seeds are
placed by dart throwing with a minimum spacing; cells near the edge are cut by the image border.
Everything scales with the image side, so a 3072 px image shows the same field as a 512 px one.

Cell sizes and outlines follow the real HPA samples (``hpasc realism ../shared/hpa/sample WORLD``): the
spread of the radii and the outline harmonics give a cell-area CV of about 0.64 and a median solidity of
about 0.91, where the four samples show 0.61 (0.49-0.77) and 0.91 (0.885-0.95); the earlier 0.43 and 0.96
made cells more alike and more convex than real ones. Radii are normalised so that their area is the
drawn confluence whatever the spread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numba
import numpy as np

from .draw import smooth_noise

SIZE_SIGMA, SIZE_CLIP = 0.32, (0.5, 2.0)  # cell radii: lognormal spread and clip (x the mean radius)
HARMONIC_SD = 0.17  # outline harmonics (orders 2-4): amplitude spread


@dataclass
class CellGeom:
    """One cell's shape parameters (image coordinates) and its box of interest."""

    cy: float  # nucleus centre
    cx: float
    radius: float  # cell radius (px, before shape modulation)
    nuc_radius: float
    angle: float  # orientation of the long axis (rad)
    mitotic: bool
    box: tuple[slice, slice] = (slice(0, 0), slice(0, 0))
    s_nuc: np.ndarray | None = None  # nucleus score on the box: < 1 inside, 1 on the rim, grows outward


@dataclass
class Layout:
    """Label maps (int32, 0 = background, cells 1..n; nucleus i belongs to cell i) and cell geometry."""

    cells: np.ndarray
    nuclei: np.ndarray
    geoms: list[CellGeom]
    mean_radius: float


@numba.njit(cache=True, nogil=True)
def _shape_score_kernel(dy, dx, a, b, cos_t, sin_t, orders, amp_cos, amp_sin, out):
    n_harm = orders.shape[0]
    for i in range(dy.shape[0]):
        for j in range(dx.shape[0]):
            u = (dx[j] * cos_t + dy[i] * sin_t) / a
            v = (dy[i] * cos_t - dx[j] * sin_t) / b
            rho = math.sqrt(u * u + v * v)
            r = 1.0
            if n_harm > 0 and rho > 0.0:
                # cos(k theta + phase) from the rotation recurrence of (cos k theta, sin k theta)
                c1, s1 = u / rho, v / rho
                ck, sk, k = c1, s1, 1
                for m in range(n_harm):
                    while k < orders[m]:
                        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
                        k += 1
                    r += amp_cos[m] * ck - amp_sin[m] * sk
            out[i, j] = rho / max(r, 0.3)


def _shape_score(dy: np.ndarray, dx: np.ndarray, a: float, b: float, angle: float,
                 harmonics: np.ndarray) -> np.ndarray:
    """rho / r(theta) of a rotated ellipse with semi-axes (a, b) and radial harmonics; 1 on the outline.

    ``dy`` / ``dx`` are the row / column offsets from the centre (1-D). ``harmonics`` rows are (order,
    amplitude, phase). Homogeneous of degree 1 in the distance, so the outline along any ray lies at
    1 / score(unit step). One fused numba loop without temporaries or trigonometry per pixel.
    """
    dy = np.ascontiguousarray(np.ravel(dy), dtype=np.float64)
    dx = np.ascontiguousarray(np.ravel(dx), dtype=np.float64)
    harm = np.asarray(harmonics, np.float64).reshape(-1, 3)
    harm = harm[np.argsort(harm[:, 0], kind="stable")]
    out = np.empty((len(dy), len(dx)), np.float32)
    _shape_score_kernel(dy, dx, float(a), float(b), math.cos(angle), math.sin(angle),
                        harm[:, 0].astype(np.int64), harm[:, 1] * np.cos(harm[:, 2]),
                        harm[:, 1] * np.sin(harm[:, 2]), out)
    return out


def _place_seeds(rng: np.random.Generator, size: int, radii: np.ndarray, spacing: float) -> np.ndarray:
    """Dart throwing: (y, x) centres at least ``spacing * (r_i + r_j)`` apart; may place fewer."""
    placed: list[np.ndarray] = []
    placed_r: list[float] = []
    lo, hi = 0.03 * size, 0.97 * size
    for r in radii:
        cand = rng.uniform(lo, hi, size=(48, 2))
        if placed:
            pts = np.asarray(placed)
            d = np.sqrt(((cand[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
            ok = (d >= spacing * (r + np.asarray(placed_r))[None, :]).all(axis=1)
            if not ok.any():
                continue
            cand = cand[ok]
        placed.append(cand[0])
        placed_r.append(float(r))
    return np.asarray(placed, dtype=np.float64).reshape(-1, 2)


def make_layout(rng: np.random.Generator, size: int, n_cells: int, n_mitotic: int = 0) -> Layout:
    """A ``size`` x ``size`` field of about ``n_cells`` cells, the first ``n_mitotic`` of them dividing."""
    confluence = rng.uniform(0.55, 0.95)
    mean_r = size * math.sqrt(confluence / (math.pi * n_cells))
    spread = np.clip(rng.lognormal(0.0, SIZE_SIGMA, n_cells), *SIZE_CLIP)
    radii = mean_r * spread / np.sqrt(np.mean(spread ** 2))  # the cells' area stays the confluence's
    mitotic = np.zeros(n_cells, bool)
    mitotic[:n_mitotic] = True
    radii[mitotic] *= 0.75  # dividing cells round up and shrink
    # dividing cells first (they must be placed), then big before small (easier packing)
    order = np.concatenate([np.flatnonzero(mitotic), np.flatnonzero(~mitotic)[np.argsort(-radii[~mitotic])]])
    radii, mitotic = radii[order], mitotic[order]
    centres = _place_seeds(rng, size, radii, spacing=0.8)
    radii, mitotic = radii[: len(centres)], mitotic[: len(centres)]

    warp = smooth_noise(rng, (size, size), 0.3 * mean_r) * 0.08
    warp += smooth_noise(rng, (size, size), 0.1 * mean_r) * 0.02
    best = np.full((size, size), 1.0, np.float32)
    labels = np.zeros((size, size), np.int32)
    geoms: list[CellGeom] = []
    for i, ((cy, cx), r, mit) in enumerate(zip(centres, radii, mitotic), start=1):
        angle = rng.uniform(0, math.pi)
        if mit:
            elong, cell_h, nuc_r = 1.0, np.zeros((0, 3)), 0.5 * r
            nuc_axes = (0.5 * r, 0.14 * r)  # metaphase plate
            nuc_h = np.zeros((0, 3))
            off = np.zeros(2)
        else:
            elong = rng.uniform(1.0, 1.9)
            cell_h = np.stack([np.arange(2, 5), rng.normal(0, HARMONIC_SD, 3), rng.uniform(0, 2 * math.pi, 3)], 1)
            nuc_r = r * rng.uniform(0.36, 0.47)
            ne = rng.uniform(1.0, 1.45)
            nuc_axes = (nuc_r * math.sqrt(ne), nuc_r / math.sqrt(ne))
            nuc_h = np.stack([np.arange(2, 4), rng.normal(0, 0.04, 2), rng.uniform(0, 2 * math.pi, 2)], 1)
            off = rng.normal(0, 0.08 * r, 2)
        half = int(math.ceil(1.9 * r))
        y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        box = (slice(y0, y1), slice(x0, x1))
        cell_score = _shape_score(dy - off[0], dx - off[1], r * math.sqrt(elong), r / math.sqrt(elong),
                                  angle, cell_h) * (1.0 + warp[box])
        s_nuc = _shape_score(dy, dx, *nuc_axes, angle + (math.pi / 2 if mit else rng.normal(0, 0.3)), nuc_h)
        score = np.where(s_nuc < 1.0, s_nuc - 2.0, cell_score)  # nucleus pixels always win
        win = score < best[box]
        best[box][win] = score[win]
        labels[box][win] = i
        geoms.append(CellGeom(float(cy), float(cx), float(r), float(nuc_r), float(angle), bool(mit), box,
                              s_nuc.astype(np.float32)))
    return _finish(labels, geoms, mean_r)


def _finish(labels: np.ndarray, geoms: list[CellGeom], mean_r: float) -> Layout:
    """Keep each cell's main connected piece, drop slivers, renumber 1..n, build the nucleus map."""
    cells = np.zeros_like(labels)
    nuclei = np.zeros_like(labels)
    kept: list[CellGeom] = []
    for i, g in enumerate(geoms, start=1):
        mask = (labels[g.box] == i).astype(np.uint8)
        n_cc, cc, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        if n_cc < 2:
            continue
        main = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[main, cv2.CC_STAT_AREA])
        nuc = (cc == main) & (g.s_nuc < 1.0)
        # a cell needs a visible nucleus and a reasonable share of its area (border cuts leave slivers)
        if area < 0.12 * math.pi * g.radius ** 2 or nuc.sum() < 0.15 * math.pi * g.nuc_radius ** 2:
            continue
        new = len(kept) + 1
        cells[g.box][cc == main] = new
        nuclei[g.box][nuc] = new
        kept.append(g)
    return Layout(cells, nuclei, kept, mean_r)
