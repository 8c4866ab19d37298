"""Ensemble inference: test images -> segmented cells -> per-cell class confidences -> submission CSV.

``predict`` runs, for every image of the sample submission (or of one shard of it)::

    read -> segment (or read cached masks) -> crops per preprocessing -> encode masks
         -> [cells of several images batched] -> every model x TTA, weighted mean of sigmoids
         -> confidence recipe (hpasc.confidence) -> PredictionString

Reading, segmenting, cropping and encoding run in a few threads ahead of the models (numba, OpenCV and
torch release the GIL); only the crops and mask strings of an image wait for the models, never its
pixels, so memory stays bounded by a few images in flight.

**Never lose the submission.** Anything that goes wrong with one image (missing channel, unreadable PNG,
no cells, wrong size, a model returning NaN) gives that image an empty PredictionString and a warning
naming the image and the reason; the run goes on. The file is written atomically and validated at the
end; a row the validator rejects is emptied and the file rewritten.

**Time budget.** With ``time_budget`` the finish is projected from the images done so far; when it would
overrun, inference steps down a ladder of cheaper settings (no TTA, half of the models, the best model,
finally empty rows) so that a complete file is always written in time.

**Ensembles and weights.** A run folder is ``runs/<config>/fold<k>`` (``config.yaml`` + ``best.pt``);
``runs/<config>`` means all its folds. Each config is one member; its folds are averaged. The weights file
(written by ``hpasc blend``)::

    runs:            # member weight; "<config>" covers all its folds, "<config>/fold<k>" one fold
      b0: 0.7
      resnet50: 0.3
    alpha: 0.5       # optional: inference.alpha
    inference: {}    # optional: any other inference.* settings

Without it every config weighs the same. A weight of 0 leaves the run out.

**Shards.** ``shard=(i, n)`` predicts images ``i, i+n, i+2n, ...`` (0-based) of the sample submission and
writes a full-length file (other rows empty) plus ``<out>.shard.json``; ``merge`` puts the parts
together into exactly the file a single run writes.

Beside the submission, ``<out stem>.cells.csv`` keeps the ensemble's raw cell probabilities
(``ID, cell_id, p0..p18, border, rel_area``, the out-of-fold format plus two columns), read back by
``load_cell_probs``.

torch is imported only inside the functions that run models, so ``merge``, ``read_weights`` and
``load_cell_probs`` start fast.
"""
from __future__ import annotations

from ..tta import TTA_NAMES, apply_tta
from .budget import Budget, Level, degradation_ladder
from .chunks import (
                       ChunkOutput,
                       CropTensors,
                       available_cpus,
                       cpu_threads,
                       crop_key,
                       image_head_probs,
                       predict_chunk,
)
from .ensemble import (
                       WEIGHTS_KEYS,
                       Member,
                       PredictError,
                       expand_runs,
                       inference_config,
                       load_ensemble,
                       read_weights,
                       resolve_device,
)
from .image import Prepared, prepare_image
from .kaggle import predict_kaggle
from .runner import predict
from .shards import (
                       PROB_COLUMNS,
                       cells_path,
                       load_cell_probs,
                       merge,
                       parse_shard,
                       shard_path,
                       write_validated,
)

__all__ = ["PROB_COLUMNS", "TTA_NAMES", "WEIGHTS_KEYS", "Budget", "ChunkOutput", "CropTensors", "Level", "Member",
           "PredictError", "Prepared", "apply_tta", "available_cpus", "cells_path", "cpu_threads", "crop_key",
           "degradation_ladder", "expand_runs", "image_head_probs", "inference_config",
           "load_cell_probs", "load_ensemble", "merge", "parse_shard", "predict", "predict_chunk", "predict_kaggle",
           "prepare_image", "read_weights", "resolve_device", "shard_path", "write_validated"]
