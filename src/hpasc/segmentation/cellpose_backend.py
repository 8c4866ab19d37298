"""``cellpose`` backend: a cellpose 3.x model (the small CPnet) from a local model file.

cellpose is an optional extra (``pip install hpasc[cellpose]``); v4 (Cellpose-SAM) is far too slow on a
CPU and is not supported. The model file must exist: cellpose itself silently falls back to downloading
its default model for a path it cannot find, so the path is checked first.

Input: the image at ``cfg.scale`` as two channels, cytoplasm = mean of red and yellow, nucleus = blue
(cellpose ``channels=[1, 2]``). ``cfg.cellpose_diameter`` is in full-resolution pixels (scaled with the
image here). None means automatic, as in the seeds: when cellpose's size model sits beside the model
file (its own names: ``<model>_size.npy``, or ``size_<name>.npy`` as for ``cyto3``), the diameter is
estimated per image from it (cellpose's ``SizeModel``, about three network passes instead of one);
without one, the model uses the mean training diameter saved in its file. Cellpose returns
cells only, so the nuclei are the classic backend's nuclear foreground; the shared rules then drop
cells without a nucleus.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import SegmentationConfig
from .base import Backend, Segmentation, register_backend, rescale, resolve_device
from .classic import nucleus_mask
from .postprocess import finalize, min_areas, resize_labels


def import_cellpose():
    """The cellpose ``models`` module (3.x), or an ImportError saying how to get it."""
    try:
        import cellpose
        from cellpose import models
    except ImportError as exc:
        raise ImportError("the cellpose backend needs the optional cellpose 3 package "
                          "(pip install 'hpasc[cellpose]')") from exc
    version = getattr(cellpose, "version", None) or getattr(cellpose, "__version__", "") or ""
    major = str(version).split(".")[0]
    if major.isdigit() and int(major) >= 4:
        raise ImportError(f"cellpose {version} is Cellpose-SAM (v4); the cellpose backend needs cellpose 3.x")
    return models


def size_model_file(model_path: Path) -> Path | None:
    """The cellpose size model of ``model_path`` under either of cellpose's names, or None."""
    for candidate in (model_path.with_name(model_path.name + "_size.npy"),
                      model_path.with_name(f"size_{model_path.name}.npy")):
        if candidate.is_file():
            return candidate
    return None


@register_backend("cellpose")
class CellposeBackend(Backend):
    """cellpose 3 CPnet from ``cfg.cellpose_model``."""

    def __init__(self, cfg: SegmentationConfig | None = None):
        super().__init__(cfg)
        path = self.cfg.cellpose_model
        if not path:
            raise ValueError("the cellpose backend needs segmentation.cellpose_model (a local model file; "
                             "nothing is downloaded)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: segmentation.cellpose_model file not found")
        models = import_cellpose()
        logging.getLogger("cellpose").setLevel(logging.WARNING)
        device = resolve_device(self.cfg.device)
        self.model = models.CellposeModel(pretrained_model=str(path), device=device, nchan=2,
                                          gpu=device.type == "cuda", mkldnn=False)
        size_path = None if self.cfg.cellpose_diameter else size_model_file(Path(path))
        self.size_model = (None if size_path is None
                           else models.SizeModel(self.model, pretrained_size=str(size_path)))

    def segment(self, image: np.ndarray) -> Segmentation:
        h, w = image.shape[:2]
        scale = self.cfg.scale
        small = rescale(image, scale)
        two = np.stack([(small[..., 0] + small[..., 3]) / 2, small[..., 2]], axis=-1).astype(np.float32)
        diameter = self.cfg.cellpose_diameter * scale if self.cfg.cellpose_diameter else None
        if diameter is None and self.size_model is not None:
            diameter = float(np.ravel(self.size_model.eval(two, channels=[1, 2], channel_axis=-1)[0])[0])
        masks, _flows, _styles = self.model.eval(
            two, channels=[1, 2], channel_axis=-1, diameter=diameter,
            flow_threshold=self.cfg.flow_threshold, cellprob_threshold=self.cfg.cellprob_threshold)
        cells = resize_labels(np.asarray(masks, dtype=np.int32), (h, w))
        nuclear = nucleus_mask(small[..., 2])
        nuclei = (np.zeros((h, w), np.int32) if nuclear is None
                  else resize_labels(nuclear.astype(np.int32), (h, w)))
        min_cell, min_nucleus = min_areas((h, w), self.cfg)
        return finalize(cells, nuclei, min_cell, min_nucleus)
