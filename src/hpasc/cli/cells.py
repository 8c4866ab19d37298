"""``hpasc cells``: crops and cell table of a segmented dataset, cached for training."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cells", help="build the cell table and crop cache of segmented images",
        description="Crop every cell of every image (masks from `hpasc segment`) into OUT: a memory-mappable "
        "crops file, cells.csv (one row per cell: box, areas, border, intensities, shape features) and the "
        "image labels. Incremental: images already cached with the same settings and masks are skipped.")
    p.add_argument("--images", required=True, help="folder of {ID}_{red,green,blue,yellow}.png")
    p.add_argument("--masks", required=True, help="folder of {ID}.png cell and {ID}_nuclei.png nucleus label maps")
    p.add_argument("--labels", help="CSV with ID,Label[,fold] (e.g. folds.csv); default: every masked image")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--config", help="experiment YAML whose `cells` section gives the crop settings")
    p.add_argument("--size", type=int, help="crop side in px (overrides the config)")
    p.add_argument("--padding", type=float, help="box padding as a fraction of the box side")
    p.add_argument("--neighbours", choices=("keep", "zero", "blur"), help="other cells inside a crop")
    p.add_argument("--max-images", type=int, help="only the first N images")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--shard", metavar="I/N", help="build only shard I (0-based) of N as per-image parts in "
                   "OUT/parts/; a run without --shard (all shards' parts copied into OUT/parts/) merges them")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..cells import build_cells
    from ..config import load_config, replace

    # bad paths, unreadable images, bad config or labels: one "error: ..." line and exit 2 (cli.main)
    cells_cfg = load_config(args.config).cells
    changes = {k: getattr(args, k) for k in ("size", "padding", "neighbours") if getattr(args, k) is not None}
    if changes:
        cells_cfg = replace(cells_cfg, **changes)
    cache = build_cells(args.images, args.masks, args.out, cells_cfg, labels_csv=args.labels,
                        max_images=args.max_images, workers=args.workers, shard=args.shard)
    if args.shard:
        print(f"shard {args.shard}: {cache} image(s) cropped into {args.out}/parts "
              "(merge: the same command without --shard)")
        return 0
    n_images = cache.table["ID"].nunique() if len(cache.table) else 0
    print(f"{len(cache)} cells of {n_images} images -> {cache.root}")
    return 0
