"""``hpacellseg`` backend: the HPA Cell Segmentation models from their local ``.pth`` files.

By default it behaves as the original ``CellSegmentator`` (``pred_nuclei`` / ``pred_cells``) followed by
``hpacellseg.utils.label_cell`` — the tool that made the competition's masks — quirks included, because
a mask must match those to count (IoU >= 0.6). Step by step, as the original:

1. the 8/16-bit channels (blue x 3 for the nuclei network; red, yellow, blue for the cell network) are
   scaled by scikit-image's anti-aliased ``rescale`` (0.25) to float64 in [0, 1];
2. no padding when the scaled sides are multiples of 32 (2048 and 3072 px images), otherwise the
   original's ``padding=True`` layout: reflect 32 px on the top/left and ``32 - side % 32`` on the
   bottom/right (``segmentation.hpacellseg_padding: always`` pads every image that way); the original
   without padding fails on such sizes (1728 px), so nothing is lost by padding them;
3. normalised with the DPN ImageNet constants in float32, network, softmax (float32, no autocast);
4. back to full size: the nuclei maps are turned into uint8 and then resized with area interpolation,
   the cell maps resized (float) and then turned into uint8 — the original's order; channel 0 zeroed;
5. ``label_cell`` on the two uint8 maps, with the original's constants (seeds over 0.15 without
   border, nuclei over 0.4, 500/8/1000/2500/5500 px cut-offs, a disk(6) closing, Otsu / 2 >= 0.22 for
   cells) and its library calls, so it follows the installed scikit-image as the original does (0.26
   reads the positional size cut-offs as "at most", earlier versions as "below").

The original's faults that shape its masks are kept unless named in ``segmentation.hpacellseg_fixes``
(see :data:`FIXES`). One is always fixed, since it cannot give a usable mask: the resize back swapped
width and height (wrong shape for non-square images; square images are unaffected).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..config import SegmentationConfig
from ..io import integer_to_unit
from .base import Backend, Segmentation, register_backend, resolve_device
from .postprocess import cell_stats, finalize, min_areas

# normalisation of the original, built as it builds it (float64 constants rounded once to float32)
MEAN = np.array([124 / 255, 117 / 255, 104 / 255], np.float64).astype(np.float32)
STD = np.float32(1 / (0.0167 * 255))
PAD = 32
PADDING_MODES = ("auto", "always")

# the original's fixed cut-offs, in full-resolution pixels whatever the image size
SEED_MIN_AREA = 500
MASK_MIN_AREA = 8
MAX_HOLE = 1000
NUCLEUS_MIN_AREA = 2500
CELL_MIN_AREA = 5500

FIXES = {
    "float_border_sum": "the nuclei and cell border maps are summed as numbers; the original adds the "
                        "two uint8 maps, which wraps past 255 (0.6 + 0.6 reads as 0.2: 'no border')",
    "border_band": "the first cell watershed leaves out the touching-border band, as the original "
                   "meant to (its np.invert of an int8 0/1 mask gives -1/-2, both true: nothing is "
                   "left out)",
    "wide_labels": "cell labels stay int32; the original casts them to uint8 before the closing, so "
                   "past 255 nuclei label 256 vanishes and 257 merges with 1",
    "nucleus_required": "cells whose nucleus is below segmentation.min_nucleus_area are dropped and the "
                        "area cut-offs scale with the image side (the original keeps cells without a "
                        "nucleus and uses 2500/5500 px at any size)",
}


def skimage_float(image: np.ndarray) -> np.ndarray:
    """``image`` as the float that scikit-image makes of the 8/16-bit file it was read from.

    hpasc hands backends the float32 of each ``v / 255`` (or ``v / 65535``, :func:`hpasc.io.
    integer_to_unit`); scikit-image converts the integers itself (multiplying by the reciprocal, in
    float64). When every pixel is such a float32 of an integer, the integers are recovered exactly and
    converted by scikit-image; other float images are only widened. An 8-bit image also reads as the
    16-bit one with every value times 257; 8 bits are tried first (the training PNGs), the two readings
    differ at most in the last bit of a float64.
    """
    from skimage.util import img_as_float

    image = np.asarray(image)
    if image.dtype.kind in "ui":
        return img_as_float(image)
    for dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        ints = np.rint(image.astype(np.float64) * top)
        if ints.size and (ints.min() < 0 or ints.max() > top):
            continue
        ints = ints.astype(dtype)
        if np.array_equal(integer_to_unit(ints), image):
            return img_as_float(ints)
    return image.astype(np.float64)


def pad_layout(rows: int, cols: int, padding: str) -> tuple[int, int] | None:
    """(bottom, right) padding of the original's ``padding=True`` (top/left are 32), or None when the
    network takes the scaled image as it is."""
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown hpacellseg padding {padding!r}; choices: {' | '.join(PADDING_MODES)}")
    if padding == "auto" and rows % 32 == 0 and cols % 32 == 0:
        return None
    return PAD - rows % 32, PAD - cols % 32


def prepare_input(channels: np.ndarray, scale: float, padding: str = "auto"):
    """``H x W x 3`` image -> (network input ``(1, 3, H', W')`` float32 tensor, (rows, cols) of the
    scaled image, padded or not), as the original's ``_preprocess`` + normalisation."""
    import torch
    from skimage import transform

    image = skimage_float(channels)
    if scale != 1:
        image = transform.rescale(image, scale, channel_axis=-1)
    rows, cols = image.shape[:2]
    pad = pad_layout(rows, cols, padding)
    if pad is not None:
        image = cv2.copyMakeBorder(image, PAD, pad[0], PAD, pad[1], cv2.BORDER_REFLECT)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))[None]).float()
    x.sub_(torch.from_numpy(MEAN)[:, None, None]).div_(torch.from_numpy(np.full(3, STD))[:, None, None])
    return x, (rows, cols), pad is not None


