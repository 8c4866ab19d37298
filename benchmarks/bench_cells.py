"""Crop extraction and cell-table speed against reading the image and a naive crop loop.

    python benchmarks/bench_cells.py [--size 128] [--repeat 3]

For the real sample images in ../shared/hpa/sample (2048 px, hpacellseg masks) and a synthetic 2048 px
image with 50 cells, prints in this run: the time to read the image's four PNGs, ``extract_crops`` per
neighbour mode, a straightforward baseline (boolean masks and float resizes at full resolution), and
``cell_table``; ratios are against the read time and the baseline. The issue asks for well under 0.2 s
for 2048 px with 50 cells.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hpasc.cells import NEIGHBOUR_MODES, cell_boxes, cell_table, extract_crops, padded_window
from hpasc.io import read_image, write_image
from common import SHARED_SAMPLE, best_of



def naive_crops(image: np.ndarray, labels: np.ndarray, size: int, padding: float) -> np.ndarray:
    """The obvious version: per cell a float copy, a full-resolution boolean mask, a float resize."""
    out = np.zeros((int(labels.max()), size, size, 4), np.uint8)
    h, w = labels.shape
    for k, box in enumerate(cell_boxes(labels)):
        y0, x0, y1, x1 = padded_window(box, padding, h, w)
        region = image[y0:y1, x0:x1].copy()
        lab = labels[y0:y1, x0:x1]
        region[(lab != 0) & (lab != k + 1)] = 0
        f = size / max(region.shape[:2])
        nh, nw = max(1, round(region.shape[0] * f)), max(1, round(region.shape[1] * f))
        small = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_AREA)
        oy, ox = (size - nh) // 2, (size - nw) // 2
        out[k, oy:oy + nh, ox:ox + nw] = np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def synthetic_case(tmp: Path, size: int = 2048, n_cells: int = 50, seed: int = 0) -> tuple[Path, str, np.ndarray]:
    """Voronoi cells with random textures, written as 8-bit PNGs so reading is timed like real data."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[0:size:4, 0:size:4]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    labels = (np.argmin(d, axis=-1) + 1).astype(np.int32)
    labels[np.min(d, axis=-1) > (size / np.sqrt(n_cells) * 0.7) ** 2] = 0
    labels = np.repeat(np.repeat(labels, 4, 0), 4, 1)[:size, :size]
    image = rng.random((size, size, 4), dtype=np.float32) * (labels > 0)[..., None]
    write_image(tmp, "synthetic", image)
    return tmp, "synthetic", labels


def run_case(name: str, folder: Path, image_id: str, labels: np.ndarray, size: int, repeat: int) -> None:
    t_read = best_of(lambda: read_image(folder, image_id), repeat)
    image = read_image(folder, image_id)
    n = int(labels.max())
    nuclei = np.zeros_like(labels)
    extract_crops(image, labels, size)  # compile outside the timing
    cell_table(image_id, image, labels, nuclei)
    print(f"{name}: {labels.shape[1]}x{labels.shape[0]}, {n} cells, crop {size} px")
    print(f"  read 4 PNGs             {t_read * 1e3:7.1f} ms")
    t_naive = best_of(lambda: naive_crops(image, labels, size, 0.05), repeat)
    for mode in NEIGHBOUR_MODES:
        t = best_of(lambda: extract_crops(image, labels, size, 0.05, mode), repeat)
        print(f"  extract_crops {mode:<5}     {t * 1e3:7.1f} ms   {t / t_read:5.2f}x read"
              + (f"   naive {t_naive * 1e3:6.1f} ms -> {t_naive / t:4.1f}x faster" if mode == "zero" else ""))
    t_table = best_of(lambda: cell_table(image_id, image, labels, nuclei), repeat)
    print(f"  cell_table              {t_table * 1e3:7.1f} ms   {t_table / t_read:5.2f}x read")


def montage(image: np.ndarray, labels: np.ndarray, size: int, path: Path, per_mode: int = 8) -> None:
    """PNG: one row of crops per neighbour mode (red+yellow as red, green, blue), for a visual check."""
    rows = []
    for mode in NEIGHBOUR_MODES:
        crops = extract_crops(image, labels, size, 0.05, mode)[:per_mode]
        rgb = np.stack([np.maximum(crops[..., 0], crops[..., 3]), crops[..., 1], crops[..., 2]], axis=-1)
        rows.append(np.concatenate(list(rgb), axis=1))
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(str(path), np.ascontiguousarray(grid[..., ::-1]))
    print(f"  montage ({', '.join(NEIGHBOUR_MODES)} by row) -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plot", type=Path, help="write a PNG montage of real-sample crops per neighbour mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, image_id, labels = synthetic_case(Path(tmp))
        run_case("synthetic", folder, image_id, labels, args.size, args.repeat)
    if SHARED_SAMPLE.is_dir():
        for mask in sorted(SHARED_SAMPLE.glob("*_cellmask.png")):
            image_id = mask.name[: -len("_cellmask.png")]
            labels = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED).astype(np.int32)
            run_case(f"real {image_id[:8]}", SHARED_SAMPLE, image_id, labels, args.size, args.repeat)
            if args.plot is not None:
                montage(read_image(SHARED_SAMPLE, image_id), labels, args.size, args.plot)
                args.plot = None  # one montage is enough
    else:
        print(f"(real samples not found at {SHARED_SAMPLE})")


if __name__ == "__main__":
    main()
