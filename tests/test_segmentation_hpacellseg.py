"""hpacellseg backend: restricted loading of pickled modules, pre/post-processing, the whole backend."""
from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hpasc.config import SegmentationConfig
from hpasc.segmentation.dpn_unet import DPNUnet, load_dpn_unet, load_pickled_state
from hpasc.segmentation.hpacellseg import (
    MEAN,
    PAD,
    label_cells,
    label_nuclei,
    prepare_input,
)


class fake_package:
    """Register classes under a module name (like ``pytorch_zoo.unet``) for the duration of a save."""

    def __init__(self, name: str, **classes: type):
        self.name, self.classes = name, classes

    def __enter__(self):
        parts = self.name.split(".")
        self.added = [".".join(parts[: i + 1]) for i in range(len(parts))]
        for mod_name in self.added:
            sys.modules.setdefault(mod_name, types.ModuleType(mod_name))
        for cls_name, cls in self.classes.items():
            cls.__module__, cls.__qualname__, cls.__name__ = self.name, cls_name, cls_name
            setattr(sys.modules[self.name], cls_name, cls)
        return self

    def __exit__(self, *exc):
        for mod_name in self.added:
            sys.modules.pop(mod_name, None)


@pytest.mark.filterwarnings("error")  # also: no warning about the stand-ins' missing source code
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_restricted_loader_recovers_tensors_without_the_package(tmp_path, zipfile):
    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1))

    path = tmp_path / "tiny.pth"
    with fake_package("pytorch_zoo.unet", TinyNet=TinyNet):
        net = TinyNet()
        net.bn.running_mean.fill_(0.5)
        # the released files may predate torch 1.6's zip format: both layouts must load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy saving warns that it cannot find the source
            torch.save(nn.DataParallel(net), path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ModuleNotFoundError, match="pytorch_zoo"):
        torch.load(path, weights_only=False)  # the plain loader needs the package
    state = load_pickled_state(path)
    expected = net.state_dict()
    assert sorted(state) == sorted(expected)  # DataParallel's "module." prefix removed
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor)
    assert "pytorch_zoo" not in sys.modules


class _Evil:
    def __reduce__(self):
        import os

        return os.remove, (str(self.target),)


def test_restricted_loader_executes_nothing(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    _Evil.target = victim
    path = tmp_path / "evil.pth"
    torch.save({"payload": _Evil()}, path)
    with pytest.raises(ValueError, match="evil.pth: no tensors found"):
        load_pickled_state(path)
    assert victim.is_file()
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_pickled_state(tmp_path / "nothere.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a readable torch weights file"):
        load_pickled_state(tmp_path / "junk.pth")


@pytest.mark.slow  # builds the 49M-parameter network
def test_wrong_structure_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"final.0.weight": torch.zeros(3, 64, 1, 1), "x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other.pth: weights do not fit the DPN-92 U-Net"):
        load_dpn_unet(path)


def test_prepare_input_pads_reflects_and_normalises():
    img = np.zeros((40, 70, 3), np.float32)
    img[...] = MEAN  # normalises to exactly zero
    img[0, 0] = 1.0
    x, (rows, cols) = prepare_input(img, 1.0)
    assert (rows, cols) == (40, 70)
    assert x.shape == (3, 40 + 2 * PAD + 24, 70 + 2 * PAD + 26)
    assert x.shape[1] % 32 == 0 and x.shape[2] % 32 == 0
    assert x[0, PAD + 1, PAD + 1] == pytest.approx(0.0, abs=1e-6)
    corner = x[:, PAD, PAD]
    np.testing.assert_allclose(corner, (1.0 - MEAN) * 0.0167 * 255, rtol=1e-5)
    np.testing.assert_array_equal(x[:, PAD - 1, PAD - 1], corner)  # reflected (edge repeated)
    x, (rows, cols) = prepare_input(np.zeros((64, 128, 3), np.float32), 0.25)
    assert (rows, cols) == (16, 32) and x.shape == (3, 96, 96)


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_label_functions_on_hand_made_probabilities():
    shape = (200, 300)
    nuc = np.zeros(shape + (3,), np.float32)
    cell = np.zeros(shape + (3,), np.float32)
    centres = [(100, 90), (100, 210)]
    for cy, cx in centres:
        nuc[..., 2][_disk(shape, cy, cx, 25)] = 0.95
        cell[..., 2][_disk(shape, cy, cx, 70)] = 0.9
    band = np.abs(np.arange(300) - 150) <= 2  # touching border predicted between the two cells
    cell[:, band, 1] = 0.6
    cell[:, band, 2] = 0.3
    nuc[..., 0] = 1 - nuc[..., 2]
    nuclei = label_nuclei(nuc, cell, min_area=500)
    assert nuclei.max() == 2
    cells = label_cells(nuclei, cell, min_area=2000)
    assert len(np.unique(cells)) == 3
    left, right = cells[100, 90], cells[100, 210]
    assert left and right and left != right
    # each cell is its disk up to the border band, and they grow into the band
    union = _disk(shape, *centres[0], 70) | _disk(shape, *centres[1], 70)
    half = union & (np.arange(300) < 150)[None, :]
    pred = cells == left
    assert (pred & half).sum() / (pred | half).sum() > 0.9
    assert (cells[:, band] > 0).any()
    # more than 255 cells keep distinct labels (the tool wrapped them as uint8)
    many = np.zeros((510, 510), np.int32)
    grid = np.zeros((510, 510, 3), np.float32)
    k = 0
    for i in range(17):
        for j in range(17):
            k += 1
            many[i * 30 + 10: i * 30 + 20, j * 30 + 10: j * 30 + 20] = k
            grid[i * 30 + 6: i * 30 + 24, j * 30 + 6: j * 30 + 24, 2] = 0.9
    labelled = label_cells(many, grid, min_area=50)
    assert labelled.max() == 289 and len(np.unique(labelled)) == 290


