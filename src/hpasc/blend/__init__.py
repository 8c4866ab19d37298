"""Ensemble blending, two rooms: weights over runs from out-of-fold predictions (``weights``) and
averaging of submission files (``submissions``)."""
from __future__ import annotations

from .errors import BlendError
from .submissions import (
                      MATCH_IOU,
                      blend_image,
                      blend_submissions,
                      cell_confidences,
                      format_cells,
)
from .weights import (
                      DEFAULT_ALPHAS,
                      BlendResult,
                      FoldObjective,
                      blend_runs,
                      coordinate_search,
                      search_weights,
                      write_weights,
)

__all__ = ["DEFAULT_ALPHAS", "MATCH_IOU", "BlendError", "BlendResult", "FoldObjective", "blend_image",
           "blend_runs", "blend_submissions", "cell_confidences", "coordinate_search", "format_cells",
           "search_weights", "write_weights"]
