"""The synthetic HPA world: 4-channel cell images with per-cell truth, in the competition's layout.

``synthesize`` writes a dataset (see ``world``); ``make_image`` / ``generate_image`` make one image in
memory (see ``render``). Geometry lives in ``layout``, the per-class green patterns in ``patterns``
(registry ``PAINTERS``), drawing helpers in ``draw``, the real label combinations in ``label_table``
and a per-class contact sheet in ``gallery``.
No torch here.
"""
from __future__ import annotations

from .label_table import label_combinations, sample_label_set
from .render import (
    SyntheticImage,
    assign_cell_labels,
    generate_image,
    image_label,
    make_image,
)
from .world import REAL_TEST_SIZES, SynthesisError, synthesize, truth_string

__all__ = [
    "REAL_TEST_SIZES", "SynthesisError", "SyntheticImage", "assign_cell_labels", "generate_image",
    "image_label",
    "label_combinations", "make_image", "sample_label_set", "synthesize", "truth_string",
]
