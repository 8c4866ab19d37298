"""``hpasc demo``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, end to end on a CPU")
    p.add_argument("--work", required=True, help="work folder (data, masks, runs, submission, report)")
    p.add_argument("--data", default=None,
                   help="an existing competition-layout folder (train/, test/, train.csv, sample_submission.csv; "
                   "scored and cell-evaluated when truth/test.csv exists) instead of a synthetic world")
    p.add_argument("--train", type=int, default=None, help="synthetic training images (default 512)")
    p.add_argument("--test", type=int, default=None, help="synthetic test images")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=None,
                   help="folds to train (default: as many as the training budget pays for, 2-4; a small "
                   "dataset also trains more epochs unless train.epochs=N is given)")
    p.add_argument("--config", default=None, help="training config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    kwargs = {k: v for k, v in (("n_train", args.train), ("n_test", args.test), ("size", args.size),
                                ("n_folds", args.folds)) if v is not None}
    result = run_demo(args.work, seed=args.seed, config_path=args.config, overrides=tuple(args.overrides),
                      data_dir=args.data, **kwargs)
    if result["validation_problems"]:
        return 1
    return 0 if result["beats_baselines"] in (True, None) else 1  # None: no truth to compare with
