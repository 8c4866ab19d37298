"""``hpasc synth`` (synthetic HPA world) and ``hpasc folds`` (folds.csv)."""
from __future__ import annotations

import argparse


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


def _folds(args: argparse.Namespace) -> int:
    from ..folds import write_folds

    folds = write_folds(args.train_csv, args.out, n_folds=args.n_folds, seed=args.seed, group=args.group,
                        keep=args.keep)
    sizes = folds["fold"].value_counts().sort_index().tolist()
    print(f"wrote {args.out}: {len(folds)} images, fold sizes {sizes}")
    return 0
