"""``hpasc predict`` (ensemble inference -> submission), ``hpasc merge`` (shard outputs -> one file) and
``hpasc plan`` (the kernel's wall time on the test set, estimated before submitting)."""
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

    p = subparsers.add_parser(
        "plan", help="estimate the kernel's wall time on the test set before submitting",
        description="Time a few images of each test size through predict (these runs, TTA, device) and "
        "extrapolate to the test set (default: the real one, 462 x 2048 + 68 x 1728 + 29 x 3072 px): a "
        "table per size and stage, the total against Kaggle's 9 h and what the time budget would "
        "degrade to.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR")
    p.add_argument("--weights", help="weights YAML from hpasc blend")
    p.add_argument("--sample-submission", help="the test listing to plan for (sizes from its rows)")
    p.add_argument("--images", help="real images to time (resized to each size); default: synthetic")
    p.add_argument("--per-size", type=int, default=2, help="images timed per size (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference setting, e.g. --set tta=[none] (repeatable)")
    p.add_argument("--backend", help="segmentation backend (default: the first run's config)")
    p.add_argument("--budget", type=float, default=8 * 3600, metavar="SECONDS",
                   help="the kernel's time budget (default 8 h of the 9 h limit)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda ...")
    p.set_defaults(func=_plan)


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


def _plan(args: argparse.Namespace) -> int:
    from ..predict.plan import format_plan, make_plan

    plan = make_plan(args.runs, args.sample_submission, per_size=args.per_size, images=args.images,
                     device=args.device, workers=args.workers, weights=args.weights,
                     inference_overrides=args.overrides,
                     seg_overrides=[f"backend={args.backend}"] if args.backend else None, budget=args.budget)
    print(format_plan(plan))
    return 0