def _as_ubyte(prob: np.ndarray) -> np.ndarray:
    from skimage.util import img_as_ubyte

    return img_as_ubyte(prob)


def restore(prob: np.ndarray, shape: tuple[int, int], quantize_first: bool) -> np.ndarray:
    """Network-scale softmax ``(h, w, 3)`` -> full-resolution uint8 ``H x W x 3`` (channel 0 zeroed),
    resized with area interpolation; ``quantize_first``: to uint8 before the resize (the original's
    nuclei maps) or after it (its cell maps)."""
    prob = np.array(prob, dtype=np.float32)
    if quantize_first:
        prob = _as_ubyte(prob)
    prob[..., 0] = 0
    if prob.shape[:2] != tuple(shape):
        prob = cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)  # (width, height)
    return prob if quantize_first else _as_ubyte(prob)


def golden_layout(prob: np.ndarray) -> np.ndarray:
    """How the golden outputs of the original (``scripts/hpacellseg_golden.py``, ``tests/data/
    hpacellseg_golden``) store a network-scale softmax ``(h, w, 3)``: the border and object maps on
    every second row and column, side by side."""
    sampled = prob[::2, ::2]
    return np.hstack([sampled[..., 1], sampled[..., 2]])


def _skimage_small(function, array: np.ndarray, size: int) -> np.ndarray:
    """``function(array, size)`` positionally, as the original calls ``remove_small_objects`` /
    ``remove_small_holes`` (the installed scikit-image decides what the number means)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0.26 deprecates the positional size; the original passes it
        return function(array, size)


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """The original's ``__fill_holes``: cut the label boundaries, fill holes, relabel (4-connected)."""
    from skimage.segmentation import find_boundaries

    cut = np.multiply(labels, np.invert(find_boundaries(labels)))
    return ndi.label(ndi.binary_fill_holes(cut > 0))[0]


def check_fixes(fixes) -> frozenset[str]:
    """``fixes`` as a set, or a ValueError naming the unknown ones and the choices."""
    unknown = sorted(set(fixes) - set(FIXES))
    if unknown:
        raise ValueError(f"unknown hpacellseg fix(es) {unknown}; choices: {' | '.join(FIXES)}")
    return frozenset(fixes)


