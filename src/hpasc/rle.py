"""The competition's mask codec (Open Images challenge format).

A binary mask -> Fortran-ordered uint8 ``H x W x 1`` -> pycocotools RLE ``counts`` -> zlib (level 9) ->
base64 -> ASCII. Decoding needs the image height and width. No torch here.

Two implementations live side by side:

* ``encode_mask`` is the pycocotools reference path (one full-size mask per call).
* ``encode_label_map`` encodes every cell of a label map at once with numba: one scan of the pixels in
  column-major order (cache-blocked) finds where the label changes; each cell's run lengths follow from those changes
  alone, so the cost no longer grows with (cells x pixels). The output is byte-identical to
  ``encode_mask(labels == i)``.

Decoding never builds a full-size mask unless asked to: ``mask_runs`` turns a string into the sorted
``[start, end)`` intervals of its foreground pixels in column-major flat order, which is all the scorer
and the validator need (areas and intersections are sums over intervals). ``decode_mask`` and
``decode_label_map`` paint those intervals. All decoders check the string strictly and raise
``MaskDecodeError`` instead of returning garbage.

The pycocotools ``counts`` string: run lengths alternate background/foreground starting with
background (the first may be 0). Each run length ``x`` (minus the length two places earlier, from the
fourth run on) is written as little-endian 5-bit groups, ``chr(48 + group)``, bit 0x20 meaning "more
groups follow" and bit 0x10 of the last group the sign.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Mapping, Sequence

import numba
import numpy as np
from pycocotools import mask as coco_mask


class MaskDecodeError(ValueError):
    """A mask string that is not valid base64/zlib/RLE or does not fit the given image size."""


def encode_mask(mask: np.ndarray) -> str:
    """H x W boolean mask -> the competition's base64 string (pycocotools reference path)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    fortran = np.asfortranarray(mask.astype(np.uint8)[:, :, None])
    counts = coco_mask.encode(fortran)[0]["counts"]
    return _pack(counts)


