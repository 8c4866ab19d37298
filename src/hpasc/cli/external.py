"""``hpasc external``: public HPA images of a kaggle_2021.tsv-style listing into the competition layout."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "external", help="download the public HPA images of a listing (kaggle_2021.tsv) into OUT/train/",
        description="Read the listing, map HPA locations to the 19 classes, fetch the four channels of each "
        "image (JPEG, else .tif.gz), verify and write them as OUT/train/{ID}_{channel}.png, then OUT/train.csv "
        "(ID,Label,source,Cellline,antibody,url) and a failures CSV. Re-runs resume: complete images are "
        "skipped. The listing comes from the competition's discussion/datasets (see the README).")
    p.add_argument("listing", metavar="LISTING", help="kaggle_2021.tsv (comma- or tab-separated: Image, Label, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (competition layout)")
    p.add_argument("--size", type=int, help="resize so the longer side is PX (default: keep; 1024 saves ~4x disk)")
    p.add_argument("--connections", type=int, default=8, help="images fetched at once (default 8; be polite)")
    p.add_argument("--retries", type=int, default=4, help="retries per file on timeouts, 5xx, cut-off bodies")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a retry (default 30)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubled each retry")
    p.add_argument("--cell-lines", help="comma-separated cell lines to keep (e.g. 'U-2 OS,HeLa')")
    p.add_argument("--classes", help="comma-separated class ids: keep images holding any (e.g. rare '11,15')")
    p.add_argument("--include-trainset", action="store_true",
                   help="also fetch rows marked in_trainset (already competition training images)")
    p.add_argument("--max-images", type=int, help="only the first N selected images")
    p.add_argument("--shard", metavar="I/N", help="fetch only shard I (0-based) of N of the selection")
    p.add_argument("--offline", action="store_true",
                   help="fetch nothing: re-index OUT (train.csv) from the complete images on disk")
    p.set_defaults(func=_run)


def _int_list(text: str | None, what: str) -> list[int] | None:
    from ..external import ListingError

    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ListingError(f"{what} {text!r}: expected comma-separated class ids, e.g. 11,15") from None


def _run(args: argparse.Namespace) -> int:
    from ..external import FetchOptions, fetch_external

    opts = FetchOptions(connections=args.connections, retries=args.retries, timeout=args.timeout,
                        backoff=args.backoff, size=args.size)
    cell_lines = [c.strip() for c in args.cell_lines.split(",") if c.strip()] if args.cell_lines else None
    report = fetch_external(args.listing, args.out, opts, include_trainset=args.include_trainset,
                            cell_lines=cell_lines, classes=_int_list(args.classes, "--classes"),
                            max_images=args.max_images, shard=args.shard, offline=args.offline)
    print(report.summary())
    return 1 if report.counts.get("failed") else 0
