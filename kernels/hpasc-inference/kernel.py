"""hpasc inference kernel for the Kaggle competition "Human Protein Atlas - Single Cell Classification".

Inputs (attached in kernel-metadata.json; internet off):
  /kaggle/input/hpa-single-cell-image-classification/  test images + sample_submission.csv
  /kaggle/input/hpasc-wheels/                          hpasc and its dependencies as wheels
  /kaggle/input/hpasc-models/<config>/fold<k>/         config.yaml + best.pt of each trained run
                                                       (+ optional weights.yaml from hpasc blend)
Output: /kaggle/working/submission.csv

No logic of its own: install hpasc from the wheel dataset when it is not importable, then call
``hpasc.predict.predict_kaggle``. ``HPASC_KAGGLE_ROOT`` stands in for /kaggle (tests), and
``HPASC_TIME_BUDGET`` (seconds) overrides the default time budget.
"""
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

WHEELS_DATASET = "hpasc-wheels"  # the one name needed before hpasc (and hpasc.paths) can be imported


def kaggle_root() -> Path:
    return Path(os.environ.get("HPASC_KAGGLE_ROOT") or "/kaggle")


def ensure_installed(module: str = "hpasc", wheels: Path | None = None) -> None:
    """Import ``module``; when that fails, pip-install it offline from the wheels dataset."""
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    wheels = wheels or kaggle_root() / "input" / WHEELS_DATASET
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                           "--quiet", module])
    importlib.invalidate_caches()
    importlib.import_module(module)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_installed()
    from hpasc.cli import is_user_error
    from hpasc.predict import predict_kaggle

    try:
        print(f"wrote {predict_kaggle()}")
    except Exception as exc:
        if not is_user_error(exc):
            raise
        # a bad setup (no runs, unusable sample, missing weights, ...) stops here, named in one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
