"""``hpasc synth`` (synthetic HPA world), ``hpasc realism`` (it against real images) and ``hpasc folds``."""
from __future__ import annotations

import argparse


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write a synthetic dataset in the competition layout plus cell-level truth",
        description="Write OUT/train/, OUT/test/, OUT/train.csv, OUT/sample_submission.csv and "
        "OUT/truth/{train,test}.csv. Deterministic by seed.")
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=32, help="number of training images (default 32)")
    p.add_argument("--test", type=int, default=8, help="number of test images (default 8)")
    p.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-bits", type=int, choices=(8, 16), default=16,
                   help="bit depth of the test PNGs (the real test set is 16-bit)")
    p.add_argument("--heterogeneity", type=float, default=0.5,
                   help="0 = every cell carries all image labels; 1 = many cells drop labels or are "
                   "negative (default 0.5)")
    p.add_argument("--real-sizes", action="store_true",
                   help="test images of the real sizes (1728/2048/3072 px, real frequencies)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--gallery", action="store_true",
                   help="also write OUT/gallery.png: one example cell per class")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty OUT that hpasc synth did not write (its train/, test/, truth/ "
                   "and CSVs are replaced); an earlier synth output is always replaced")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser(
        "realism", help="field statistics of two image sources side by side (cell size, density, "
        "touching, solidity, channel intensities), e.g. real images against a synthetic world",
        description="Each source is an hpasc synth folder (its split's images and truth cells) or an "
        "images folder with {ID}.png / {ID}_cellmask.png label maps (in --*-masks, default the folder).")
    p.add_argument("reference", metavar="REFERENCE", help="e.g. the real HPA samples")
    p.add_argument("other", metavar="OTHER", help="e.g. a synthetic world")
    p.add_argument("--reference-masks", metavar="DIR", help="label maps of REFERENCE")
    p.add_argument("--other-masks", metavar="DIR", help="label maps of OTHER")
    p.add_argument("--split", choices=("train", "test"), default="train", help="split of a synthetic world")
    p.add_argument("--limit", type=_at_least_one, default=None, help="at most this many images per source")
    p.add_argument("--plot", metavar="PNG", help="also draw the measures and channel histograms")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.set_defaults(func=_realism)

    p = subparsers.add_parser(
        "folds", help="stratified folds.csv (ID,Label,fold) from one or several train CSVs",
        description="One train.csv: multilabel-stratified folds (how the committed folds.csv is made). "
        "Several (competition + `hpasc external`), or a group column: images of one antibody in one fold, "
        "classes balanced; --keep fixes the folds of images already split.")
    p.add_argument("train_csv", nargs="+", help="train CSVs (ID,Label[,source][,antibody])")
    p.add_argument("--group", default="antibody", help="column whose images share a fold (default antibody)")
    p.add_argument("--keep", metavar="FOLDS_CSV", help="keep these images' folds (e.g. the committed folds.csv)")
    p.add_argument("--out", required=True, help="folds CSV to write")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_folds)


def _synth(args: argparse.Namespace) -> int:
    from ..synthetic import synthesize

    # a SynthesisError (like every hpasc error) becomes one "error: ..." line and exit 2 in cli.main
    out = synthesize(args.out, args.train, args.test, size=args.size, seed=args.seed,
                     test_bits=args.test_bits, heterogeneity=args.heterogeneity,
                     real_sizes=args.real_sizes, workers=args.workers, gallery=args.gallery,
                     overwrite=args.overwrite)
    print(f"wrote {args.train} train and {args.test} test images to {out}")
    return 0


def _realism(args: argparse.Namespace) -> int:
    from ..synthetic import realism

    reference = realism.measure_source(args.reference, args.reference_masks, args.split, args.limit)
    other = realism.measure_source(args.other, args.other_masks, args.split, args.limit)
    rows = realism.compare(reference, other)
    print(realism.comparison_json(rows, reference, other) if args.json else realism.format_comparison(rows))
    if args.plot:
        print(f"plot: {realism.plot_comparison(reference, other, args.plot)}")
    return 0


def _folds(args: argparse.Namespace) -> int:
    from ..folds import write_folds

    folds = write_folds(args.train_csv, args.out, n_folds=args.n_folds, seed=args.seed, group=args.group,
                        keep=args.keep)
    sizes = folds["fold"].value_counts().sort_index().tolist()
    print(f"wrote {args.out}: {len(folds)} images, fold sizes {sizes}")
    return 0
