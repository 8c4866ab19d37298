"""Image reading cost: ``hpasc.io.read_image`` vs decoding the four PNGs alone (cv2.imread).

    python benchmarks/bench_io.py [--size 2048] [--repeat 5]

The issue asks that reading a 2048 px image cost little more than decoding its four PNGs. Measured on
a synthetic image written as 8-bit (train) and 16-bit (test) PNGs, and on a real 8-bit sample from
../shared/hpa/sample when present. Prints times and the ratio read_image / bare decode of this run.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hpasc.io import CHANNELS, read_image, write_image
from common import SHARED_SAMPLE, best_of



def compare(name: str, folder: Path, image_id: str, repeat: int) -> None:
    files = [str(folder / f"{image_id}_{c}.png") for c in CHANNELS]
    t_decode = best_of(lambda: [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files], repeat)
    t_read = best_of(lambda: read_image(folder, image_id), repeat)
    h, w, _ = read_image(folder, image_id).shape
    print(f"{name:28s} {h}x{w}  4 x cv2.imread {t_decode * 1e3:7.1f} ms   read_image {t_read * 1e3:7.1f} ms"
          f"   ratio {t_read / t_decode:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # smooth content compresses like microscopy (pure noise would make PNG decoding unrealistically slow)
    small = rng.random((args.size // 16, args.size // 16, 4), dtype=np.float32)
    image = cv2.resize(small, (args.size, args.size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    image = np.stack([image[..., k] for k in range(4)], -1)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 16):
            folder = Path(tmp) / f"b{bits}"
            write_image(folder, "x", image, bits=bits)
            compare(f"synthetic {bits}-bit PNG", folder, "x", args.repeat)
    if SHARED_SAMPLE.is_dir():
        compare("real sample 8-bit PNG", SHARED_SAMPLE, "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0", args.repeat)


if __name__ == "__main__":
    main()
