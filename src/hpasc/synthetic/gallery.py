"""A PNG contact sheet of the synthetic world: one example cell per class, green alone and composite."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..io import write_png_atomic
from ..labels import CLASS_NAMES, NUM_CLASSES
from .render import SyntheticImage, generate_image


def composite(image: np.ndarray) -> np.ndarray:
    """H x W x 4 (r, g, b, y) -> H x W x 3 RGB float in [0, 1], yellow shown as red + green (HPA style)."""
    rgb = np.stack([image[..., 0] + image[..., 3], image[..., 1] + 0.8 * image[..., 3], image[..., 2]], -1)
    top = float(np.percentile(rgb, 99.5)) or 1.0
    return np.clip(rgb / top, 0.0, 1.0)


def _largest_cell_with(img: SyntheticImage, class_id: int) -> int:
    areas = np.bincount(img.cells.ravel())
    ids = [i for i, labels in enumerate(img.cell_labels, start=1) if class_id in labels]
    return max(ids or range(1, len(areas)), key=lambda i: areas[i])


def _square_crop(image: np.ndarray, cells: np.ndarray, cell_id: int, tile: int) -> np.ndarray:
    ys, xs = np.nonzero(cells == cell_id)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + 2
    padded = np.pad(image, ((half, half), (half, half), (0, 0)))
    crop = padded[cy: cy + 2 * half, cx: cx + 2 * half]
    return cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_AREA)


def class_gallery(path: os.PathLike | str, size: int = 512, seed: int = 0, tile: int = 128,
                  columns: int = 4) -> Path:
    """Write the contact sheet to ``path`` (8-bit RGB PNG) and return it."""
    tiles = []
    for cid in range(NUM_CLASSES):
        img = generate_image(np.random.default_rng([seed, 99, cid]), size, (cid,), heterogeneity=0.0)
        crop = _square_crop(img.image, img.cells, _largest_cell_with(img, cid), tile)
        green = np.clip(crop[..., 1] / max(float(crop[..., 1].max()), 1e-6), 0, 1)
        pair = np.concatenate([np.repeat(green[..., None], 3, -1), composite(crop)], axis=1)
        pair = np.ascontiguousarray((pair * 255).astype(np.uint8)[..., ::-1])  # RGB -> BGR for OpenCV
        cv2.putText(pair, f"{cid} {CLASS_NAMES[cid][:22]}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                    (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(pair)
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[k: k + columns], axis=1) for k in range(0, len(tiles), columns)]
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    write_png_atomic(path, sheet)
    return path
