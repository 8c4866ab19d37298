"""``hpacellseg`` backend: the HPA Cell Segmentation models from their local ``.pth`` files.

Reproduces the tool's inference (``CellSegmentator.pred_nuclei`` / ``pred_cells`` + ``label_cell``):
rescale by ``cfg.scale`` (0.25), reflect-pad to a multiple of 32, normalise with the DPN ImageNet
constants, blue x 3 for the nuclei network and (red, yellow, blue) for the cell network, softmax, crop,
resize back, then the seeded-watershed post-processing. Fixed on the way (the tool's known faults):

- the two border maps were added as uint8 and wrapped around (here: float probabilities);
- the resize back swapped width and height, wrong for non-square images (here: ``(w, h)``);
- cell labels were cast to uint8 and wrapped past 255 cells (here: int32 throughout);
- connected-component relabelling used 8-connectivity, merging cells that touch at a corner after their
  boundary was removed (here: 4-connectivity).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries, watershed

from ..config import SegmentationConfig
from .base import Backend, Segmentation, register_backend, rescale, resolve_device
from .postprocess import finalize, min_areas, relabel_consecutive

MEAN = np.array([124.0, 117.0, 104.0], np.float32) / 255.0  # the DPN ImageNet constants
STD = np.float32(1.0 / (0.0167 * 255.0))
PAD = 32


def prepare_input(channels: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """``H x W x 3`` float [0, 1] -> normalised ``(3, H', W')`` array (rescaled, reflect-padded by 32 on
    each side and up to a multiple of 32) and the (rows, cols) of the unpadded rescaled image."""
    channels = rescale(channels, scale)
    rows, cols = channels.shape[:2]
    pad = ((PAD, PAD + (-rows) % 32), (PAD, PAD + (-cols) % 32), (0, 0))
    padded = np.pad(channels, pad, mode="symmetric")  # = cv2.BORDER_REFLECT, any pad size
    return ((padded - MEAN) / STD).transpose(2, 0, 1).astype(np.float32), (rows, cols)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    return (yy * yy + xx * xx <= radius * radius).astype(np.uint8)


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero the labels with fewer than ``min_area`` pixels (labels keep their values)."""
    area = np.bincount(labels.ravel())
    small = area < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Cut the boundaries between labels, fill holes, relabel components (4-connected)."""
    cut = np.where(find_boundaries(labels), 0, labels)
    return ndi.label(ndi.binary_fill_holes(cut > 0))[0].astype(np.int32)


def _remove_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    holes, _ = ndi.label(~mask)
    area = np.bincount(holes.ravel())
    fill = area < max_hole
    fill[0] = False  # as skimage's remove_small_holes: small background pieces at the edge count too
    return mask | fill[holes]


def label_nuclei(nuc: np.ndarray, cell: np.ndarray, min_area: int) -> np.ndarray:
    """Nuclei label map from the nuclei and cell network probabilities (``H x W x 3`` float)."""
    border_free = (nuc[..., 1] + cell[..., 1]) < 0.95  # float: the uint8 sum wrapped in the tool
    seeds = nuc[..., 2] * border_free > 0.15
    seeds = _drop_small(ndi.label(seeds)[0], 500) > 0
    mask = _remove_small_holes(nuc[..., 2] > 0.4, 1000)
    mask = _drop_small(ndi.label(mask)[0], 8) > 0
    markers = ndi.label(seeds)[0]
    nuclei = watershed(mask.astype(np.uint8), markers, mask=mask, watershed_line=True)
    return relabel_consecutive(_drop_small(nuclei, min_area))


def label_cells(nuclei: np.ndarray, cell: np.ndarray, min_area: int) -> np.ndarray:
    """Cell label map grown from ``nuclei`` over the cell network probabilities."""
    prob = cell[..., 2]
    threshold = max(0.22, threshold_otsu(prob) * 0.5) if np.ptp(prob) > 0 else 0.22
    touching = cell[..., 1] > 0.05
    distance = np.maximum(prob, threshold)
    cells = watershed(-distance, nuclei, mask=(prob > threshold) & ~touching)
    cells = _drop_small(cells.astype(np.int32), min_area)
    cells = cv2.morphologyEx(cells.astype(np.float32), cv2.MORPH_CLOSE, _disk(6)).astype(np.int32)
    cells = _fill_label_holes(cells)
    # grow into the touching-border band so neighbouring cells meet
    cells = watershed(-distance, cells, mask=(cells > 0) | touching)
    cells = _fill_label_holes(cells.astype(np.int32))
    return _drop_small(cells, min_area)


@register_backend("hpacellseg")
class HpaCellSegBackend(Backend):
    """HPA Cell Segmentation DPN U-Nets (nuclei + 3-channel cell model) from local weight files."""

    def __init__(self, cfg: SegmentationConfig | None = None):
        super().__init__(cfg)
        from .dpn_unet import load_dpn_unet

        paths = {"segmentation.nuclei_weights": self.cfg.nuclei_weights,
                 "segmentation.cell_weights": self.cfg.cell_weights}
        for key, value in paths.items():
            if not value:
                raise ValueError(f"the hpacellseg backend needs {key} (a local .pth file; "
                                 "nothing is downloaded)")
            if not Path(value).is_file():
                raise FileNotFoundError(f"{value}: {key} file not found")
        self.device = resolve_device(self.cfg.device)
        self.nuclei_model = load_dpn_unet(self.cfg.nuclei_weights, self.device)
        self.cell_model = load_dpn_unet(self.cfg.cell_weights, self.device)

    def predict(self, model, channels: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``H x W x 3`` at the input's full resolution."""
        import torch

        h, w = channels.shape[:2]
        x, (rows, cols) = prepare_input(channels, self.cfg.scale)
        tensor = torch.from_numpy(x)[None]
        cuda = self.device.type == "cuda"
        if cuda:
            tensor = tensor.pin_memory()
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda):
            logits = model(tensor.to(self.device, non_blocking=True))
            prob = torch.softmax(logits.float(), dim=1)[0]
        prob = prob[:, PAD: PAD + rows, PAD: PAD + cols].permute(1, 2, 0).cpu().numpy()
        if (rows, cols) != (h, w):
            prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)  # (width, height)
        return np.ascontiguousarray(prob, dtype=np.float32)

    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cell) network probabilities for an ``H x W x 4`` image."""
        blue = image[..., 2]
        nuc = self.predict(self.nuclei_model, np.dstack([blue, blue, blue]))
        cell = self.predict(self.cell_model, np.ascontiguousarray(image[..., [0, 3, 2]]))
        return nuc, cell

    def segment(self, image: np.ndarray) -> Segmentation:
        nuc, cell = self.probabilities(image)
        min_cell, min_nucleus = min_areas(image.shape[:2], self.cfg)
        nuclei = label_nuclei(nuc, cell, min_nucleus)
        cells = label_cells(nuclei, cell, min_cell)
        return finalize(cells, nuclei, min_cell, min_nucleus)