def _pack(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode("ascii")


# ---------------------------------------------------------------------------------------------------
# batch encoder


_BLOCK = 16  # columns scanned together: one 64-byte cache line of int32 per row


@numba.njit(cache=True, nogil=True)
def _label_runs(labels: np.ndarray):
    """Column-major runs of a 2-D label map -> (run starts, run labels), flat index ``x * h + y``.

    Reading a C-ordered map column by column would miss the cache on every pixel, so a block of
    adjacent columns is scanned row by row, each column keeping its own change list; the blocks'
    columns are then stitched in column-major order (merging a run that continues into the next
    column).
    """
    h, w = labels.shape
    starts = np.empty(h * w + 1, np.int64)  # untouched pages cost nothing; runs are few
    values = np.empty(h * w + 1, np.int64)
    col_pos = np.empty((_BLOCK, h), np.int64)
    col_val = np.empty((_BLOCK, h), np.int64)
    col_n = np.zeros(_BLOCK, np.int64)
    last = np.empty(_BLOCK, np.int64)
    n = 0
    prev = -1
    for x0 in range(0, w, _BLOCK):
        nb = min(_BLOCK, w - x0)
        for j in range(nb):
            v = np.int64(labels[0, x0 + j])
            col_pos[j, 0] = 0
            col_val[j, 0] = v
            col_n[j] = 1
            last[j] = v
        for y in range(1, h):
            for j in range(nb):
                v = np.int64(labels[y, x0 + j])
                if v != last[j]:
                    k = col_n[j]
                    col_pos[j, k] = y
                    col_val[j, k] = v
                    col_n[j] = k + 1
                    last[j] = v
        for j in range(nb):
            base = (x0 + j) * h
            for r in range(col_n[j]):
                v = col_val[j, r]
                if v != prev:
                    starts[n] = base + col_pos[j, r]
                    values[n] = v
                    n += 1
                    prev = v
    return starts[:n].copy(), values[:n].copy()


@numba.njit(cache=True, nogil=True)
def _write_count(buf: np.ndarray, pos: int, x: np.int64) -> int:
    """One (delta-coded) run length as pycocotools characters at ``buf[pos:]``; returns the new end."""
    more = True
    while more:
        c = x & 0x1F
        x >>= 5  # arithmetic shift: negative deltas end at -1
        if c & 0x10:
            more = x != -1
        else:
            more = x != 0
        if more:
            c |= 0x20
        buf[pos] = c + 48
        pos += 1
    return pos


@numba.njit(cache=True, nogil=True)
def _cell_count_strings(starts: np.ndarray, values: np.ndarray, total: int, max_label: int):
    """Runs of a label map -> every cell's pycocotools counts string, concatenated.

    Returns (cell ids present, byte offsets into the buffer, the buffer).
    """
    n_runs = starts.shape[0]
    n_fg = np.zeros(max_label + 1, np.int64)  # foreground runs per cell
    for j in range(n_runs):
        if values[j] > 0:
            n_fg[values[j]] += 1
    cells = np.flatnonzero(n_fg)
    slot = np.full(max_label + 1, -1, np.int64)
    for i in range(cells.shape[0]):
        slot[cells[i]] = i
    # every foreground run gives at most two counts (leading background + run) plus one trailing count
    first = np.zeros(cells.shape[0] + 1, np.int64)
    for i in range(cells.shape[0]):
        first[i + 1] = first[i] + 2 * n_fg[cells[i]] + 1
    counts = np.empty(first[-1], np.int64)
    n_counts = np.zeros(cells.shape[0], np.int64)
    last_end = np.zeros(cells.shape[0], np.int64)
    for j in range(n_runs):
        v = values[j]
        if v <= 0:
            continue
        i = slot[v]
        s = starts[j]
        e = starts[j + 1] if j + 1 < n_runs else total
        base = first[i] + n_counts[i]
        counts[base] = s - last_end[i]  # background before this run (0 only at the very start)
        counts[base + 1] = e - s
        n_counts[i] += 2
        last_end[i] = e
    buf = np.empty(first[-1] * 8, np.uint8)  # <= 7 characters per delta-coded count
    offsets = np.zeros(cells.shape[0] + 1, np.int64)
    pos = 0
    for i in range(cells.shape[0]):
        base = first[i]
        m = n_counts[i]
        if last_end[i] < total:  # trailing background
            counts[base + m] = total - last_end[i]
            m += 1
        for t in range(m):
            x = counts[base + t]
            if t > 2:
                x -= counts[base + t - 2]
            pos = _write_count(buf, pos, x)
        offsets[i + 1] = pos
    return cells, offsets, buf


def label_map_runs(label_map: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label map -> for each cell 1..max its foreground runs ``(starts, ends)`` in the codec's
    column-major order (the ``mask_runs`` form), from the same one-pass sweep as the encoder."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise ValueError(f"expected a 2-D integer label map, got {label_map.dtype} {label_map.shape}")
    n = int(label_map.max(initial=0))
    if label_map.size == 0 or n == 0:
        return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(n)]
    if label_map.dtype not in (np.int32, np.uint16, np.uint8):
        label_map = label_map.astype(np.int32)
    starts, values = _label_runs(label_map)
    ends = np.r_[starts[1:], label_map.size]
    keep = values > 0
    starts, ends, values = starts[keep], ends[keep], values[keep]
    order = np.argsort(values, kind="stable")  # runs stay sorted within each cell
    bounds = np.searchsorted(values[order], np.arange(1, n + 2))
    return [(starts[order[bounds[i]:bounds[i + 1]]], ends[order[bounds[i]:bounds[i + 1]]]) for i in range(n)]


def encode_label_map(label_map: np.ndarray) -> dict[int, str]:
    """Every cell id > 0 of a label map -> its competition encoding, ascending by id.

    Byte-identical to ``encode_mask(labels == i)`` for each id present; ids that do not occur are absent.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {label_map.shape}")
    if label_map.dtype.kind not in "iu":
        raise ValueError(f"expected an integer label map, got dtype {label_map.dtype}")
    if label_map.size == 0:
        return {}
    if label_map.dtype not in (np.int32, np.uint16, np.uint8):  # keep the numba specialisations few
        if label_map.min() < 0 or label_map.max() > np.iinfo(np.int32).max:
            raise ValueError("label map values must be in 0..2**31-1")
        label_map = label_map.astype(np.int32)
    starts, values = _label_runs(label_map)
    if values.min() < 0:
        raise ValueError(f"label map has negative ids (min {values.min()})")
    ids = None
    if values.max() > 1 << 20:  # huge sparse ids: compact them so the per-id tables stay small
        ids, values = np.unique(values, return_inverse=True)
        if ids[0] != 0:
            ids, values = np.r_[0, ids], values + 1
    cells, offsets, buf = _cell_count_strings(starts, values, label_map.size, int(values.max()))
    if ids is not None:
        cells = ids[cells]
    return {
        int(cid): _pack(buf[offsets[i] : offsets[i + 1]].tobytes()) for i, cid in enumerate(cells)
    }


# ---------------------------------------------------------------------------------------------------
# decoding

_ERRORS = {
    1: "RLE counts end in the middle of a number",
    2: "RLE counts contain a character outside '0'..'o'",
    3: "an RLE run length is too long",
    4: "an RLE run length is negative",
}


@numba.njit(cache=True, nogil=True)
def _parse_counts(s: np.ndarray):
    """pycocotools counts characters -> (error code, run lengths)."""
    n = s.shape[0]
    cnts = np.empty(n, np.int64)
    m = 0
    p = 0
    while p < n:
        x = np.int64(0)
        k = 0
        more = True
        while more:
            if p >= n:
                return 1, cnts[:m]
            c = np.int64(s[p]) - 48
            if c < 0 or c > 63:
                return 2, cnts[:m]
            if k >= 12:
                return 3, cnts[:m]
            x |= (c & 0x1F) << (5 * k)
            more = (c & 0x20) != 0
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= np.int64(-1) << (5 * k)
        if m > 2:
            x += cnts[m - 2]
        if x < 0:
            return 4, cnts[:m]
        cnts[m] = x
        m += 1
    return 0, cnts[:m]


@numba.njit(cache=True, nogil=True)
def _runs_from_counts(cnts: np.ndarray):
    """Run lengths -> ([start, end) of the non-empty foreground runs, total length)."""
    n_fg = cnts.shape[0] // 2
    starts = np.empty(n_fg, np.int64)
    ends = np.empty(n_fg, np.int64)
    pos = np.int64(0)
    r = 0
    for i in range(cnts.shape[0]):
        c = cnts[i]
        if i % 2 == 1 and c > 0:
            starts[r] = pos
            ends[r] = pos + c
            r += 1
        pos += c
    return starts[:r].copy(), ends[:r].copy(), pos


def max_counts_bytes(height: int, width: int) -> int:
    """The longest ``counts`` string a valid mask of ``height x width`` can have.

    Each run is at least one pixel (but the first) and a run length of v takes ceil((bits(v) + 1) / 5)
    characters, delta-coded against a run of at most the same size; summed over at most h*w + 1 runs
    that stays below 2 h w + 16. Inflating a string past this bound is refused before it costs memory.
    """
    return 2 * int(height) * int(width) + 64


def counts_bytes(encoded: str | bytes, max_bytes: int | None = None) -> bytes:
    """The competition's base64 string -> the pycocotools ``counts`` bytes (base64 + zlib undone).

    ``max_bytes`` bounds the inflated size (a zlib bomb of a few hundred KB would otherwise need GBs);
    a string that inflates past it raises ``MaskDecodeError``.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
        if max_bytes is None:
            return zlib.decompress(raw)
        inflater = zlib.decompressobj()
        out = inflater.decompress(raw, max_bytes + 1)
        if len(out) > max_bytes:
            raise MaskDecodeError(f"mask string inflates past {max_bytes} bytes, more than any mask of "
                                  "this image size can need")
        if not inflater.eof:
            raise MaskDecodeError("not a base64 zlib mask string (incomplete zlib stream)")
        return out
    except MaskDecodeError:
        raise
    except (binascii.Error, ValueError, zlib.error) as exc:
        raise MaskDecodeError(f"not a base64 zlib mask string ({exc})") from None


def mask_runs(encoded: str | bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The competition's string -> (starts, ends) int64 of its foreground runs.

    Intervals ``[start, end)`` of flat column-major pixel indices (``x * height + y``), sorted and
    disjoint; the area is ``(ends - starts).sum()``. Raises ``MaskDecodeError`` when the string is not
    valid or its run lengths do not add up to ``height * width``.
    """
    raw = np.frombuffer(counts_bytes(encoded, max_counts_bytes(height, width)), np.uint8)
    code, cnts = _parse_counts(raw)
    if code:
        raise MaskDecodeError(_ERRORS[code])
    starts, ends, total = _runs_from_counts(cnts)
    if total != int(height) * int(width):
        raise MaskDecodeError(
            f"RLE covers {total} pixels, not height {height} x width {width} = {int(height) * int(width)}"
        )
    return starts, ends


@numba.njit(cache=True, nogil=True)
def _paint(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, value) -> None:
    for r in range(starts.shape[0]):
        flat[starts[r] : ends[r]] = value


def decode_mask(encoded: str, height: int, width: int) -> np.ndarray:
    """The competition's base64 string -> H x W boolean mask (Fortran-ordered, like pycocotools)."""
    starts, ends = mask_runs(encoded, height, width)
    flat = np.zeros(int(height) * int(width), np.bool_)
    _paint(flat, starts, ends, True)
    return flat.reshape(int(width), int(height)).T


def decode_label_map(
    encodings: Mapping[int, str] | Sequence[str], height: int, width: int
) -> np.ndarray:
    """Cell masks -> int32 H x W label map (C order, 0 = background).

    A mapping gives ``{cell id: string}``; a sequence numbers its masks 1..n. Where masks overlap the
    later one wins.
    """
    items = encodings.items() if isinstance(encodings, Mapping) else enumerate(encodings, start=1)
    flat = np.zeros(int(height) * int(width), np.int32)
    for cid, enc in items:
        if not 0 < int(cid) <= np.iinfo(np.int32).max:
            raise ValueError(f"cell id {cid} must be a positive int32")
        starts, ends = mask_runs(enc, height, width)
        _paint(flat, starts, ends, np.int32(cid))
    return np.ascontiguousarray(flat.reshape(int(width), int(height)).T)
