"""``hpasc score`` and ``hpasc validate``: the competition format on the command line."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="competition mAP of a submission against cell-level truth")
    p.add_argument("truth", help="truth CSV: ID,ImageWidth,ImageHeight,PredictionString (labels mask pairs)")
    p.add_argument("submission", help="submission CSV")
    p.add_argument("--verified", choices=("gt", "all"), default="gt",
                   help="gt (default): ignore predictions of classes absent from an image's truth; "
                   "all: count them as false positives")
    p.add_argument("--iou", type=float, default=0.6, help="mask IoU needed for a match (default 0.6)")
    p.add_argument("--json", action="store_true", help='print one line {"mAP": ..., "per_class_ap": {...}}')
    p.add_argument("--cells", action="store_true",
                   help="also the cell-level view: oracle mAP of these masks, pooled and within-image cell AUC")
    p.set_defaults(func=_score)

    v = subparsers.add_parser("validate", help="check a submission file against the sample submission")
    v.add_argument("submission", help="submission CSV")
    v.add_argument("--sample-submission", required=True, help="the competition's sample_submission.csv")
    v.set_defaults(func=_validate)


def _score(args: argparse.Namespace) -> int:
    from ..metric import score

    # ScoreError / SubmissionError (bad files) become one "error: ..." line and exit 2 in cli.main
    result = score(args.truth, args.submission, verified=args.verified, iou_threshold=args.iou)
    print(result.to_json() if args.json else result.table())
    if args.cells and not args.json:
        from ..cell_eval import evaluate_cells, format_cell_eval

        print(format_cell_eval(evaluate_cells(args.truth, args.submission, result.mAP)))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..submission import validate_submission

    problems = validate_submission(args.submission, args.sample_submission)  # unusable sample: exit 2
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.submission}")
        return 1
    print(f"{args.submission}: OK")
    return 0
