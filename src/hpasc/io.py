"""Reading and writing 4-channel HPA images.

One in-memory convention whatever the source: ``read_image`` returns an ``H x W x 4`` float32 array in
(red, green, blue, yellow) order with values in [0, 1] — 8-bit files are divided by 255, 16-bit files by
65535 (the test set's 16-bit PNGs then match their 8-bit training twins). Sources are
``{ID}_{color}.png`` (8 or 16 bit), ``.tif``/``.tiff`` and ``.jpg`` (public HPA data; an RGB jpg is
reduced to its brightest component).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from .fsutil import atomic_path
from .paths import check_id

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

cv2.setNumThreads(1)  # parallelism comes from the callers (workers), not from inside each decode


class ImageReadError(OSError):
    """A channel file is missing, unreadable or does not fit the other channels. Names the file."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def image_folder(images: os.PathLike | str | Mapping[str, os.PathLike | str], image_id: str) -> Path:
    """The folder holding an image's channel files: one folder for every image, or a mapping
    ID -> folder (training images of several sources)."""
    if isinstance(images, (str, os.PathLike)):
        return Path(images)
    try:
        return Path(images[image_id])
    except KeyError:
        raise ImageReadError(Path(f"{image_id}_red.png"), "image of no known source folder") from None


def channel_path(folder: os.PathLike | str, image_id: str, color: str) -> Path:
    """The existing file of one channel, trying the known extensions in order."""
    folder = Path(folder)
    check_id(image_id, str(folder))
    for ext in EXTENSIONS:
        path = folder / f"{image_id}_{color}{ext}"
        if path.is_file():
            return path
    raise ImageReadError(folder / f"{image_id}_{color}.png", "missing channel file")


def integer_to_unit(arr: np.ndarray) -> np.ndarray | None:
    """uint8 / 255 or uint16 / 65535 as float32 in [0, 1]; None for any other pixel type.

    True division (not a multiply by the rounded reciprocal): v/255 and 257v/65535 are the same real
    number, so correctly rounded division makes a 16-bit twin of an 8-bit image read bit-identically
    (one pass over the pixels: the ufunc casts on the fly, no float temporary).
    """
    if arr.dtype == np.uint8:
        return np.divide(arr, np.float32(255.0), dtype=np.float32)
    if arr.dtype == np.uint16:
        return np.divide(arr, np.float32(65535.0), dtype=np.float32)
    return None


def _to_unit_float(arr: np.ndarray, path: Path) -> np.ndarray:
    scaled = integer_to_unit(arr)
    if scaled is not None:
        return scaled
    if arr.dtype.kind == "f":
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise ImageReadError(path, f"unsupported pixel type {arr.dtype}")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_SIDE = 16384  # microscopes here give 1728-3072 px; a PNG claiming more is refused undecoded
_JPEG_MAGIC = b"\xff\xd8\xff"


def png_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from the first 24 bytes of a PNG (signature + IHDR), None if not a PNG."""
    if len(head) < 24 or head[:8] != _PNG_MAGIC:
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _truncation(path: Path) -> str | None:
    """Why a PNG or JPEG file (recognised by its content, whatever its name) is cut off or too large to
    decode, or None (``truncation_problem`` on its first and last bytes)."""
    return truncation_problem(*read_ends(path))


def read_ends(path: Path) -> tuple[bytes, bytes]:
    """A file's first 24 and last 32 bytes: what ``png_size`` and ``truncation_problem`` read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
        fh.seek(max(0, size - 32))
        return head, fh.read()


def truncation_problem(head: bytes, tail: bytes) -> str | None:
    """Why an encoded PNG or JPEG whose first 24 and last 32 bytes are given is cut off or too large to
    decode, or None.

    OpenCV decodes a cut-off JPEG without error (the rest grey) and some cut-off PNGs too; a complete
    JPEG ends with the end-of-image marker FFD9, a complete PNG with its IEND chunk. A PNG header
    claiming a side above ``MAX_IMAGE_SIDE`` would inflate to gigabytes and is refused first.
    """
    if head.startswith(_JPEG_MAGIC) and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if head[:8] == _PNG_MAGIC:
        shape = png_size(head)
        if shape is not None and max(shape) > MAX_IMAGE_SIDE:
            return f"PNG claims {shape[1]}x{shape[0]} px, more than {MAX_IMAGE_SIDE} px a side"
        if b"IEND" not in tail:
            return "truncated PNG (no IEND chunk)"
    return None


