"""``hpasc predict`` (ensemble inference -> submission) and ``hpasc merge`` (shard outputs -> one file)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment test images, run the ensemble, write a validated submission",
        description="Segment (cached with --masks), crop with each run's preprocessing, run every model "
        "with TTA, combine with the confidence recipe and write OUT atomically (plus OUT's .cells.csv "
        "with the raw cell probabilities). A broken image costs only its own row.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                   help="runs/<config>/fold<k> folders, or runs/<config> for all its folds")
    p.add_argument("--weights", help="weights YAML from hpasc blend (runs: {name: weight}, alpha: ...)")
    p.add_argument("--images", required=True, help="folder of {ID}_{red,green,blue,yellow}.png")
    p.add_argument("--sample-submission", required=True, help="CSV listing the IDs and sizes to predict")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--masks", help="segmentation cache folder ({ID}.png label maps, reused when present)")
    p.add_argument("--backend", help="segmentation backend (default: the first run's config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference setting, e.g. --set alpha=0.7 --set tta=[none,hflip] (repeatable)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="degrade (less TTA, fewer models) to finish within this many seconds")
    p.add_argument("--shard", metavar="I/N", help="predict only shard I (0-based) of N; see hpasc merge")
    p.add_argument("--workers", type=int, default=2, help="threads reading/segmenting ahead (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("merge", help="merge the outputs of predict --shard into one submission",
                              description="The result equals a single predict run over all images.")
    p.add_argument("out", help="merged submission CSV")
    p.add_argument("parts", nargs="+", help="the shard outputs")
    p.set_defaults(func=_merge)


def _predict(args: argparse.Namespace) -> int:
    from ..predict import predict

    out = predict(args.runs, args.images, args.sample_submission, args.out, weights=args.weights,
                  masks_dir=args.masks,
                  seg_overrides=[f"backend={args.backend}"] if args.backend else None,
                  inference_overrides=args.overrides,
                  time_budget=args.time_budget, shard=args.shard, workers=args.workers, device=args.device)
    print(f"wrote {out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..predict import merge

    out = merge(args.out, args.parts)
    print(f"wrote {out}")
    return 0
