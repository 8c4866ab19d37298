"""``hpasc segment`` and ``hpasc segment-eval``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment every image of a folder into 16-bit cell/nucleus PNGs")
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of {ID}_{red,green,blue,yellow} files")
    p.add_argument("--out", required=True, metavar="MASKS_DIR", help="writes {ID}.png and {ID}_nuclei.png")
    p.add_argument("--backend", default=None, help="classic (default) | hpacellseg | cellpose")
    p.add_argument("--ids", default=None, metavar="CSV", help="only the IDs of this CSV (ID column)")
    p.add_argument("--workers", type=int, default=1, help="images segmented in parallel")
    p.add_argument("--shard", metavar="I/N", help="segment only shard I (0-based) of N of the images; "
                   "the shards' masks combine by file name")
    p.add_argument("--overlay", action="store_true", help="also save outline pictures in MASKS_DIR/overlay")
    p.add_argument("--config", default=None, help="experiment YAML whose segmentation section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), e.g. segmentation.cell_weights=/w/cell.pth")
    p.set_defaults(func=_run)

    e = sub.add_parser("segment-eval", help="our cell masks against reference masks: F1 at IoU 0.5/0.6/0.75, "
                       "mean IoU, merged and split cells, per image")
    e.add_argument("masks_dir", metavar="MASKS", help="our masks ({ID}.png, as hpasc segment writes them)")
    e.add_argument("truth_dir", metavar="TRUTH_MASKS", help="reference label maps: {ID}.png or {ID}_cellmask.png")
    e.add_argument("--ids", default=None, metavar="CSV", help="only the IDs of this CSV (ID column)")
    e.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    e.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from ..segmentation.evaluate import evaluate_folder, format_result
    from ..segmentation.folder import read_id_list

    ids = read_id_list(args.ids) if args.ids else None
    result = evaluate_folder(args.masks_dir, args.truth_dir, ids)
    print(result.to_json() if args.json else format_result(result))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..segmentation import segment_folder
    from ..segmentation.folder import list_image_ids, read_id_list

    overrides = list(args.overrides) + ([f"segmentation.backend={args.backend}"] if args.backend else [])
    cfg = load_config(args.config, overrides).segmentation
    from ..sharding import shard_items

    ids = shard_items(read_id_list(args.ids) if args.ids else list_image_ids(args.images_dir), args.shard)
    done = segment_folder(args.images_dir, args.out, cfg, ids=ids, workers=args.workers,
                          overlay=args.overlay)
    print(f"{len(done)} of {len(ids)} images segmented in {args.out}")
    return 0 if len(done) == len(ids) else 1
