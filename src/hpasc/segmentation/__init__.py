"""Cell segmentation: one interface, backends by name, shared post-processing.

>>> from hpasc.segmentation import segment
>>> seg = segment(image)            # H x W x 4 float32 in [0, 1] -> Segmentation
>>> seg.cells, seg.nuclei, seg.border, seg.rel_area

Backends: ``classic`` (default, no weights), ``hpacellseg`` (local HPA Cell Segmentation ``.pth``
files), ``cellpose`` (local cellpose 3 model file). ``segment_folder`` / ``read_masks`` are the on-disk
form used by the rest of the pipeline (``MASKS_DIR/{ID}.png`` and ``{ID}_nuclei.png``, 16-bit).
"""
from __future__ import annotations

from .base import (
                   Backend,
                   Segmentation,
                   available_backends,
                   check_image,
                   get_backend,
                   register_backend,
                   segment,
)
from .folder import read_masks, segment_folder
from .postprocess import cell_stats, finalize, resize_labels
from .quality import f1_at_iou, iou_matrix, match_counts

__all__ = [
    "Backend", "Segmentation", "available_backends", "cell_stats", "check_image", "f1_at_iou",
    "finalize", "get_backend", "iou_matrix", "match_counts", "read_masks", "register_backend",
    "resize_labels", "segment", "segment_folder",
]
