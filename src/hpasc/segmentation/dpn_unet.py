"""The HPA Cell Segmentation network, and loading its pickled ``.pth`` files without ``pytorch_zoo``.

The released files (``dpn_unet_nuclei_v1.pth``, ``dpn_unet_cell_3ch_v1.pth``) are whole pickled modules
whose classes live in ``pytorch_zoo`` (GitHub only, no licence). The network is a U-Net over a DPN-92
encoder: five encoder stages (stem; pool + conv2_x; conv3_x; conv4_x; conv5_x + final BN-ReLU), four
decoder stages (nearest 2x upsampling + 3x3 conv + ReLU) each followed by a bottleneck conv over the
concatenated skip connection, one more upsampling block and a 1x1 head with 3 outputs (unused, touching
borders, nuclei/cells). :class:`DPNUnet` rebuilds that module tree with the same attribute names from
timm's DPN-92 blocks, so the pickled parameter names map one to one.

:func:`load_pickled_state` reads such a file with a restricted unpickler: only the tensor-rebuilding
functions of torch and ``OrderedDict`` are real; every other class named in the pickle (``pytorch_zoo``,
``torch.nn`` modules, ``functools.partial``...) becomes an inert record of its attributes, from which
the parameters and buffers are collected. Nothing in the file is executed and ``pytorch_zoo`` is never
imported.
"""
from __future__ import annotations

import os
import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

# encoder output channels per stage and decoder widths of pytorch_zoo's dpn92 U-Net
ENCODER_FILTERS = (64, 336, 704, 1552, 2688)
DECODER_FILTERS = (64, 128, 256, 256)
LAST_UPSAMPLE = 64


class ConvBottleneck(nn.Module):
    """3x3 conv + ReLU over [decoder features, encoder skip]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        return self.seq(torch.cat([dec, enc], dim=1))


class UnetDecoderBlock(nn.Module):
    """Nearest 2x upsampling, 3x3 conv, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layer = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DPNUnet(nn.Module):
    """DPN-92-encoder U-Net with the attribute layout of ``pytorch_zoo.unet.DPNUnet``.

    Input ``(B, 3, H, W)`` with H, W multiples of 32; output logits ``(B, num_classes, H, W)``.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3):
        super().__init__()
        import timm

        blocks = timm.create_model("dpn92", pretrained=False, in_chans=in_channels).features
        named = list(blocks.named_children())

        def stage(prefix: str) -> list[nn.Module]:
            return [m for name, m in named if name.startswith(prefix)]

        stem = blocks.conv1_1
        self.encoder_stages = nn.ModuleList([
            nn.Sequential(stem.conv, stem.bn),  # bn carries the ReLU in timm
            nn.Sequential(blocks.conv1_pool, *stage("conv2_")),
            nn.Sequential(*stage("conv3_")),
            nn.Sequential(*stage("conv4_")),
            nn.Sequential(*stage("conv5_")),  # includes conv5_bn_ac
        ])
        f, d = ENCODER_FILTERS, DECODER_FILTERS
        self.bottlenecks = nn.ModuleList(
            [ConvBottleneck(f[-i - 2] + width, width) for i, width in enumerate(reversed(d))])
        self.decoder_stages = nn.ModuleList(
            [UnetDecoderBlock(f[k + 1] if k + 1 == len(d) else d[k + 1], d[k]) for k in range(len(d))])
        self.last_upsample = UnetDecoderBlock(d[0], LAST_UPSAMPLE)
        self.final = nn.Sequential(nn.Conv2d(LAST_UPSAMPLE, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder_stages:
            x = stage(x)
            if isinstance(x, tuple):  # dual-path blocks return (residual, dense) paths
                x = torch.cat(x, dim=1)
            skips.append(x)
        for i, bottleneck in enumerate(self.bottlenecks):
            x = self.decoder_stages[-(i + 1)](x)
            x = bottleneck(x, skips[-(i + 2)])
        return self.final(self.last_upsample(x))


# ------------------------------------------------------------------------ restricted unpickling

class PickledObject:
    """Stand-in for any class named in the pickle that is not on the allow list: keeps its state."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj._args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self._state = state if isinstance(state, dict) else {"_value": state}

    def __setitem__(self, key, value):  # subclasses of dict/OrderedDict fill themselves this way
        self.__dict__.setdefault("_items", {})[key] = value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"),
    ("torch", "Size"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
}
_STUBS: dict[tuple[str, str], type] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """Real objects only for tensor rebuilding; everything else is a :class:`PickledObject`."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)
        if key not in _STUBS:
            _STUBS[key] = type(name, (PickledObject,), {"__module__": f"pickled.{module}"})
        return _STUBS[key]


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


_PICKLE_MODULE = types.ModuleType("hpasc_restricted_pickle")
_PICKLE_MODULE.Unpickler = RestrictedUnpickler
_PICKLE_MODULE.load = _restricted_load


def _collect(obj, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    """Walk a pickled module record: ``_parameters``, ``_buffers``, then ``_modules`` recursively."""
    if depth > 64:
        raise ValueError("module tree too deep")
    state = getattr(obj, "_state", None)
    if not isinstance(state, dict):
        return
    for group in ("_parameters", "_buffers"):
        for name, tensor in (_as_dict(state.get(group)) or {}).items():
            if isinstance(tensor, torch.Tensor):
                out[prefix + name] = tensor.detach()
    for name, child in (_as_dict(state.get("_modules")) or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, depth + 1)


def _as_dict(value) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, PickledObject):
        return getattr(value, "_items", None)
    return None


def load_pickled_state(path: os.PathLike | str) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a whole-module ``.pth`` (or a plain state-dict file), by name.

    A ``DataParallel`` wrapper's ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        with warnings.catch_warnings():
            # files in torch's legacy (pre-1.6) format carry each module class's source for a check
            # against the installed class; the stand-ins have none, and nothing is run from them anyway
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            root = torch.load(path, map_location="cpu", pickle_module=_PICKLE_MODULE, weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable torch weights file ({type(exc).__name__}: {exc})") from exc
    state: dict[str, torch.Tensor] = {}
    if isinstance(root, dict) and root and all(isinstance(v, torch.Tensor) for v in root.values()):
        state = dict(root)
    else:
        _collect(root, "", state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise ValueError(f"{path}: no tensors found (expected a pickled DPN U-Net module)")
    return state


def load_dpn_unet(path: os.PathLike | str, device: torch.device | str = "cpu") -> DPNUnet:
    """A :class:`DPNUnet` in eval mode with the weights of ``path``; mismatches name the file."""
    state = load_pickled_state(path)
    head = state.get("final.0.weight")
    if head is None:
        raise ValueError(f"{path}: no 'final.0.weight' tensor: not an hpacellseg DPN U-Net")
    stem = state.get("encoder_stages.0.0.weight")
    model = DPNUnet(num_classes=head.shape[0], in_channels=stem.shape[1] if stem is not None else 3)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not fit the DPN-92 U-Net: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}, wrong shape {wrong[:5]}")
    model.load_state_dict(OrderedDict((k, state[k]) for k in expected))
    return model.eval().to(device)
