"""Drawing primitives of the synthetic world: smooth noise, Gaussian spots, filaments, random walks.

All draw into float32 canvases and are vectorised or delegated to OpenCV, so that a 512 px image with
a few dozen cells renders in a fraction of a second.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

_SHIFT = 4  # OpenCV sub-pixel bits for polylines: coordinates are multiplied by 2**_SHIFT


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field of unit std and correlation length ~``sigma`` px.

    Large sigmas are generated on a coarse grid and upsampled: cost stays ~ the output size.
    """
    h, w = shape
    factor = max(1.0, sigma / 2.0)
    gh, gw = max(2, math.ceil(h / factor) + 2), max(2, math.ceil(w / factor) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    grid = cv2.GaussianBlur(grid, (0, 0), sigmaX=max(0.5, sigma / factor), borderType=cv2.BORDER_REFLECT)
    if factor > 1.0:
        full = cv2.resize(grid, (round(gw * factor), round(gh * factor)), interpolation=cv2.INTER_LINEAR)
        field = full[:h, :w]
    else:
        field = grid[:h, :w]
    field = field - field.mean()
    std = float(field.std())
    return np.ascontiguousarray(field / std if std > 0 else field)


def add_spots(canvas: np.ndarray, ys, xs, sigmas, amps) -> np.ndarray:
    """Add isotropic Gaussian spots (peak ``amp``) at sub-pixel positions; returns ``canvas``."""
    h, w = canvas.shape
    ys, xs, sigmas, amps = np.broadcast_arrays(*(np.asarray(a, np.float32) for a in (ys, xs, sigmas, amps)))
    for y, x, s, a in zip(ys.ravel(), xs.ravel(), sigmas.ravel(), amps.ravel()):
        r = int(math.ceil(3.0 * s)) + 1
        y0, y1 = max(0, int(y) - r), min(h, int(y) + r + 1)
        x0, x1 = max(0, int(x) - r), min(w, int(x) + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        gy = np.exp(-0.5 * ((np.arange(y0, y1, dtype=np.float32) - y) / s) ** 2)
        gx = np.exp(-0.5 * ((np.arange(x0, x1, dtype=np.float32) - x) / s) ** 2)
        canvas[y0:y1, x0:x1] += a * gy[:, None] * gx[None, :]
    return canvas


def random_walks(rng: np.random.Generator, starts: np.ndarray, headings: np.ndarray, n_steps: int,
                 step: float, turn: float) -> np.ndarray:
    """``(n, n_steps + 1, 2)`` (y, x) paths: persistent walks whose heading diffuses by ``turn`` rad."""
    n = len(starts)
    dtheta = rng.normal(0.0, turn, size=(n, n_steps)).astype(np.float32)
    theta = headings[:, None] + np.cumsum(dtheta, axis=1)
    steps = np.stack([np.sin(theta), np.cos(theta)], axis=-1) * step
    paths = np.concatenate([np.zeros((n, 1, 2), np.float32), np.cumsum(steps, axis=1)], axis=1)
    return paths + np.asarray(starts, np.float32)[:, None, :]


def draw_paths(canvas: np.ndarray, paths: np.ndarray, amp: float = 1.0, thickness: int = 1) -> np.ndarray:
    """Draw (y, x) polylines anti-aliased into ``canvas`` (max-combined with what is there)."""
    if len(paths) == 0:
        return canvas
    pts = list(np.rint(np.asarray(paths, np.float32)[..., ::-1] * (1 << _SHIFT)).astype(np.int32))
    layer = np.zeros_like(canvas)
    cv2.polylines(layer, pts, isClosed=False, color=float(amp), thickness=int(thickness),
                  lineType=cv2.LINE_AA, shift=_SHIFT)
    np.maximum(canvas, layer, out=canvas)
    return canvas


def sample_points(rng: np.random.Generator, mask: np.ndarray, k: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """``(k, 2)`` (y, x) random sub-pixel points inside ``mask`` (optionally weighted); empty if none."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0 or k <= 0:
        return np.zeros((0, 2), np.float32)
    p = None
    if weights is not None:
        wts = weights.ravel()[idx].astype(np.float64)
        p = wts / wts.sum() if wts.sum() > 0 else None
    pick = idx[rng.choice(len(idx), size=k, p=p)]
    ys, xs = np.divmod(pick, mask.shape[1])
    jitter = rng.uniform(-0.5, 0.5, size=(k, 2))
    return (np.stack([ys, xs], axis=1) + jitter).astype(np.float32)


def blur(canvas: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (no-op below 0.3 px)."""
    if sigma < 0.3:
        return canvas
    return cv2.GaussianBlur(canvas, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)


def normalise(canvas: np.ndarray) -> np.ndarray:
    """Scale so that the maximum is 1 (all-zero canvases stay zero)."""
    top = float(canvas.max()) if canvas.size else 0.0
    return canvas / top if top > 0 else canvas
