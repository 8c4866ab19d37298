"""``cellpose`` backend: a cellpose 3.x model (the small CPnet) from a local model file.

cellpose is an optional extra (``pip install hpasc[cellpose]``); v4 (Cellpose-SAM) is far too slow on a
CPU and is not supported. The model file must exist: cellpose itself silently falls back to downloading
its default model for a path it cannot find, so the path is checked first.

Input: the image at ``cfg.scale`` as two channels, cytoplasm = mean of red and yellow, nucleus = blue
(cellpose ``channels=[1, 2]``). ``cfg.cellpose_diameter`` is in full-resolution pixels (scaled with the
image here). None means automatic, as in the seeds: when cellpose's size model sits beside the model
file (its own names: ``<model>_size.npy``, or ``size_<name>.npy`` as for ``cyto3``), the diameter is
estimated per image from it (cellpose's size model, about three network passes instead of one; its
file is a pickled dict, read here by a restricted unpickler that builds numpy arrays and nothing else,
so a crafted ``_size.npy`` cannot run code);
without one, the model uses the mean training diameter saved in its file. Cellpose returns
cells only, so the nuclei are the classic backend's nuclear foreground; the shared rules then drop
cells without a nucleus.
"""
from __future__ import annotations

import io
import logging
import pickle
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


SIZE_KEYS = ("A", "smean", "ymean", "diam_mean")

# what a size-model pickle may name: numpy's array and scalar rebuilders, nothing that runs code
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class SizeModelError(ValueError):
    """A cellpose size-model file that is not the plain numbers it should hold (names the file)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_size_params(path: Path) -> dict[str, np.ndarray]:
    """cellpose's ``<model>_size.npy`` -> ``{"A", "smean", "ymean", "diam_mean"}`` as float64 arrays.

    The file is an object ``.npy`` holding a pickled dict; it is read without ``allow_pickle``: the
    header by numpy, the payload by an unpickler that only rebuilds numpy arrays and scalars. Anything
    else (a class, a function, missing or non-numeric entries) raises ``SizeModelError``.
    """
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = read_header(fh)
        except ValueError as exc:
            raise SizeModelError(f"{path}: not a .npy file ({exc})") from None
        if dtype != np.dtype(object) or shape != ():
            raise SizeModelError(f"{path}: expected cellpose's pickled size dict, found a {dtype} array {shape}")
        try:
            payload = _NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()
        except Exception as exc:  # noqa: BLE001 - any failure of an untrusted pickle is the file's
            raise SizeModelError(f"{path}: not a plain cellpose size model ({exc})") from None
    params = payload.item() if isinstance(payload, np.ndarray) and payload.shape == () else payload
    if not isinstance(params, dict) or not set(SIZE_KEYS) <= set(params):
        raise SizeModelError(f"{path}: expected a dict with {', '.join(SIZE_KEYS)}")
    out = {}
    for key in SIZE_KEYS:
        value = np.asarray(params[key])
        if value.dtype.kind not in "fiu" or not np.isfinite(value).all():
            raise SizeModelError(f"{path}: {key} is not finite numbers ({value.dtype})")
        out[key] = value.astype(np.float64)
    return out


class SizeEstimator:
    """Cellpose's size model, on our reading of its file: a log-linear regression from the network's
    style vector to the object diameter, refined by the median diameter of the masks found at that size.
    ``eval`` returns (diameter, style estimate) as cellpose's ``SizeModel.eval`` does."""

    def __init__(self, model, params: dict[str, np.ndarray]):
        self.model = model
        self.params = params
        self.diam_mean = float(params["diam_mean"])

    def style_estimate(self, style: np.ndarray) -> float:
        p = self.params
        est = float(np.exp(p["A"] @ (np.ravel(style) - p["smean"]) + np.log(self.diam_mean) + p["ymean"]))
        est = max(5.0, est)
        return self.diam_mean if not np.isfinite(est) else est

    def eval(self, x: np.ndarray, channels, channel_axis):
        from cellpose import utils

        style = self.model.eval(x, channels=channels, channel_axis=channel_axis, resample=False,
                                compute_masks=False)[-1]
        by_style = self.style_estimate(style)
        masks = self.model.eval(x, channels=channels, channel_axis=channel_axis, resample=False,
                                rescale=self.diam_mean / by_style, diameter=None, interp=False)[0]
        diam = float(utils.diameters(masks)[0])
        return (self.diam_mean if diam == 0 or not np.isfinite(diam) else diam), by_style


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
                           else SizeEstimator(self.model, read_size_params(size_path)))

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
