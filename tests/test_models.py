"""Models: every architecture and every config in configs/, local pretrained weights, run folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpasc.config import ModelConfig, load_config, replace, save_config
from hpasc.losses import Criterion
from hpasc.models import ARCHITECTURES, ModelError, build_model, load_run, segment_mean

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
BIG = ("efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _marks(name: str):
    return [pytest.mark.slow] if name in BIG else []


@pytest.mark.parametrize("arch", [pytest.param(a, marks=_marks(a)) for a in ARCHITECTURES])
def test_architectures_give_19_logits_from_4_channels(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=arch, embedding_dim=32)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 4, 32, 32))
    assert out["logits"].shape == (2, 19)
    assert out["embedding"].shape == (2, 32)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(2), atol=1e-5)


def _config_params():
    params = []
    for path in CONFIGS:
        name = load_config(path).model.name
        params.append(pytest.param(path, id=path.stem, marks=_marks(name)))
    return params


@pytest.mark.parametrize("path", _config_params())
def test_every_config_builds_and_takes_a_training_step(path):
    cfg = load_config(path, ["model.pretrained=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    crit = Criterion(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.zeros(4, 19)
    target[[0, 1], 3] = 1
    target[[2, 3], 7] = 1
    before = model.classifier.weight.detach().clone()
    losses = crit(model(torch.rand(4, 4, 32, 32)), {"target": target})
    losses["loss"].backward()
    opt.step()
    assert torch.isfinite(losses["loss"]) and losses["loss"].item() > 0
    assert not torch.equal(before, model.classifier.weight)


def test_pretrained_from_local_file_adapts_the_stem(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False)  # 3 channels, 1000 classes
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="resnet10t", pretrained=str(path)))
    w3 = source.state_dict()["conv1.0.weight"]
    w4 = model.backbone.state_dict()["conv1.0.weight"]
    assert w4.shape[1] == 4
    # timm repeats the RGB filters over the 4 channels and rescales by 3/4
    assert torch.allclose(w4[:, :3], w3 * 0.75) and torch.allclose(w4[:, 3], w3[:, 0] * 0.75)
    deep = "layer4.0.conv2.weight"
    assert torch.equal(model.backbone.state_dict()[deep], source.state_dict()[deep])


def test_pretrained_from_an_own_run_checkpoint(tmp_path):
    cfg = ModelConfig(name="test_efficientnet", embedding_dim=8)
    torch.manual_seed(1)
    donor = build_model(cfg)
    torch.save({"model": donor.state_dict()}, tmp_path / "best.pt")
    torch.manual_seed(2)
    model = build_model(replace(cfg, pretrained=str(tmp_path / "best.pt"), embedding_dim=16))
    assert torch.equal(model.backbone.conv_stem.weight, donor.backbone.conv_stem.weight)
    assert model.embedder.weight.shape == (16, donor.embedder.weight.shape[1])  # head of another shape: fresh


def test_pretrained_missing_or_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_model(ModelConfig(name="resnet10t", pretrained=str(tmp_path / "nope.pth")))
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model(ModelConfig(name="no_such_net"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pth"):
        build_model(ModelConfig(name="resnet10t", pretrained=str(tmp_path / "bad.pth")))


def test_image_head_pools_the_cells_of_each_image():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="test_efficientnet", image_head=True)).eval()
    x = torch.rand(5, 4, 32, 32)
    groups = torch.tensor([0, 1, 0, 1, 1])
    with torch.no_grad():
        out = model(x, groups)
        feats = out["features"]
        expected = model.image_classifier(torch.stack([feats[[0, 2]].mean(0), feats[[1, 3, 4]].mean(0)]))
    assert out["image_logits"].shape == (2, 19)
    assert torch.allclose(out["image_logits"], expected, atol=1e-5)
    plain = build_model(ModelConfig(name="test_efficientnet"))
    assert "image_logits" not in plain(x, groups)
    with pytest.raises(ModelError, match="image head"):
        plain.image_logits(feats, groups)


def test_segment_mean_hand_computed():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    assert segment_mean(v, torch.tensor([1, 1, 0])).tolist() == [[10.0, 0.0], [2.0, 3.0]]


def test_load_run_round_trip(tmp_path):
    cfg = load_config(None, ["model.name=test_efficientnet", "model.embedding_dim=8"])
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    save_config(cfg, tmp_path / "config.yaml")
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    loaded_cfg, loaded = load_run(tmp_path)
    assert loaded_cfg.model == cfg.model and not loaded.training
    x = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["logits"], model(x)["logits"])
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_run(tmp_path, which="last")
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="unreadable"):
        load_run(tmp_path, which="last")
    with pytest.raises(ModelError, match="not a run folder"):
        load_run(tmp_path / "missing")