def test_backend_requires_local_files(tmp_path):
    from hpasc.segmentation import get_backend

    with pytest.raises(ValueError, match="segmentation.nuclei_weights"):
        get_backend("hpacellseg", SegmentationConfig(backend="hpacellseg"))
    cfg = SegmentationConfig(backend="hpacellseg", nuclei_weights=str(tmp_path / "n.pth"),
                             cell_weights=str(tmp_path / "c.pth"))
    with pytest.raises(FileNotFoundError, match="n.pth"):
        get_backend("hpacellseg", cfg)


@pytest.mark.slow
def test_backend_loads_a_pickled_zoo_model_and_runs(tmp_path):
    from hpasc.segmentation import get_backend

    torch.manual_seed(0)

    class ZooUnet(DPNUnet):
        pass

    path = tmp_path / "dpn_unet_random.pth"
    with fake_package("pytorch_zoo.unet", DPNUnet=ZooUnet):
        model = ZooUnet(3).eval()
        torch.save(nn.DataParallel(model), path)
    cfg = SegmentationConfig(backend="hpacellseg", nuclei_weights=str(path), cell_weights=str(path),
                             scale=1.0, device="cpu", min_cell_area=20, min_nucleus_area=5)
    backend = get_backend("hpacellseg", cfg)
    image = np.random.default_rng(0).uniform(0, 1, (48, 80, 4)).astype(np.float32)
    nuc, cell = backend.probabilities(image)
    assert nuc.shape == (48, 80, 3) and cell.shape == (48, 80, 3)  # non-square: no width/height swap
    np.testing.assert_allclose(nuc.sum(axis=2), 1.0, atol=1e-4)
    x, _ = prepare_input(np.dstack([image[..., 2]] * 3), 1.0)
    with torch.inference_mode():
        reference = torch.softmax(model(torch.from_numpy(x)[None]), 1)[0, :, PAD: PAD + 48, PAD: PAD + 80]
    np.testing.assert_allclose(nuc, reference.permute(1, 2, 0).numpy(), atol=1e-5)
    seg = backend.segment(image)
    assert seg.cells.shape == (48, 80) and seg.cells.dtype == np.int32
    assert seg.border.shape == (seg.n,)


def test_label_nuclei_adds_border_probabilities_without_wrapping():
    """The tool summed the two border maps as uint8: 0.6 + 0.6 (153 + 153) wrapped to 50, which read as
    'no border' and seeded a nucleus under a strong border. As probabilities the sum is 1.2: no seed."""
    shape = (120, 120)
    nuc = np.zeros(shape + (3,), np.float32)
    cell = np.zeros(shape + (3,), np.float32)
    nuc[..., 2][_disk(shape, 60, 60, 30)] = 0.95
    assert label_nuclei(nuc, cell, min_area=100).max() == 1  # a clear nucleus is found
    nuc[..., 1] = cell[..., 1] = 0.6
    assert label_nuclei(nuc, cell, min_area=100).max() == 0
