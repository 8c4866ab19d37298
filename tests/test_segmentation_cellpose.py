"""cellpose backend against the real (optional) package, with a small randomly initialised CPnet."""
from __future__ import annotations

import pytest

from hpasc.config import SegmentationConfig
from hpasc.segmentation import get_backend

from test_segmentation import two_cell_image


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
