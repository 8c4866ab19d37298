"""Fetching the public HPA images of a listing into the competition layout, resumably and politely.

Per image, the four channels ``{url}_{red,green,blue,yellow}.jpg`` are downloaded (``.tif.gz`` when the
JPEG is missing or does not decode), each decoded completely (a cut-off JPEG or gzip is refused, a gzip
may not inflate beyond ``MAX_INFLATED``), checked to share one size, optionally resized so the longer side
is ``size``, and written as 8-bit PNGs through temp file + rename, so a killed run never leaves a file a
later run trusts. A re-run skips every image whose four PNGs are complete. Timeouts, dropped
connections, truncated bodies, 429 and 5xx are retried with exponential backoff; 404/403/410 fall back to
the TIFF, then fail the image. ``connections`` images are fetched at once (one connection each).

Every run ends with ``DIR/train.csv`` (every complete image of the selection, whichever run or shard
fetched it; ``ID,Label,source,Cellline,antibody,url``) and a failures CSV (``ID,url,reason``) — nothing
is lost silently.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import __version__
from ..fsutil import atomic_path, write_text_atomic
from ..io import CHANNELS, ImageReadError, png_size, decode_channel, read_ends, truncation_problem, write_png_atomic
from ..paths import check_id
from ..sharding import parse_shard, shard_items, shard_tag
from .listing import SOURCE, Selection, read_listing

MAX_DOWNLOAD = 256 << 20  # bytes of one channel file (a 3072 px 16-bit TIFF is ~19 MB)
MAX_INFLATED = 256 << 20  # bytes a .tif.gz may inflate to
SETTINGS_NAME = "external.json"
TRAIN_COLUMNS = ("ID", "Label", "source", "Cellline", "antibody", "url")
FAILURE_COLUMNS = ("ID", "url", "reason")


class ExternalError(ValueError):
    """A setup that cannot work (output folder of other settings...). Names the file."""


class _Missing(Exception):
    """The server says the file is not there (404, 403, 410)."""


class _Transient(Exception):
    """Worth retrying: timeout, dropped connection, truncated body, 429, 5xx."""


class _Permanent(Exception):
    """Not worth retrying on this URL (other 4xx, oversized file)."""


@dataclass(frozen=True)
class FetchOptions:
    connections: int = 8  # images fetched at once, one connection each
    retries: int = 4  # extra attempts per file after a transient failure
    timeout: float = 30.0  # seconds without a byte before an attempt is given up
    backoff: float = 1.0  # first retry delay in seconds, doubled each time (with jitter)
    size: int | None = None  # longer side of the written PNGs; None keeps the original size
    user_agent: str = f"hpasc/{__version__} (+https://github.com/hpasc)"

    def __post_init__(self):
        if self.connections < 1 or self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ExternalError(f"fetch options: need connections >= 1, retries >= 0, timeout > 0, backoff >= 0; "
                                f"got {self.connections}, {self.retries}, {self.timeout}, {self.backoff}")
        if self.size is not None and not 64 <= self.size <= 16384:
            raise ExternalError(f"--size {self.size}: expected 64..16384 px")


# --------------------------------------------------------------------------- one file


def _http_get(url: str, opts: FetchOptions) -> bytes:
    """The body of ``url``; raises _Missing, _Transient or _Permanent."""
    request = urllib.request.Request(url, headers={"User-Agent": opts.user_agent})
    deadline = time.monotonic() + 10 * opts.timeout  # a server dripping bytes cannot hold a worker forever
    try:
        with urllib.request.urlopen(request, timeout=opts.timeout) as resp:
            expected = resp.headers.get("Content-Length")
            chunks, total = [], 0
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_DOWNLOAD:
                    raise _Permanent(f"larger than {MAX_DOWNLOAD >> 20} MB")
                if time.monotonic() > deadline:
                    raise _Transient(f"slower than {total} bytes in {10 * opts.timeout:g} s")
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404, 410):
            raise _Missing(f"HTTP {exc.code}") from None
        if exc.code == 429 or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code}") from None
        raise _Permanent(f"HTTP {exc.code}") from None
    except http.client.IncompleteRead as exc:
        raise _Transient(f"truncated body ({len(exc.partial)} bytes received)") from None
    except (socket.timeout, TimeoutError):
        raise _Transient(f"timed out after {opts.timeout:g} s") from None
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"timed out after {opts.timeout:g} s") from None
        raise _Transient(f"connection failed ({reason})") from None
    if expected is not None and expected.isdigit() and total != int(expected):
        raise _Transient(f"truncated body ({total} of {expected} bytes)")
    return b"".join(chunks)


def gunzip_bounded(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """Inflate a gzip member completely, refusing output beyond ``limit`` bytes (a decompression bomb)
    and a member that ends early (ValueError)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise ValueError(f"corrupt gzip ({exc})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"gzip inflates to more than {limit >> 20} MB")
    if not inflater.eof:
        raise ValueError("truncated gzip")
    return out


def _decode(data: bytes, url: str) -> np.ndarray:
    """Downloaded bytes -> 2-D pixel array; ValueError/ImageReadError when they do not decode fully."""
    if url.endswith(".gz"):
        data = gunzip_bounded(data)
    return decode_channel(data, url.rsplit("/", 1)[-1])


def _fetch_decoded(url: str, opts: FetchOptions, sleep=time.sleep) -> tuple[np.ndarray, int]:
    """Download and decode one file with retries -> (pixels, bytes). Raises _Missing, or _Permanent
    with the last reason once the attempts are used up. A file that does not decode gets one more try."""
    attempts, decode_failures = opts.retries + 1, 0
    reason = "no attempt"
    for attempt in range(attempts):
        if attempt:
            sleep(opts.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
        try:
            data = _http_get(url, opts)
        except _Transient as exc:
            reason = str(exc)
            continue
        try:
            return _decode(data, url), len(data)
        except (ValueError, ImageReadError) as exc:
            reason = f"does not decode: {getattr(exc, 'reason', exc)}"
            decode_failures += 1
            if decode_failures > 1:
                break
    raise _Permanent(reason)


def fetch_channel(url_prefix: str, color: str, opts: FetchOptions, sleep=time.sleep) -> tuple[np.ndarray, int]:
    """One channel of one image: the JPEG, else the ``.tif.gz`` -> (pixels, bytes downloaded).
    Raises _Permanent naming what went wrong with each."""
    reasons = []
    for ext in (".jpg", ".tif.gz"):
        url = f"{url_prefix}_{color}{ext}"
        try:
            return _fetch_decoded(url, opts, sleep)
        except (_Missing, _Permanent) as exc:
            reasons.append(f"{ext.lstrip('.')}: {exc}")
    raise _Permanent("; ".join(reasons))


# --------------------------------------------------------------------------- one image


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """A channel of any stored depth -> uint8 (16-bit rounded by /257, float clipped to [0, 1])."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if arr.dtype.kind == "f":
        return np.clip(np.rint(np.nan_to_num(arr.astype(np.float32)) * 255), 0, 255).astype(np.uint8)
    if arr.dtype.kind in "iu":
        top = float(np.iinfo(arr.dtype).max)
        return np.clip(np.rint(arr.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def resized(arr: np.ndarray, size: int | None) -> np.ndarray:
    """Scale so the longer side is ``size`` (area averaging when shrinking); None keeps the size."""
    if size is None or max(arr.shape) == size:
        return arr
    scale = size / max(arr.shape)
    shape = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
    return cv2.resize(arr, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def png_paths(train_dir: Path, image_id: str) -> list[Path]:
    check_id(image_id, str(train_dir))
    return [train_dir / f"{image_id}_{c}.png" for c in CHANNELS]


def is_complete(train_dir: Path, image_id: str) -> bool:
    """All four PNGs present and complete (signature, IHDR and IEND: written whole by a rename)."""
    for path in png_paths(train_dir, image_id):
        try:
            head, tail = read_ends(path)
        except OSError:
            return False
        if png_size(head) is None or truncation_problem(head, tail):
            return False
    return True


def fetch_image(image_id: str, url_prefix: str, train_dir: Path, opts: FetchOptions,
                sleep=time.sleep) -> int:
    """Download, check and write one image's four PNGs -> bytes downloaded. Raises _Permanent."""
    planes, total = [], 0
    for color in CHANNELS:
        arr, n = fetch_channel(url_prefix, color, opts, sleep)
        planes.append(arr)
        total += n
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise _Permanent(f"channels differ in size: {', '.join(f'{c} {p.shape[1]}x{p.shape[0]}' for c, p in zip(CHANNELS, planes))}")
    for path, arr in zip(png_paths(train_dir, image_id), planes):
        write_png_atomic(path, np.ascontiguousarray(resized(to_uint8(arr), opts.size)))
    return total


# --------------------------------------------------------------------------- a listing


@dataclass
class FetchReport:
    out: Path
    selection: Selection
    shard: tuple[int, int] | None
    counts: dict[str, int] = field(default_factory=dict)
    failures: pd.DataFrame | None = None
    bytes: int = 0
    seconds: float = 0.0
    train_csv: Path | None = None
    failures_csv: Path | None = None

    def summary(self) -> str:
        rate = self.counts.get("downloaded", 0) / self.seconds if self.seconds else 0.0
        lines = [self.selection.summary(),
                 ("shard " + "/".join(map(str, self.shard)) + ": " if self.shard else "") +
                 ", ".join(f"{v} {k}" for k, v in self.counts.items()) +
                 f"; {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:.2f} images/s)",
                 f"wrote {self.train_csv} and {self.failures_csv}"]
        if self.failures is not None and len(self.failures):
            first = self.failures.iloc[0]
            lines.append(f"{len(self.failures)} failed, e.g. {first['ID']}: {first['reason']}")
        return "\n".join(lines)


def _check_settings(out: Path, opts: FetchOptions) -> None:
    """An output folder keeps one image size: mixing sizes would pass unnoticed through training."""
    path = out / SETTINGS_NAME
    wanted = {"size": opts.size}
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            have = None
        if isinstance(have, dict) and have.get("size") != opts.size:
            raise ExternalError(f"{path}: this folder holds images written with --size {have.get('size')}, "
                                f"not {opts.size}; use that size or another --out")
    write_text_atomic(path, json.dumps(wanted))


def failures_path(out: Path, shard: tuple[int, int] | None) -> Path:
    tag = shard_tag(shard)
    return out / (f"failures.{tag}.csv" if tag else "failures.csv")


def fetch_external(listing: os.PathLike | str, out: os.PathLike | str, opts: FetchOptions | None = None, *,
                   include_trainset: bool = False, cell_lines: list[str] | None = None,
                   classes: list[int] | None = None, max_images: int | None = None,
                   shard: tuple[int, int] | str | None = None, offline: bool = False,
                   progress: bool | None = None) -> FetchReport:
    """``hpasc external``: fetch the images of one shard of the filtered listing into ``out/train/``,
    then write ``out/train.csv`` over every complete image of the selection and the failures CSV.
    ``offline`` fetches nothing (re-indexes what is on disk, e.g. after copying shards together)."""
    t0 = time.monotonic()
    opts = opts or FetchOptions()
    out = Path(out)
    shard = parse_shard(shard, ExternalError)
    selection = read_listing(listing, include_trainset=include_trainset, cell_lines=cell_lines,
                             classes=classes, max_images=max_images)
    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(out, opts)
    mine = shard_items(list(selection.images.itertuples(index=False)), shard)
    todo = [r for r in mine if not is_complete(train_dir, r.ID)]
    counts = {"in shard" if shard else "to fetch": len(mine), "already complete": len(mine) - len(todo)}
    failures, downloaded, nbytes = [], 0, 0
    if offline:
        counts["not fetched (offline)"] = len(todo)
    elif todo:
        with ThreadPoolExecutor(max_workers=opts.connections) as pool, \
                tqdm(total=len(todo), desc="external", unit="img", disable=None if progress is None else not progress) as bar:
            futures = {pool.submit(fetch_image, r.ID, r.url, train_dir, opts): r for r in todo}
            for future in as_completed(futures):
                r = futures[future]
                try:
                    nbytes += future.result()
                    downloaded += 1
                except _Permanent as exc:
                    failures.append({"ID": r.ID, "url": r.url, "reason": str(exc)})
                except OSError as exc:  # the disk, not the network: worth stopping for
                    pool.shutdown(cancel_futures=True)
                    raise ExternalError(f"{train_dir}: cannot write {r.ID} ({exc})") from None
                bar.update()
                bar.set_postfix_str(f"{nbytes / 1e6:.0f} MB, {nbytes / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s, "
                                    f"{len(failures)} failed", refresh=False)
        counts["downloaded"], counts["failed"] = downloaded, len(failures)
    order = {r.ID: k for k, r in enumerate(todo)}
    failed = pd.DataFrame(sorted(failures, key=lambda f: order[f["ID"]]), columns=list(FAILURE_COLUMNS))
    fail_csv = failures_path(out, shard)
    with atomic_path(fail_csv) as tmp:
        failed.to_csv(tmp, index=False)
    train_csv = write_train_csv(out, selection)
    return FetchReport(out=out, selection=selection, shard=shard, counts=counts, failures=failed, bytes=nbytes,
                       seconds=time.monotonic() - t0, train_csv=train_csv, failures_csv=fail_csv)


def write_train_csv(out: Path, selection: Selection) -> Path:
    """``out/train.csv``: the complete images of the selection, in listing order."""
    train_dir = out / "train"
    images = selection.images
    done = images[[is_complete(train_dir, i) for i in images["ID"]]]
    table = done.assign(source=SOURCE)[list(TRAIN_COLUMNS)]
    path = out / "train.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
