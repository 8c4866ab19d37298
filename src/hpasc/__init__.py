"""hpasc: Human Protein Atlas single-cell classification.

Library first: every command of the ``hpasc`` CLI, the Kaggle kernel and the scripts call into
these modules. Heavy dependencies (torch, timm) are imported only by the modules that need them,
so ``hpasc.metric`` and ``hpasc.rle`` start fast and stand alone.
"""

__version__ = "0.1.0"
