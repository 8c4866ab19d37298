"""Speed of averaging submissions whose masks differ (cells matched by IoU) on real-sized images.

Two submissions of ``--images`` images (2048 px, ``--cells`` cells each); the second has every mask shifted
by 2 px, so no mask string is shared and every cell must be matched by IoU. Baseline measured in the same
run: decoding every mask of both files to a full-size array with pycocotools (``hpasc.rle.decode_mask``),
the least any pixel-level matching has to do. Also timed: two identical files (string matching only).

    python benchmarks/bench_blend.py [--images 10] [--cells 30]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hpasc.blend import blend_submissions
from hpasc.rle import decode_mask, encode_label_map

SIZE = 2048


def cell_map(n: int, shift: int) -> np.ndarray:
    """``n`` square cells on a grid, shifted right by ``shift`` px."""
    side = int(np.ceil(np.sqrt(n)))
    step = SIZE // side
    labels = np.zeros((SIZE, SIZE), np.int32)
    for k in range(n):
        y, x = (k // side) * step + 8, (k % side) * step + 8 + shift
        labels[y:y + step - 40, x:x + step - 40] = k + 1
    return labels


def write(path: Path, n_images: int, n_cells: int, shift: int, rng) -> Path:
    codes = encode_label_map(cell_map(n_cells, shift))
    rows = []
    for i in range(n_images):
        triples = [f"{c} {rng.uniform():.4f} {codes[cell]}" for cell in codes for c in rng.choice(19, 3, False)]
        rows.append((f"img{i:03d}", SIZE, SIZE, " ".join(triples)))
    pd.DataFrame(rows, columns=["ID", "ImageWidth", "ImageHeight", "PredictionString"]).to_csv(path, index=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--cells", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = write(tmp / "a.csv", args.images, args.cells, 0, rng)
        b = write(tmp / "b.csv", args.images, args.cells, 2, rng)
        t0 = time.perf_counter()
        for path in (a, b):
            for text in pd.read_csv(path).PredictionString:
                for mask in dict.fromkeys(text.split()[2::3]):
                    decode_mask(mask, SIZE, SIZE)
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        blend_submissions([a, a], tmp / "same.csv", progress=False)
        t_same = time.perf_counter() - t0
        t0 = time.perf_counter()
        blend_submissions([a, b], tmp / "shifted.csv", progress=False)
        t_shift = time.perf_counter() - t0
        out = pd.read_csv(tmp / "shifted.csv")
        n_cells = np.mean([len(set(s.split()[2::3])) for s in out.PredictionString])
    per = 1000.0 / args.images
    print(f"{args.images} images of {SIZE} px, {args.cells} cells, 3 classes per cell; "
          f"blended cells per image: {n_cells:.0f} (all matched: {n_cells == args.cells})")
    print(f"baseline, decode every mask of both files: {t_decode * per:.0f} ms / image")
    print(f"blend identical files:                     {t_same * per:.0f} ms / image "
          f"({t_decode / t_same:.1f}x faster than the baseline)")
    print(f"blend shifted masks (IoU matching):        {t_shift * per:.0f} ms / image "
          f"({t_decode / t_shift:.1f}x faster than the baseline)")


if __name__ == "__main__":
    main()
