"""The competition's mask codec (Open Images challenge format).

A binary mask -> Fortran-ordered uint8 ``H x W x 1`` -> pycocotools RLE ``counts`` -> zlib (level 9) ->
base64 -> ASCII. Decoding needs the image height and width. No torch here.
"""
from __future__ import annotations

import base64
import zlib

import numpy as np
from pycocotools import mask as coco_mask


def encode_mask(mask: np.ndarray) -> str:
    """H x W boolean mask -> the competition's base64 string (pycocotools reference path)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    fortran = np.asfortranarray(mask.astype(np.uint8)[:, :, None])
    counts = coco_mask.encode(fortran)[0]["counts"]
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def decode_mask(encoded: str, height: int, width: int) -> np.ndarray:
    """The competition's base64 string -> H x W boolean mask."""
    counts = zlib.decompress(base64.b64decode(encoded))
    rle = {"size": [int(height), int(width)], "counts": counts}
    return coco_mask.decode(rle).astype(bool)
