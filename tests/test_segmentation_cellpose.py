"""cellpose backend against the real (optional) package, with a small randomly initialised CPnet."""
from __future__ import annotations

import pytest
from builders import two_cell_image

from hpasc.config import SegmentationConfig
from hpasc.segmentation import get_backend


def test_missing_model_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="segmentation.cellpose_model"):
        get_backend("cellpose", SegmentationConfig(backend="cellpose"))
    cfg = SegmentationConfig(backend="cellpose", cellpose_model=str(tmp_path / "cyto3"))
    with pytest.raises(FileNotFoundError, match="cyto3: segmentation.cellpose_model file not found"):
        get_backend("cellpose", cfg)


@pytest.mark.slow  # importing cellpose alone takes ~7 s of CPU
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # inside cellpose
def test_random_cpnet_from_a_file_runs(tmp_path):
    pytest.importorskip("cellpose", reason="cellpose (optional extra) not installed")
    import torch
    from cellpose.resnet_torch import CPnet

    torch.manual_seed(0)
    path = tmp_path / "cpnet_random"
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
    net.save_model(str(path))
    cfg = SegmentationConfig(backend="cellpose", cellpose_model=str(path), scale=1.0, device="cpu",
                             cellpose_diameter=30.0, min_cell_area=1, min_nucleus_area=1)
    backend = get_backend("cellpose", cfg)
    assert float(backend.model.diam_mean) == pytest.approx(30.0)
    img, _ = two_cell_image(size=96, gap=40)
    seg = backend.segment(img)
    assert seg.cells.shape == (96, 96) and seg.nuclei.shape == (96, 96)
    assert seg.border.shape == (seg.n,) and seg.rel_area.shape == (seg.n,)
    # whatever the random network finds, every kept cell holds nuclear pixels (the shared rule)
    for k in range(1, seg.n + 1):
        assert (seg.nuclei == k).any()


@pytest.mark.slow  # imports cellpose and runs the network three times
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")  # no masks
def test_automatic_diameter_uses_the_size_model_beside_the_file(tmp_path):
    pytest.importorskip("cellpose", reason="cellpose (optional extra) not installed")
    import dataclasses

    import numpy as np
    import torch
    from cellpose.resnet_torch import CPnet

    from hpasc.segmentation.cellpose_backend import CellposeBackend, size_model_file

    torch.manual_seed(0)
    path = tmp_path / "cpnet_random"
    CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0).save_model(str(path))
    cfg = SegmentationConfig(backend="cellpose", cellpose_model=str(path), scale=1.0, device="cpu",
                             min_cell_area=1, min_nucleus_area=1)
    assert size_model_file(path) is None and CellposeBackend(cfg).size_model is None
    # cellpose's size model: log-linear in the style vector; A = 0 makes its style estimate exactly
    # diam_mean * exp(ymean) = 60 px, which the size model then refines on the masks it finds
    np.save(tmp_path / "cpnet_random_size.npy", {"A": np.zeros(256), "smean": np.zeros(256),
                                                  "ymean": np.log(2.0), "diam_mean": 30.0})
    assert size_model_file(path) == tmp_path / "cpnet_random_size.npy"
    backend = CellposeBackend(cfg)
    estimates, used = [], []
    size_eval, model_eval = backend.size_model.eval, backend.model.eval
    backend.size_model.eval = lambda *a, **k: estimates.append(size_eval(*a, **k)) or estimates[-1]
    backend.model.eval = lambda *a, **k: used.append(k.get("diameter")) or model_eval(*a, **k)
    img, _ = two_cell_image(size=96, gap=40)
    backend.segment(img)
    assert len(estimates) == 1 and estimates[0][1] == pytest.approx(60.0)  # the style estimate
    assert used[-1] == pytest.approx(float(np.ravel(estimates[0][0])[0]))  # what the final pass used
    # an explicit diameter never loads the size model
    assert CellposeBackend(dataclasses.replace(cfg, cellpose_diameter=30.0)).size_model is None
