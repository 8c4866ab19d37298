"""Per-cell staining patterns: one painter per class for the green (protein) channel, plus the
reference stains (red microtubules, yellow ER, blue nucleus).

A painter takes a ``CellCtx`` (the cell's box, masks and geometry) and a random generator and returns a
float32 canvas of the box with a maximum near 1; the renderer masks it to the cell, weights and sums
the painters of the cell's labels (patterns mix), and scales by the cell's expression level. Feature
sizes are fractions of the cell / nucleus radius, so patterns look the same at any image size.
``PAINTERS[class_id]`` is the registry; replacing a pattern is replacing one function.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .draw import (
    add_spots,
    blur,
    draw_paths,
    normalise,
    random_walks,
    sample_points,
    smooth_noise,
)


@dataclass
class CellCtx:
    """What a painter may look at; coordinates are (y, x) in the box."""

    cell: np.ndarray  # bool, the cell's pixels
    nucleus: np.ndarray  # bool
    s_nuc: np.ndarray  # float32 nucleus score: < 1 inside, 1 on the nuclear rim, grows outward
    edge: np.ndarray  # float32 distance (px) to the cell border, inside the cell
    cy: float  # nucleus centre
    cx: float
    radius: float
    nuc_radius: float
    angle: float
    mitotic: bool
    nucleoli: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # y, x, sigma
    reticulum: np.ndarray | None = None  # the image's ER texture on the box
    red: np.ndarray | None = None  # this cell's microtubule canvas (set by the renderer)
    yellow: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.cell.shape

    @property
    def cyto(self) -> np.ndarray:
        return self.cell & ~self.nucleus

    def rim_points(self, angles, factors) -> np.ndarray:
        """``(k, 2)`` (y, x) points at ``factors`` x the nuclear radius along ``angles``.

        The nucleus score is 1-homogeneous along a ray from the centre, so one probe inside the nucleus
        tells where the rim is.
        """
        angles, factors = np.broadcast_arrays(np.asarray(angles, np.float64), np.asarray(factors, np.float64))
        dy, dx = np.sin(angles), np.cos(angles)
        probe = 0.8 * self.nuc_radius
        h, w = self.shape
        ys = np.clip(np.rint(self.cy + probe * dy), 0, h - 1).astype(np.intp)
        xs = np.clip(np.rint(self.cx + probe * dx), 0, w - 1).astype(np.intp)
        dist = factors * probe / np.maximum(self.s_nuc[ys, xs], 1e-3)
        return np.stack([self.cy + dist * dy, self.cx + dist * dx], axis=-1).astype(np.float32)

    def rim_point(self, angle: float, factor: float) -> tuple[float, float]:
        y, x = self.rim_points(angle, factor)
        return float(y), float(x)


Painter = Callable[[CellCtx, np.random.Generator], np.ndarray]


def _soft_nucleus(ctx: CellCtx) -> np.ndarray:
    return np.clip((1.0 - ctx.s_nuc) / 0.1, 0.0, 1.0)


def _nucleoli_map(ctx: CellCtx) -> np.ndarray:
    canvas = np.zeros(ctx.shape, np.float32)
    n = ctx.nucleoli
    return add_spots(canvas, n[:, 0], n[:, 1], n[:, 2], 1.0) if len(n) else canvas


def _texture(ctx: CellCtx, rng: np.random.Generator, scale: float, depth: float) -> np.ndarray:
    """Multiplicative granular texture ``1 + depth * noise`` at ``scale`` x nuclear radius."""
    return 1.0 + depth * smooth_noise(rng, ctx.shape, max(0.6, scale * ctx.nuc_radius))


def _dots(ctx: CellCtx, rng, mask: np.ndarray, k: int, sigma: float, amp=(0.6, 1.0), weights=None):
    pts = sample_points(rng, mask, k, weights)
    canvas = np.zeros(ctx.shape, np.float32)
    return add_spots(canvas, pts[:, 0], pts[:, 1], max(0.7, sigma), rng.uniform(*amp, len(pts)))


# ----------------------------------------------------------------------------------- nuclear classes

def nucleoplasm(ctx, rng):
    return np.clip(_soft_nucleus(ctx) * _texture(ctx, rng, 0.08, 0.25) - 0.7 * _nucleoli_map(ctx), 0, None)


def nuclear_membrane(ctx, rng):
    ring = np.exp(-(((ctx.s_nuc - 0.97) / 0.06) ** 2))
    return ring * _texture(ctx, rng, 0.1, 0.2)


def nucleoli(ctx, rng):
    return _nucleoli_map(ctx) * _texture(ctx, rng, 0.05, 0.15)


def fibrillar_center(ctx, rng):
    canvas = 0.15 * _nucleoli_map(ctx)
    for y, x, s in ctx.nucleoli:
        k = int(rng.integers(2, 6))
        spread = rng.normal(0.0, 0.5 * s, size=(k, 2))
        add_spots(canvas, y + spread[:, 0], x + spread[:, 1], max(0.6, 0.22 * s), rng.uniform(0.7, 1.0, k))
    return canvas


def nuclear_speckles(ctx, rng):
    inner = ctx.s_nuc < 0.85
    k = int(rng.integers(15, 35))
    canvas = _dots(ctx, rng, inner, k, 0.07 * ctx.nuc_radius, (0.5, 1.0))
    canvas = blur(canvas, 0.03 * ctx.nuc_radius)  # speckles are irregular, not crisp
    return normalise(canvas) + 0.12 * _soft_nucleus(ctx)


def nuclear_bodies(ctx, rng):
    k = int(rng.integers(2, 7))
    return _dots(ctx, rng, ctx.s_nuc < 0.8, k, 0.08 * ctx.nuc_radius, (0.7, 1.0))


# ------------------------------------------------------------------------------ cytoplasmic classes

def reticulum(ctx, rng):
    """ER (class 6 in green, and the yellow reference stain): a net densest around the nucleus."""
    net = ctx.reticulum if ctx.reticulum is not None else np.ones(ctx.shape, np.float32)
    envelope = np.exp(-0.9 * np.clip(ctx.s_nuc - 1.0, 0.0, None)) * np.clip(ctx.edge / 2.0, 0, 1)
    envelope = np.where(ctx.nucleus, 0.08, envelope)
    return (net * envelope).astype(np.float32)


def golgi(ctx, rng):
    side = rng.uniform(0, 2 * math.pi)
    cy, cx = ctx.rim_point(side, rng.uniform(1.1, 1.3))
    k = int(rng.integers(8, 18))
    tangent = np.array([math.cos(side), -math.sin(side)])  # (y, x) along the nuclear rim
    along = rng.normal(0, 0.4 * ctx.nuc_radius, k)
    radial = rng.normal(0, 0.12 * ctx.nuc_radius, k)
    ys = cy + along * tangent[0] + radial * math.sin(side)
    xs = cx + along * tangent[1] + radial * math.cos(side)
    canvas = add_spots(np.zeros(ctx.shape, np.float32), ys, xs,
                       rng.uniform(0.08, 0.16, k) * ctx.nuc_radius, rng.uniform(0.5, 1.0, k))
    return normalise(canvas * (ctx.s_nuc > 0.95))


def intermediate_filaments(ctx, rng):
    """Long wavy fibres wrapping around the nucleus (a perinuclear cage), thicker than microtubules."""
    k = int(rng.integers(10, 20))
    angles = rng.uniform(0, 2 * math.pi, k)
    starts = ctx.rim_points(angles, rng.uniform(1.05, 1.6, k))
    headings = angles + np.where(rng.random(k) < 0.5, 0.5, -0.5) * math.pi + rng.normal(0, 0.3, k)
    paths = random_walks(rng, starts, headings.astype(np.float32), 30, 0.06 * ctx.radius, 0.13)
    canvas = np.zeros(ctx.shape, np.float32)
    draw_paths(canvas, paths, 1.0, thickness=max(1, round(0.025 * ctx.radius)))
    return blur(canvas, 0.012 * ctx.radius + 0.4) * (ctx.s_nuc > 1.0)


def actin_filaments(ctx, rng):
    """Straight parallel stress fibres across the cell plus a cortical rim."""
    direction = rng.uniform(0, math.pi)
    k = int(rng.integers(8, 16))
    dy, dx = math.sin(direction), math.cos(direction)
    offsets = rng.uniform(-ctx.radius, ctx.radius, k)
    half = 1.6 * ctx.radius
    theta = direction + rng.normal(0, 0.05, k)
    cy, cx = ctx.cy - offsets * dx, ctx.cx + offsets * dy  # shifted along the normal
    ends = np.stack([np.sin(theta), np.cos(theta)], 1) * half
    paths = np.stack([np.stack([cy, cx], 1) - ends, np.stack([cy, cx], 1) + ends], 1).astype(np.float32)
    canvas = np.zeros(ctx.shape, np.float32)
    draw_paths(canvas, paths, 1.0, thickness=1)
    cortex = 0.5 * np.exp(-ctx.edge / max(1.0, 0.03 * ctx.radius))
    return blur(canvas, 0.4) + cortex


def microtubules(ctx, rng):
    """Curved filaments radiating from the nucleus to the cell border (class 10 and the red stain)."""
    if ctx.mitotic:
        return mitotic_spindle(ctx, rng)
    k = int(rng.integers(45, 90))
    angles = rng.uniform(0, 2 * math.pi, k)
    starts = ctx.rim_points(angles, rng.uniform(0.95, 1.15, k))
    headings = (angles + rng.normal(0, 0.5, k)).astype(np.float32)
    paths = random_walks(rng, starts, headings, 32, 0.05 * ctx.radius, 0.2)
    canvas = np.zeros(ctx.shape, np.float32)
    for group, amp in zip(np.array_split(paths, 3), (1.0, 0.7, 0.45)):  # filaments differ in brightness
        draw_paths(canvas, group, amp, thickness=1)
    return blur(canvas, 0.4) + 0.1 * (ctx.s_nuc > 1.0)


def mitotic_spindle(ctx, rng):
    """Bipolar spindle of a dividing cell: fibres from two poles to the chromosome plate, plus asters."""
    canvas = np.zeros(ctx.shape, np.float32)
    axis = ctx.angle  # the plate lies across this axis
    ay, ax = math.sin(axis), math.cos(axis)
    plate_y, plate_x = -ax, ay  # direction along the plate
    poles = [(ctx.cy + sgn * 0.5 * ctx.radius * ay, ctx.cx + sgn * 0.5 * ctx.radius * ax) for sgn in (-1, 1)]
    for py, px in poles:
        k = 18
        t = rng.uniform(-0.45, 0.45, k) * ctx.radius
        ends = np.stack([ctx.cy + t * plate_y, ctx.cx + t * plate_x], 1)
        fibres = np.stack([np.broadcast_to([py, px], ends.shape), ends], 1).astype(np.float32)
        draw_paths(canvas, fibres, 0.9, thickness=1)
        rays = rng.uniform(0, 2 * math.pi, 10)
        tips = np.stack([py + 0.3 * ctx.radius * np.sin(rays), px + 0.3 * ctx.radius * np.cos(rays)], 1)
        draw_paths(canvas, np.stack([np.broadcast_to([py, px], tips.shape), tips], 1).astype(np.float32),
                   0.5, thickness=1)
        add_spots(canvas, py, px, max(0.8, 0.04 * ctx.radius), 1.0)
    return blur(canvas, 0.5)


def centrosome(ctx, rng):
    cy, cx = ctx.rim_point(rng.uniform(0, 2 * math.pi), rng.uniform(1.12, 1.35))
    sigma = max(0.8, 0.07 * ctx.nuc_radius)
    canvas = add_spots(np.zeros(ctx.shape, np.float32), cy, cx, sigma, 1.0)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        add_spots(canvas, cy + 2.5 * sigma * math.sin(a), cx + 2.5 * sigma * math.cos(a), sigma, 0.9)
    return canvas


def plasma_membrane(ctx, rng):
    width = max(1.0, 0.035 * ctx.radius)
    return np.exp(-((ctx.edge / width) ** 2)) * _texture(ctx, rng, 0.1, 0.2) + 0.08 * ctx.cyto


def mitochondria(ctx, rng):
    """Many short tubules, denser near the nucleus."""
    k = int(rng.integers(40, 90))
    weights = np.exp(-0.8 * np.clip(ctx.s_nuc - 1.0, 0.0, None))
    starts = sample_points(rng, ctx.cyto, k, weights)
    paths = random_walks(rng, starts, rng.uniform(0, 2 * math.pi, len(starts)).astype(np.float32),
                         int(rng.integers(5, 9)), 0.03 * ctx.radius, 0.35)
    canvas = np.zeros(ctx.shape, np.float32)
    draw_paths(canvas, paths, 1.0, thickness=max(1, round(0.02 * ctx.radius)))
    return blur(canvas, 0.6 + 0.01 * ctx.radius)


def aggresome(ctx, rng):
    cy, cx = ctx.rim_point(rng.uniform(0, 2 * math.pi), rng.uniform(1.3, 1.5))
    sigma = rng.uniform(0.18, 0.28) * ctx.nuc_radius
    jitter = rng.normal(0, 0.4 * sigma, (3, 2))
    canvas = add_spots(np.zeros(ctx.shape, np.float32), cy + jitter[:, 0], cx + jitter[:, 1], sigma,
                       rng.uniform(0.6, 1.0, 3))
    return normalise(canvas) * (~ctx.nucleus)


def cytosol(ctx, rng):
    return ctx.cyto * np.clip(ctx.edge / 2.0, 0, 1) * _texture(ctx, rng, 0.06, 0.15) * 0.8


def vesicles(ctx, rng):
    k = int(rng.integers(40, 120))
    return _dots(ctx, rng, ctx.cyto, k, 0.022 * ctx.radius, (0.4, 1.0))


def er_green(ctx, rng):
    return normalise(ctx.yellow) if ctx.yellow is not None else reticulum(ctx, rng)


def microtubules_green(ctx, rng):
    return normalise(ctx.red) if ctx.red is not None else microtubules(ctx, rng)


def negative(ctx, rng):
    return np.zeros(ctx.shape, np.float32)


PAINTERS: dict[int, Painter] = {
    0: nucleoplasm, 1: nuclear_membrane, 2: nucleoli, 3: fibrillar_center, 4: nuclear_speckles,
    5: nuclear_bodies, 6: er_green, 7: golgi, 8: intermediate_filaments, 9: actin_filaments,
    10: microtubules_green, 11: mitotic_spindle, 12: centrosome, 13: plasma_membrane, 14: mitochondria,
    15: aggresome, 16: cytosol, 17: vesicles, 18: negative,
}


def nucleus_stain(ctx: CellCtx, rng: np.random.Generator) -> np.ndarray:
    """Blue (DAPI): textured chromatin, darker nucleoli; condensed and bright in dividing cells."""
    if ctx.mitotic:
        return _soft_nucleus(ctx) * _texture(ctx, rng, 0.15, 0.2) * 1.3
    return np.clip(_soft_nucleus(ctx) * _texture(ctx, rng, 0.12, 0.3) - 0.45 * _nucleoli_map(ctx), 0, None)
