"""The one device rule, for training, inference, segmentation and explanations.

``auto`` is CUDA when it is available (the local rank's GPU under ``torchrun``) and the CPU otherwise,
so one config runs on a laptop and on a Kaggle GPU. An explicit ``cuda`` / ``cuda:N`` is a promise: when
CUDA is missing (or has no device N) that is a setup error, raised before any work, never a silent
run on the CPU at a tenth of the speed. The name itself is checked without importing torch, when a
config loads.
"""
from __future__ import annotations

import re

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d{1,2})?")


class DeviceError(ValueError):
    """A device name that is malformed, or asks for a CUDA device this machine does not have."""


def check_device_name(name: object, where: str = "device") -> str:
    """``name`` when it is one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``; else ``DeviceError``."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise DeviceError(f"{where}: unknown device {name!r}; choices: {DEVICE_CHOICES}")


def resolve_device(name: str = "auto", local_rank: int = 0, where: str = "device"):
    """A device name -> ``torch.device`` by the rule above (``local_rank`` picks the GPU of ``auto`` /
    ``cuda`` under DDP)."""
    import torch

    check_device_name(name, where)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{where} is {name!r} but CUDA is not available here; use auto or cpu")
    count = torch.cuda.device_count()
    device = torch.device(name if name != "auto" else "cuda")
    if device.index is None:
        return torch.device("cuda", local_rank % count)
    if device.index >= count:
        raise DeviceError(f"{where} is {name!r} but this machine has {count} CUDA device(s)")
    return device
