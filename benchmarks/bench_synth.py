"""Synthetic world speed: generating one image in memory vs writing it and encoding its truth.

    python benchmarks/bench_synth.py [--sizes 256 512 1024 2048] [--images 4]

For each size: mean time of ``generate_image`` (layout + stains + noise), of writing its four PNGs
(``hpasc.io.write_image``, 8-bit) and of its truth string (RLE of every cell), all measured in this run;
prints the ratio generation / PNG writing (the disk format is the unavoidable part of ``synthesize``).
The issue asks for a 512 px image in well under a second.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from hpasc.io import write_image
from hpasc.synthetic import generate_image, sample_label_set, truth_string


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--images", type=int, default=4, help="images per size (different seeds)")
    args = parser.parse_args()
    warm = generate_image(0, 128, (0,))  # warm up imports, numba caches and the RLE encoder
    truth_string(warm.cells, warm.cell_labels)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            t_gen = t_png = t_rle = 0.0
            n_cells = 0
            for i in range(args.images):
                rng = np.random.default_rng([size, i])
                labels = sample_label_set(rng)
                t = time.perf_counter()
                img = generate_image(rng, size, labels)
                t_gen += time.perf_counter() - t
                t = time.perf_counter()
                write_image(Path(tmp), f"{size}_{i}", img.image, bits=8)
                t_png += time.perf_counter() - t
                t = time.perf_counter()
                truth_string(img.cells, img.cell_labels)
                t_rle += time.perf_counter() - t
                n_cells += len(img.cell_labels)
            k = args.images
            print(f"{size:5d} px  {n_cells / k:5.1f} cells  generate {t_gen / k * 1e3:8.1f} ms   "
                  f"write PNGs {t_png / k * 1e3:7.1f} ms   truth RLE {t_rle / k * 1e3:6.1f} ms   "
                  f"generate/write {t_gen / t_png:5.2f}")


if __name__ == "__main__":
    main()
