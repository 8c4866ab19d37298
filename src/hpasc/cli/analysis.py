"""``hpasc cv``, ``hpasc blend``, ``hpasc report``, ``hpasc explain``: offline analysis of trained runs."""
from __future__ import annotations

import argparse


def _data_options(p: argparse.ArgumentParser) -> None:
    """Overrides of the data paths otherwise taken from the first run's config."""
    p.add_argument("--labels", help="ID,Label CSV of the image labels (default: the run's folds/train CSV)")
    p.add_argument("--truth", help="cell truth CSV (default: the run's data.truth_csv, if set)")
    p.add_argument("--masks", help="folder of the training label maps (default: <work_dir>/masks/train)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cv", help="cross-validation scores of runs from their out-of-fold predictions",
        description="Gather oof.csv of every fold (RUN_DIR is runs/<config>/fold<k> or runs/<config>); "
        "several configs are scored as their equal-weight ensemble. Prints per-class proxy AP/AUC and, "
        "where cell truth exists, the competition mAP through the confidence recipe.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--alpha", type=float, help="recipe alpha (default: the run's inference.alpha)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    _data_options(p)
    p.set_defaults(func=_cv)

    p = subparsers.add_parser("blend", help="ensemble weights from OOF predictions, or average submissions")
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    q = modes.add_parser(
        "runs", help="search per-config weights (and alpha) maximising the mean-over-folds CV mAP",
        description="Writes a YAML {runs: {<config>: weight}, alpha: float} for `hpasc predict --weights`.")
    q.add_argument("runs", nargs="+", metavar="RUN_DIR")
    q.add_argument("--out", required=True, help="weights YAML to write")
    q.add_argument("--alphas", type=float, nargs="*", help="alpha grid (default 0 .25 .5 .75 1 1.5 2)")
    q.add_argument("--steps", type=int, default=10, help="weight grid steps per member (default 10)")
    q.add_argument("--no-lofo", action="store_true", help="skip the leave-one-fold-out estimate")
    _data_options(q)
    q.set_defaults(func=_blend_runs)
    q = modes.add_parser(
        "submissions", help="weighted average of submission files per (cell, class)",
        description="Cells are the same when their masks are identical, else matched by IoU >= 0.6.")
    q.add_argument("submissions", nargs="+", metavar="CSV")
    q.add_argument("--weights", type=float, nargs="+", help="one weight per file (default equal)")
    q.add_argument("--out", required=True, help="blended submission CSV")
    q.add_argument("--sample-submission", help="IDs/sizes to write (default: those of the first file)")
    q.add_argument("--floor", type=float, default=0.0, help="drop confidences below this")
    q.set_defaults(func=_blend_subs)

    p = subparsers.add_parser("report", help="HTML report (per-class AP, curves, co-occurrence, examples)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output folder (index.html and PNGs)")
    p.add_argument("--images", help="training images folder (default: <data root>/train)")
    p.add_argument("--examples", type=int, default=4, help="example cells per class (0: none)")
    _data_options(p)
    p.set_defaults(func=_report)

    p = subparsers.add_parser("explain", help="Grad-CAM per class and integrated gradients for an image's cells")
    p.add_argument("run", metavar="RUN_DIR", help="runs/<config>/fold<k>")
    p.add_argument("--image", required=True, help="image ID")
    p.add_argument("--cell", type=int, help="cell id (default: every cell)")
    p.add_argument("--class", dest="cls", type=int, help="class to explain (default: predicted classes)")
    p.add_argument("--images", help="images folder (default: <data root>/train)")
    p.add_argument("--masks", help="label maps folder (default: <work_dir>/masks/train)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/explain)")
    p.add_argument("--which", default="best", help="best | last | checkpoint path")
    p.add_argument("--threshold", type=float, default=0.5, help="probability that makes a class predicted")
    p.add_argument("--ig-steps", type=int, default=32)
    p.set_defaults(func=_explain)


def _cv(args: argparse.Namespace) -> int:
    from ..cv import cross_validate

    result = cross_validate(args.runs, args.labels, args.truth, args.masks, alpha=args.alpha,
                            progress=not args.json)
    print(result.to_json() if args.json else result.table())
    return 0


def _blend_runs(args: argparse.Namespace) -> int:
    from ..blend import DEFAULT_ALPHAS, blend_runs

    result = blend_runs(args.runs, args.out, alphas=DEFAULT_ALPHAS if args.alphas is None else args.alphas,
                        steps=args.steps, lofo=not args.no_lofo, labels_csv=args.labels,
                        truth_csv=args.truth, masks_dir=args.masks)
    print(result.summary())
    print(f"wrote {args.out}")
    return 0


def _blend_subs(args: argparse.Namespace) -> int:
    from ..blend import blend_submissions

    out = blend_submissions(args.submissions, args.out, args.weights, args.sample_submission, args.floor)
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..report import build_report

    path = build_report(args.runs, args.out, labels_csv=args.labels, images_dir=args.images,
                        masks_dir=args.masks, truth_csv=args.truth, examples_per_class=args.examples)
    print(f"wrote {path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from ..explain import explain_image

    paths = explain_image(args.run, args.image, cell=args.cell, cls=args.cls, images_dir=args.images,
                          out_dir=args.out, masks_dir=args.masks, which=args.which, threshold=args.threshold,
                          ig_steps=args.ig_steps)
    print(f"wrote {len(paths)} overlay(s) to {paths[0].parent if paths else args.out}")
    return 0