def label_cell(nuclei_pred: np.ndarray, cell_pred: np.ndarray, fixes: frozenset[str] = frozenset(),
               min_nucleus_area: int = NUCLEUS_MIN_AREA,
               min_cell_area: int = CELL_MIN_AREA) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) label maps from the two uint8 ``H x W x 3`` maps, as ``hpacellseg.utils.
    label_cell``; ``nuclei`` carries each nucleus's cell label. ``fixes``: names from :data:`FIXES`."""
    from skimage import measure
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    check_fixes(fixes)
    nuc_border, cell_border = nuclei_pred[..., 1], cell_pred[..., 1]
    if "float_border_sum" in fixes:
        nuc_border = nuc_border.astype(np.float64)
    no_border = 1 - (nuc_border + cell_border) / 255.0 > 0.05  # uint8 + uint8 wraps, as the original

    # nuclei: seeds away from borders, grown by watershed inside the nuclear mask
    nuc = nuclei_pred[..., 2] / 255.0
    seeds = _skimage_small(remove_small_objects, nuc * no_border > 0.4 + -0.25, SEED_MIN_AREA)
    mask = _skimage_small(remove_small_holes, nuc > 0.4, MAX_HOLE)
    mask = _skimage_small(remove_small_objects, mask, MASK_MIN_AREA).astype(np.uint8)
    markers = ndi.label(seeds.astype(np.uint8), output=np.uint32)[0]
    nuclei = watershed(mask, markers, mask=mask, watershed_line=True)
    nuclei = measure.label(_skimage_small(remove_small_objects, nuclei, min_nucleus_area))

    # cells: grown from the nuclei over the cell map, then into the border band
    threshold = max(0.22, threshold_otsu(cell_pred[..., 2] / 255) * 0.5)
    region = cell_pred[..., 2] / 255 > threshold
    if "border_band" in fixes:
        region &= ~(cell_border / 255 > 0.05)
    distance = np.clip(cell_pred[..., 2], 255 * threshold, cell_pred[..., 2])
    cells = watershed(-distance, nuclei, mask=region)
    cells = _skimage_small(remove_small_objects, cells, min_cell_area)
    cells = cells.astype(np.int32 if "wide_labels" in fixes else np.uint8)
    cells = _fill_label_holes(closing(cells, disk(6)))
    cells = watershed(-distance, cells, mask=(cells > 0) | (cell_border / 255 > 0.05))
    cells = measure.label(_fill_label_holes(cells) > 0)
    cells = measure.label(_skimage_small(remove_small_objects, cells, min_cell_area)).astype(np.int32)

    # nuclei inside the final cells, relabelled and cut, then given their cell's label
    inside = measure.label(np.multiply(cells > 0, nuclei) > 0)
    inside = _skimage_small(remove_small_objects, inside, min_nucleus_area)
    return np.multiply(cells, inside > 0).astype(np.int32), cells


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
        pad_layout(32, 32, self.cfg.hpacellseg_padding)  # an unknown mode fails here, not per image
        self.fixes = check_fixes(self.cfg.hpacellseg_fixes)
        self.device = resolve_device(self.cfg.device)
        self.nuclei_model = load_dpn_unet(self.cfg.nuclei_weights, self.device)
        self.cell_model = load_dpn_unet(self.cfg.cell_weights, self.device)

    def _network(self, model, channels: np.ndarray) -> np.ndarray:
        """Softmax ``(h, w, 3)`` float32 at the network's scale, padding removed."""
        import torch

        x, (rows, cols), padded = prepare_input(channels, self.cfg.scale, self.cfg.hpacellseg_padding)
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.inference_mode():  # float32 as the original: AMP would move the maps by ~1e-3
            prob = torch.softmax(model(x.to(self.device, non_blocking=True)), dim=1)[0]
        prob = prob.permute(1, 2, 0).cpu().numpy()
        return prob[PAD: PAD + rows, PAD: PAD + cols] if padded else prob

    def network_maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cell) softmax maps at the network's scale for an ``H x W x 4`` image."""
        blue = image[..., 2]
        nuc = self._network(self.nuclei_model, np.dstack([blue, blue, blue]))
        cell = self._network(self.cell_model, np.ascontiguousarray(image[..., [0, 3, 2]]))
        return nuc, cell

    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nuclei, cell) uint8 ``H x W x 3`` maps at full size: ``pred_nuclei`` / ``pred_cells``."""
        nuc, cell = self.network_maps(image)
        shape = image.shape[:2]
        return restore(nuc, shape, quantize_first=True), restore(cell, shape, quantize_first=False)

    def segment(self, image: np.ndarray) -> Segmentation:
        nuc, cell = self.probabilities(image)
        if "nucleus_required" in self.fixes:
            min_cell, min_nucleus = min_areas(image.shape[:2], self.cfg)
        else:
            min_cell = self.cfg.min_cell_area or CELL_MIN_AREA
            min_nucleus = self.cfg.min_nucleus_area or NUCLEUS_MIN_AREA
        nuclei, cells = label_cell(nuc, cell, self.fixes, min_nucleus, min_cell)
        if "nucleus_required" in self.fixes:
            return finalize(cells, nuclei, min_cell, min_nucleus)
        return Segmentation(cells, nuclei, *cell_stats(cells))
