"""The segmentation interface: the result type, the backend base class and the registry of backends.

A backend turns one ``H x W x 4`` float image into a :class:`Segmentation`. Backends are looked up by
name; the built-in ones live in modules imported only when first asked for, so ``classic`` never pulls
in torch. A backend object holds whatever it loaded (networks) and is reused across images:
:func:`get_backend` keeps one per (name, config) in the process.
"""
from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from ..config import SegmentationConfig
from ..io import integer_to_unit


@dataclass
class Segmentation:
    """Full-resolution result for one image.

    ``cells``: int32 ``H x W``, 0 = background, cells 1..n consecutive. ``nuclei``: int32 ``H x W``,
    nucleus pixels carry their cell's label (0 elsewhere). ``border[i]``: cell ``i + 1`` touches the image
    border. ``rel_area[i]``: area of cell ``i + 1`` / median cell area of the image.
    """

    cells: np.ndarray
    nuclei: np.ndarray
    border: np.ndarray
    rel_area: np.ndarray

    @property
    def n(self) -> int:
        """Number of cells."""
        return int(self.border.shape[0])


class Backend(ABC):
    """One segmentation method, built from a :class:`SegmentationConfig`."""

    name: str = ""

    def __init__(self, cfg: SegmentationConfig | None = None):
        self.cfg = cfg or SegmentationConfig(backend=self.name)
        if not 0 < self.cfg.scale <= 1:
            raise ValueError(f"segmentation.scale must be in (0, 1], got {self.cfg.scale}")

    @abstractmethod
    def segment(self, image: np.ndarray) -> Segmentation:
        """``H x W x 4`` float32 image in [0, 1] (red, green, blue, yellow) -> :class:`Segmentation`."""

    def __call__(self, image: np.ndarray) -> Segmentation:
        return self.segment(image)


# built-in backends: name -> module that registers it on import (imported lazily)
_BUILTIN_MODULES = {
    "classic": "hpasc.segmentation.classic",
    "hpacellseg": "hpasc.segmentation.hpacellseg",
    "cellpose": "hpasc.segmentation.cellpose_backend",
}
_REGISTRY: dict[str, type[Backend]] = {}
_INSTANCES: dict[tuple[str, SegmentationConfig], Backend] = {}
_MAX_INSTANCES = 4  # a process rarely needs more; each may hold a network
_LOCK = threading.Lock()  # inference segments in threads: build each backend (network) once


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator adding a backend to the registry under ``name``."""
    def deco(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available_backends() -> list[str]:
    """Names that :func:`get_backend` accepts."""
    return sorted(set(_BUILTIN_MODULES) | set(_REGISTRY))


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name`` (importing its module when built in)."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown segmentation backend {name!r}; "
                         f"available: {', '.join(available_backends())}") from None


def get_backend(name: str, cfg: SegmentationConfig | None = None) -> Backend:
    """A ready backend instance for ``name`` built from ``cfg`` (defaults when None).

    Instances are cached per (name, config) in this process so networks load once.
    """
    cls = backend_class(name)
    if cfg is None:
        cfg = SegmentationConfig(backend=name)
    key = (name, cfg)
    with _LOCK:
        backend = _INSTANCES.get(key)
        if backend is None:
            backend = cls(cfg)
            if len(_INSTANCES) >= _MAX_INSTANCES:
                _INSTANCES.pop(next(iter(_INSTANCES)))
            _INSTANCES[key] = backend
    return backend


def resolve_device(name: str = "auto"):
    """The backend's ``torch.device`` by the project's one rule (``hpasc.device``)."""
    from ..device import resolve_device as resolve

    return resolve(name, where="segmentation.device")


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` (area interpolation, each side at least 1 px), or ``image`` itself
    when that leaves its size unchanged: the working scale of a backend."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if size == (w, h) else cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an ``H x W x 4`` image and return it as float32 (integer images are scaled to [0, 1])."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"expected an H x W x 4 image (red, green, blue, yellow), got shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image too small to segment: {image.shape[1]}x{image.shape[0]} px")
    scaled = integer_to_unit(image)
    if scaled is not None:
        return scaled
    if image.dtype.kind != "f":
        raise ValueError(f"unsupported image dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image


def segment(image: np.ndarray, cfg: SegmentationConfig | None = None) -> Segmentation:
    """Segment one image with the backend named in ``cfg`` (default: ``classic``)."""
    cfg = cfg or SegmentationConfig()
    return get_backend(cfg.backend, cfg).segment(check_image(image))
