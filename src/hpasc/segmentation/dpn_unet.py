"""The HPA Cell Segmentation network, and loading its pickled ``.pth`` files without ``pytorch_zoo``.

The released files (``dpn_unet_nuclei_v1.pth``, ``dpn_unet_cell_3ch_v1.pth``) are whole pickled modules
whose classes live in ``pytorch_zoo`` (GitHub only, no licence). The network is a U-Net over a DPN-92 encoder: five encoder stages (stem; pool + conv2_x; conv3_x;
conv4_x; conv5_x + final BN-ReLU, 64/336/704/1552/2688 channels), four decoder stages (nearest 2x
upsampling + 3x3 conv + ReLU from one stage's width to the previous one's), each followed by a 3x3 conv
bottleneck over the concatenated skip connection back to that width, one more upsampling block and a
3x3 head with 3 outputs (background, touching borders, nuclei/cells). :class:`DPNUnet` rebuilds that
module tree with the same attribute names from timm's DPN-92 blocks, so the pickled parameter names and
shapes map one to one.

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

# output channels of the five encoder stages of pytorch_zoo's dpn92 U-Net; its decoder mirrors them
FILTERS = (64, 336, 704, 1552, 2688)


class ConvBottleneck(nn.Module):
    """3x3 conv + ReLU over [decoder features, encoder skip]: ``2f -> f`` channels."""

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
    """DPN-92-encoder U-Net with the module tree and tensor shapes of ``pytorch_zoo.unet.DPNUnet``.

    With ``f = FILTERS``: decoder stage ``l`` (1..4) upsamples ``f[l] -> f[l-1]`` channels, the bottleneck
    after it maps the concatenation with the encoder skip ``2 f[l-1] -> f[l-1]``, a last upsampling block
    keeps ``f[0]`` and a 3x3 convolution gives the ``num_classes`` logits (~139M parameters in all).
    Input ``(B, 3, H, W)`` with H, W multiples of 32; output ``(B, num_classes, H, W)``.
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
        f = FILTERS
        self.bottlenecks = nn.ModuleList([ConvBottleneck(2 * width, width) for width in reversed(f[:-1])])
        self.decoder_stages = nn.ModuleList([UnetDecoderBlock(f[k], f[k - 1]) for k in range(1, len(f))])
        self.last_upsample = UnetDecoderBlock(f[0], f[0])
        self.final = nn.Sequential(nn.Conv2d(f[0], num_classes, 3, padding=1))

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
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"{path}: weights do not fit the hpacellseg DPN-92 U-Net: {shown}")
    model.load_state_dict(OrderedDict((k, state[k]) for k in expected))
    return model.eval().to(device)


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Reproducible random weights for ``model``'s state dict, a function of tensor names, shapes and
    ``seed`` only (so any module with the same names and shapes, e.g. the original ``pytorch_zoo``
    network, gets bit-identical weights): He-normal convolutions, BatchNorm near identity with slightly
    varied statistics, small biases. For tests and golden outputs, not for segmenting."""
    import numpy as np

    out = {}
    names = sorted(model.state_dict().items())
    for index, (name, ref) in enumerate(names):
        rng = np.random.default_rng([seed, index])
        shape = tuple(ref.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            value = np.zeros(shape, np.int64)
        elif leaf == "weight" and len(shape) == 4:
            value = rng.normal(0.0, np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))), shape)
        elif leaf == "weight":  # BatchNorm scale
            value = rng.uniform(0.8, 1.2, shape)
        elif leaf == "running_var":
            value = rng.uniform(0.8, 1.2, shape)
        else:  # biases and running means
            value = rng.normal(0.0, 0.05, shape)
        out[name] = torch.from_numpy(np.asarray(value, dtype=np.int64 if leaf == "num_batches_tracked"
                                                else np.float32))
    return out
