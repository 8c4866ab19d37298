"""Download throughput of ``hpasc external`` against a local server, and the preparation cost per image.

    python benchmarks/bench_external.py [--images 32] [--latency 0.05] [--connections 1,4,8,16] [--prep]

Serves the real sample images of ../shared/hpa/sample (2048 px, re-encoded as HPA-style coloured JPEGs,
~0.3-1 MB a channel) under ``--images`` IDs from a server on 127.0.0.1 that waits ``--latency`` seconds
before each answer (a distant server's round trip; the loopback itself is free). Prints images/s per
number of connections and the ratio against one connection, measured in the same run. ``--prep`` also
times what every image then costs before training — the default (classic) segmentation and the crop
cache — and projects the whole preparation for 1,000 and 100,000 images on this machine.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hpasc.config import CellsConfig, SegmentationConfig
from hpasc.external import FetchOptions, fetch_external
from hpasc.io import CHANNELS, read_channel

from common import SHARED_SAMPLE

TINT = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}  # BGR


def served_files(n_images: int) -> tuple[dict[str, bytes], list[str]]:
    samples = sorted(p.name[: -len("_red.png")] for p in SHARED_SAMPLE.glob("*_red.png"))
    if not samples:
        raise SystemExit(f"no sample images in {SHARED_SAMPLE}")
    encoded = {}
    for sample in samples:
        for color in CHANNELS:
            gray = np.rint(read_channel(SHARED_SAMPLE / f"{sample}_{color}.png") * 255).astype(np.uint8)
            bgr = np.stack([gray * w for w in TINT[color]], axis=-1).astype(np.uint8)
            encoded[sample, color] = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    files, prefixes = {}, []
    for k in range(n_images):
        prefix = f"/{1000 + k}/bench_{k}"
        for color in CHANNELS:
            files[f"{prefix}_{color}.jpg"] = encoded[samples[k % len(samples)], color]
        prefixes.append(prefix)
    return files, prefixes


def start_server(files: dict[str, bytes], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(latency)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05, help="server delay per request, s")
    parser.add_argument("--connections", default="1,4,8,16")
    parser.add_argument("--size", type=int, default=None, help="--size of hpasc external (default: keep)")
    parser.add_argument("--prep", action="store_true", help="also time segmentation and crops per image")
    args = parser.parse_args()
    files, prefixes = served_files(args.images)
    server = start_server(files, args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="bench_external_"))
    listing = work / "listing.csv"
    pd.DataFrame({"Image": [url + p for p in prefixes], "Label": "Cytosol", "Cellline": "U-2 OS",
                  "in_trainset": "False"}).to_csv(listing, index=False)
    mb = sum(len(b) for b in files.values()) / 1e6
    print(f"{args.images} images ({mb:.0f} MB of JPEG), server latency {args.latency * 1000:.0f} ms, size {args.size}")
    base = None
    out = work / "out"
    try:
        for n in (int(c) for c in args.connections.split(",")):
            shutil.rmtree(out, ignore_errors=True)
            report = fetch_external(listing, out, FetchOptions(connections=n, size=args.size), progress=False)
            assert report.counts["downloaded"] == args.images, report.summary()
            rate = args.images / report.seconds
            base = base or rate
            print(f"  {n:3d} connection(s): {rate:6.2f} images/s, {mb / report.seconds:6.1f} MB/s   x{rate / base:.2f}")
        if args.prep:
            prep(out, args.images)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def prep(out: Path, n_images: int) -> None:
    from hpasc.cells import build_cell_cache
    from hpasc.segmentation import segment_folder

    ids = list(pd.read_csv(out / "train.csv", dtype=str)["ID"])
    t0 = time.perf_counter()
    segment_folder(out / "train", out / "masks", SegmentationConfig(), ids=ids)
    seg = (time.perf_counter() - t0) / n_images
    t0 = time.perf_counter()
    build_cell_cache(out / "train", out / "masks", ids, CellsConfig(size=128), out / "cells")
    crop = (time.perf_counter() - t0) / n_images
    disk = sum(p.stat().st_size for p in (out / "train").iterdir()) / n_images / 1e6
    crops = sum(p.stat().st_size for p in (out / "cells").glob("crops-*.npy")) / n_images / 1e6
    print(f"  per image, 1 process: segment (classic) {seg:.2f} s, crops 128 px {crop:.2f} s; "
          f"disk: PNGs {disk:.1f} MB, crops {crops:.1f} MB")
    for total in (1_000, 100_000):
        hours = total * (seg + crop) / 3600
        print(f"  {total:>7,} images: {hours:8.1f} process-hours of preparation, "
              f"{total * (disk + crops) / 1e3:8.1f} GB on disk")


if __name__ == "__main__":
    main()
