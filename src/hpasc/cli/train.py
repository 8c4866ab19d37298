"""``hpasc train CONFIG [--fold K|all] [--round R|all] [--resume] [key=value ...]``."""
from __future__ import annotations

import argparse
import os


def _folds(text: str) -> str | list[int]:
    if text == "all":
        return "all"
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold: expected 'all', K or K1,K2,..., got {text!r}") from None


def _rounds(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        return [int(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round: expected 'all', R or R1,R2,..., got {text!r}") from None


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options sit between CONFIG and the overrides (``CONFIG --fold 1 train.epochs=3``), which
    plain argparse rejects: it would give the overrides their (empty) turn right after CONFIG."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # the intermixed parser calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a config's folds into <train.out_dir>/<name>/fold<k>/ "
                       "(pseudo-label rounds into .../<name>/round<r>/fold<k>/)")
    p.__class__ = _IntermixedParser
    p.add_argument("config", help="YAML config, e.g. configs/b0.yaml")
    p.add_argument("--fold", type=_folds, default="all",
                   help="fold to train: K, K1,K2 or all (= train.folds of the config; default)")
    p.add_argument("--round", type=_rounds, default=None, dest="rounds",
                   help="pseudo-label round(s) to train: R, R1,R2 or all (0 .. pseudo.rounds; default all). "
                   "Round R >= 1 learns from the out-of-fold cells of round R-1, so train that round's folds first")
    p.add_argument("--resume", action="store_true", help="continue from each run's last.pt (also mid-epoch)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..train import run_training

    # a bad config, data or checkpoint is one "error: ..." line and exit 2 (cli.main)
    runs = run_training(args.config, args.fold, resume=args.resume, overrides=tuple(args.overrides),
                        rounds=args.rounds)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        for run in runs:
            print(run)
    return 0
