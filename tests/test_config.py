import pytest

from hpasc.config import Config, ConfigError, load_config, replace, save_config, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "exp1.yaml"
    path.write_text("model:\n  name: resnet50\ntrain:\n  epochs: 4\n  folds: [0, 2]\n")
    cfg = load_config(path, ["train.lr=0.01", "cells.size=64", "train.grad_clip=null"])
    assert cfg.name == "exp1"  # from the file name
    assert cfg.model.name == "resnet50"
    assert cfg.train.epochs == 4 and cfg.train.folds == (0, 2)
    assert cfg.train.lr == 0.01 and cfg.cells.size == 64 and cfg.train.grad_clip is None
    assert cfg.loss == Config().loss  # untouched sections keep their defaults


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train: unknown key\(s\) epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["nosuch.section=1"])


@pytest.mark.parametrize("override,message", [
    ("train.epochs=ten", "expected an integer"),
    ("train.epochs=2.5", "expected an integer"),
    ("train.amp=1", "expected true/false"),
    ("cells.mean=0.5", "expected a list"),
    ("model.name=null", "expected a string"),
    ("train.epochs", "expected key=value"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_save_load_round_trip_and_replace(tmp_path):
    cfg = load_config(None, ["name=rt", "inference.tta=[none, hflip]", "loss.class_weights=[" + ", ".join(["1"] * 18 + ["2"]) + "]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.inference.tta == ("none", "hflip") and again.loss.class_weights == (1.0,) * 18 + (2.0,)
    changed = replace(cfg, **{"train.epochs": 1})
    assert changed.train.epochs == 1 and cfg.train.epochs == Config().train.epochs  # frozen original
    assert to_dict(changed)["train"]["epochs"] == 1