def _single_channel(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3:  # RGB(A) rendering of a single channel: keep the brightest component
        # two elementwise maxima: 20x faster than a reduction over the (strided, length-3) last axis
        arr = np.maximum(np.maximum(arr[..., 0], arr[..., 1]), arr[..., 2]) if arr.shape[2] >= 3 else arr.max(axis=2)
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(path, f"expected a 2-D single-channel image, got shape {arr.shape}")
    return arr


def _read_tiff(source, path: Path) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(source)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise ImageReadError(path, f"unreadable TIFF ({exc})") from exc


def _read_raw(path: Path) -> np.ndarray:
    """One channel file -> 2-D array of its stored pixel type."""
    if not path.is_file():
        raise ImageReadError(path, "missing channel file")
    if path.suffix.lower() in (".tif", ".tiff"):
        return _single_channel(_read_tiff(path, path), path)
    problem = _truncation(path)
    if problem:
        raise ImageReadError(path, problem)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "unreadable or truncated image file")
    return _single_channel(arr, path)


def decode_channel(data: bytes, name: os.PathLike | str) -> np.ndarray:
    """The encoded bytes of one channel file (PNG, JPEG or TIFF, told by content; ``name`` is for the
    messages) -> 2-D array of its stored pixel type, with the same completeness checks as a file read."""
    path = Path(name)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        import io as _bytes_io

        return _single_channel(_read_tiff(_bytes_io.BytesIO(data), path), path)
    problem = truncation_problem(data[:24], data[-32:])
    if problem:
        raise ImageReadError(path, problem)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "unreadable or truncated image data")
    return _single_channel(arr, path)


def read_channel(path: os.PathLike | str) -> np.ndarray:
    """One channel file -> H x W float32 in [0, 1]."""
    path = Path(path)
    return _to_unit_float(_read_raw(path), path)


def read_image(folder: os.PathLike | str, image_id: str) -> np.ndarray:
    """``{folder}/{image_id}_{red,green,blue,yellow}.*`` -> H x W x 4 float32 in [0, 1]."""
    paths = [channel_path(folder, image_id, c) for c in CHANNELS]
    raws = [_read_raw(path) for path in paths]
    first = raws[0]
    for path, chan in zip(paths[1:], raws[1:]):
        if chan.shape != first.shape:
            raise ImageReadError(
                path, f"size {chan.shape[1]}x{chan.shape[0]} differs from {paths[0].name} "
                f"({first.shape[1]}x{first.shape[0]})")
    if all(chan.dtype == first.dtype for chan in raws) and first.dtype in (np.uint8, np.uint16):
        # interleave the small integer planes first, then convert once: ~2x cheaper than per channel
        return _to_unit_float(cv2.merge(raws), paths[0])
    return np.stack([_to_unit_float(chan, path) for path, chan in zip(paths, raws)], axis=-1)


def image_size(folder: os.PathLike | str, image_id: str) -> tuple[int, int]:
    """(height, width) of an image from its red channel's header, without decoding pixels (PNG)."""
    path = channel_path(folder, image_id, "red")
    if path.suffix.lower() == ".png":
        with open(path, "rb") as fh:
            shape = png_size(fh.read(24))
        if shape is None:
            raise ImageReadError(path, "not a PNG file")
        return shape
    return read_channel(path).shape


def to_uint(image: np.ndarray, bits: int = 8) -> np.ndarray:
    """Float image in [0, 1] -> uint8 or uint16 (rounded)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = 255.0 if bits == 8 else 65535.0
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.clip(np.rint(np.asarray(image, np.float32) * top), 0, top).astype(dtype)


def write_png_atomic(path: os.PathLike | str, array: np.ndarray) -> None:
    """Write a 2-D uint8/uint16 array (or an 8-bit ``H x W x 3`` BGR picture) as PNG through a temp
    file + rename."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def write_image(folder: os.PathLike | str, image_id: str, image: np.ndarray, bits: int = 8) -> None:
    """H x W x 4 float image in [0, 1] -> four ``{ID}_{color}.png`` files of the given bit depth."""
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"expected H x W x 4, got {image.shape}")
    check_id(image_id, str(folder))
    data = to_uint(image, bits)
    for k, color in enumerate(CHANNELS):
        write_png_atomic(Path(folder) / f"{image_id}_{color}.png", np.ascontiguousarray(data[..., k]))
