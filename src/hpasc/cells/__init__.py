"""Cells of a segmented image: crops (``crops``), a feature table (``features``) and the on-disk crop
cache (``cache``). The names below are the package's API; the modules are its rooms."""
from __future__ import annotations

from .cache import (
                    CACHE_VERSION,
                    CellCache,
                    CellCacheError,
                    build_cell_cache,
                    build_cells,
                    cache_key,
                    load_cell_cache,
                    masked_ids,
)
from .crops import (
                    NEIGHBOUR_MODES,
                    cell_boxes,
                    check_label_map,
                    extract_crops,
                    padded_window,
)
from .features import SHAPE_FEATURES, cell_table

__all__ = ["CACHE_VERSION", "NEIGHBOUR_MODES", "SHAPE_FEATURES", "CellCache", "CellCacheError",
           "build_cell_cache", "build_cells", "cache_key", "cell_boxes", "cell_table", "check_label_map",
           "extract_crops", "load_cell_cache", "masked_ids", "padded_window"]
