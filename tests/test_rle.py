"""Mask codec: hand-computed counts strings, byte identity with pycocotools, round trips, bad input."""
from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from hpasc.rle import (
    MaskDecodeError,
    counts_bytes,
    decode_label_map,
    decode_mask,
    encode_label_map,
    encode_mask,
    mask_runs,
)


def _column(bits: list[int]) -> np.ndarray:
    """A W=1 mask, so the column-major order is just the list order."""
    return np.array(bits, dtype=bool)[:, None]


def _blobs(size: int, n: int, seed: int) -> np.ndarray:
    """A label map of n rectangles, later ones painted over earlier ones (ragged, touching cells)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, size, 2)
        hh, ww = rng.integers(1, size // 3 + 2, 2)
        labels[y : y + hh, x : x + ww] = i
    return labels


def test_hand_computed_counts_strings():
    # runs [1 bg, 3 fg] -> "1" "3"
    assert counts_bytes(encode_mask(np.array([[0, 1], [1, 1]], bool))) == b"13"
    # runs [2, 1, 1, 5]: from the fourth run on the value minus the run two before is stored (5 - 1 = 4)
    assert counts_bytes(encode_mask(_column([0, 0, 1, 0, 1, 1, 1, 1, 1]))) == b"2114"
    # runs [0, 40, 1, 2]: 40 -> two groups "X1"; 2 - 40 = -38 -> "jN" (sign bit in the last group)
    bits = [1] * 40 + [0] + [1] * 2
    assert counts_bytes(encode_mask(_column(bits))) == b"0X11jN"
    assert counts_bytes(encode_label_map(_column(bits).astype(np.int32))[1]) == b"0X11jN"


def test_mask_runs_known_intervals():
    enc = encode_mask(_column([0, 1, 1, 0, 0, 1, 0]))
    starts, ends = mask_runs(enc, 7, 1)
    assert starts.tolist() == [1, 5] and ends.tolist() == [3, 6]
    # column-major: pixel (y, x) is flat index x * H + y
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = mask[2, 2] = mask[0, 3] = True
    starts, ends = mask_runs(encode_mask(mask), 3, 4)
    assert starts.tolist() == [7] and ends.tolist() == [10]


@pytest.mark.parametrize("seed", range(40))
def test_label_map_byte_identical_to_pycocotools(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 14, 2))
    labels = rng.integers(0, 5, (h, w)).astype(np.int32)
    if seed % 4 == 0:
        labels[:] = 3  # one cell covering the image
    if seed % 4 == 1:
        labels[:, -1] = 2  # a cell running to the last pixel
    enc = encode_label_map(labels)
    present = sorted(int(i) for i in np.unique(labels) if i > 0)
    assert list(enc) == present
    for i in present:
        assert enc[i] == encode_mask(labels == i)
        assert np.array_equal(decode_mask(enc[i], h, w), labels == i)


def test_label_map_blobs_match_pycocotools_and_round_trip():
    labels = _blobs(256, 30, seed=3)
    enc = encode_label_map(labels)
    for i, s in enc.items():
        ref = coco_mask.encode(np.asfortranarray((labels == i).astype(np.uint8)))["counts"]
        assert s == base64.b64encode(zlib.compress(ref, 9)).decode()
    assert np.array_equal(decode_label_map(enc, 256, 256), labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint32])
def test_label_map_dtypes(dtype):
    labels = np.array([[0, 1, 1], [2, 2, 0]], dtype=dtype)
    assert encode_label_map(labels) == {1: encode_mask(labels == 1), 2: encode_mask(labels == 2)}


def test_label_map_edge_cases():
    sparse = np.array([[0, 5_000_000], [2**31 - 1, 5_000_000]], np.int64)
    assert encode_label_map(sparse) == {i: encode_mask(sparse == i) for i in (5_000_000, 2**31 - 1)}
    no_background = np.array([[2_000_000, 3_000_000]], np.int32)
    assert list(encode_label_map(no_background)) == [2_000_000, 3_000_000]
    assert encode_label_map(np.zeros((5, 5), np.int32)) == {}
    assert encode_label_map(np.zeros((0, 5), np.int32)) == {}
    full = encode_label_map(np.full((4, 3), 7, np.uint16))
    assert list(full) == [7] and counts_bytes(full[7]) == b"0<"  # runs [0, 12]: 12 -> chr(60)


def test_label_map_views_and_fortran_order():
    """Maps come transposed, strided or Fortran-ordered (decode_mask's output order): same bytes."""
    labels = _blobs(40, 7, seed=8)
    for view in (labels.T, labels[::2, 1::3], np.asfortranarray(labels), labels[5:30, 3:37]):
        assert encode_label_map(view) == {int(i): encode_mask(view == i) for i in np.unique(view) if i > 0}


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2, 2), np.int32), np.zeros((3, 3), np.float32), np.array([[0, -1]], np.int64)]
)
def test_label_map_bad_input(bad):
    with pytest.raises(ValueError):
        encode_label_map(bad)


def test_decode_mask_is_pycocotools_compatible():
    labels = _blobs(64, 6, seed=5)
    for i in range(1, 7):
        mask = labels == i
        rle = {"size": [64, 64], "counts": counts_bytes(encode_mask(mask))}
        assert np.array_equal(decode_mask(encode_mask(mask), 64, 64), coco_mask.decode(rle).astype(bool))


def test_empty_and_full_masks_round_trip():
    for mask in (np.zeros((6, 5), bool), np.ones((6, 5), bool)):
        enc = encode_mask(mask)
        assert np.array_equal(decode_mask(enc, 6, 5), mask)
    assert mask_runs(encode_mask(np.zeros((6, 5), bool)), 6, 5)[0].size == 0


def test_decode_label_map_sequence_and_overlap():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    out = decode_label_map([encode_mask(a), encode_mask(b)], 4, 4)
    assert out.dtype == np.int32 and out.flags.c_contiguous
    assert out[:, 0].tolist() == [1, 2, 2, 0]  # the later mask wins the overlap
    with pytest.raises(ValueError, match="positive"):
        decode_label_map({0: encode_mask(a)}, 4, 4)


def _pack(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts)).decode()


@pytest.mark.parametrize(
    "encoded, message",
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"plain, not zlib").decode(), "base64 zlib"),
        (_pack(b"1X"), "end in the middle"),  # 'X' says more groups follow
        (_pack(b"1 3"), "outside"),
        (_pack(b"13"), "covers 4 pixels, not height 3 x width 3"),
        (_pack(b"0" * 3 + b"jN"), "negative"),
        (_pack(b"o" * 13), "too long"),
    ],
)
def test_decode_errors(encoded, message):
    with pytest.raises(MaskDecodeError, match=message):
        mask_runs(encoded, 3, 3)
    with pytest.raises(MaskDecodeError):
        decode_mask(encoded, 3, 3)


def test_decode_at_wrong_size_fails():
    enc = encode_mask(np.ones((8, 8), bool))
    with pytest.raises(MaskDecodeError, match="height 7 x width 8"):
        decode_mask(enc, 7, 8)


@pytest.mark.real_data
def test_real_cellmask_byte_identical(real_hpa):
    import cv2

    path = next((real_hpa / "sample").glob("*_cellmask.png"))
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    enc = encode_label_map(labels)
    ids = [int(i) for i in np.unique(labels) if i > 0]
    assert list(enc) == ids
    for i in ids[:8]:
        assert enc[i] == encode_mask(labels == i)
    assert np.array_equal(decode_label_map(enc, *labels.shape), labels.astype(np.int32))
