"""Hostile and careless input on the config surface: experiment YAML, ``--set`` overrides, a run's saved
``config.yaml``, folds and train CSVs, and ``--resume``. A typo fails when the config loads, naming the
key and the choices; a resume that cannot work fails before it touches the run folder."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from builders import hand_made_fold, tiny_cfg

from hpasc.cli import main
from hpasc.config import (
    CHOICES,
    Config,
    ConfigError,
    choices,
    load_config,
    replace,
    save_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# section class name -> its key in a config file, from the Config dataclass itself
SECTION_OF = {type(getattr(Config(), f.name)).__name__: f.name for f in dataclasses.fields(Config)
              if dataclasses.is_dataclass(getattr(Config(), f.name))}


def _is_list(key: str) -> bool:
    """The setting holds several choices (a list in YAML), from its field's default."""
    cls, name = key.split(".")
    section = getattr(Config(), SECTION_OF[cls])
    return isinstance(getattr(section, name), tuple)


def _dotted(key: str) -> str:
    cls, name = key.split(".")
    return f"{SECTION_OF[cls]}.{name}"


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_setting_rejects_a_typo_naming_key_and_choices(tmp_path, key):
    dotted = _dotted(key)
    known = choices(key)
    assert len(known) >= 2
    value = f"[{known[0]}, hflpi]" if _is_list(key) else "not_a_choice"
    with pytest.raises(ConfigError, match=rf"{dotted}.*unknown choice .*; choices: .*{known[-1]}"):
        load_config(None, [f"{dotted}={value}"])
    # the same typo inside a file, and inside a run's saved config.yaml
    path = tmp_path / "c.yaml"
    section, name = dotted.split(".")
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml: {section}\.{name}: unknown choice"):
        load_config(path)
    # every registered name is accepted
    for name_ok in known:
        ok = [name_ok] if _is_list(key) else name_ok
        assert load_config(None, [f"{dotted}={ok}"]) is not None


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs: -1 is not >= 1"),
    ("train.lr=.nan", "train.lr: expected a finite number"),
    ("train.lr=-0.1", "train.lr: -0.1 is not >= 0"),
    ("train.lr=.inf", "finite"),
    ("cells.size=0", "cells.size: 0 is not in"),
    ("cells.padding=3", "cells.padding"),
    ("cells.std=[0.1, 0.1, 0, 0.1]", "every value must be > 0"),
    ("cells.mean=[0.1]", "a list of 4 values"),
    ("model.dropout=1.5", "model.dropout"),
    ("inference.batch_size=0", "inference.batch_size"),
    ("segmentation.scale=0", "segmentation.scale"),
    ("train.device=gpu", "unknown device 'gpu'; choices: auto | cpu | cuda | cuda:N"),
    ("segmentation.device=cuda:x", "unknown device"),
    ("train.folds=[0, -1]", "train.folds"),
    ("train.batch_size=true", "expected an integer"),
])
def test_values_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        load_config(None, [override])


def test_replace_and_saved_configs_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="inference.recipe: unknown choice"):
        replace(Config(), **{"inference.recipe": "cel"})
    run = tmp_path / "fold0"
    save_config(Config(), run / "config.yaml")
    text = (run / "config.yaml").read_text().replace("recipe: cell_x_image", "recipe: cel_x_image")
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.yaml: inference\.recipe: unknown choice 'cel_x_image'"):
        load_config(run / "config.yaml")


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_non_utf8_config_folds_and_train_csv_are_one_line_errors(tmp_path, capsys, monkeypatch):
    bad_yaml = tmp_path / "latin.yaml"
    bad_yaml.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _one_line_error(capsys, ["train", str(bad_yaml)])
    train_csv = tmp_path / "train.csv"
    train_csv.write_bytes("ID,Label\nimg\xe9,0\n".encode("latin-1"))
    assert "train.csv" in _one_line_error(capsys, ["folds", str(train_csv), "--out", str(tmp_path / "f.csv")])
    from hpasc.training.fold_data import TrainDataError, read_folds

    folds = tmp_path / "folds.csv"
    folds.write_bytes("ID,Label,fold\nimg\xe9,0,0\n".encode("latin-1"))
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.folds_csv={folds}"])
    with pytest.raises(TrainDataError, match=r"folds\.csv: unreadable folds CSV"):
        read_folds(cfg)


@pytest.mark.parametrize("row, message", [
    ("../x,0,0", r"row 1: image ID '\.\./x' is not a plain name"),
    ("img1,0|99,0", r"row 1 \(img1\): label '0\|99'"),
    ("img1,0,one", "row 1: fold 'one' is not an integer"),
])
def test_bad_folds_rows_are_named(tmp_path, row, message):
    from hpasc.training.fold_data import TrainDataError, read_folds

    folds = tmp_path / "folds.csv"
    folds.write_text(f"ID,Label,fold\n{row}\n")
    with pytest.raises(TrainDataError, match=message):
        read_folds(load_config(None, [f"data.root={tmp_path}", f"data.folds_csv={folds}"]))


# --------------------------------------------------------------------------- --resume

def test_resume_with_a_changed_model_fails_before_writing(tmp_path):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    run = train_on(cfg, hand_made_fold(), tmp_path / "run", stop_after_steps=1)
    saved = (run / "config.yaml").read_bytes()
    last = (run / "last.pt").read_bytes()
    changed = replace(cfg, **{"model.embedding_dim": 32})
    with pytest.raises(ConfigError, match=r"--resume with changed settings \(model\.embedding_dim: 16 -> 32\)"):
        train_on(changed, hand_made_fold(), run, resume=True)
    assert (run / "config.yaml").read_bytes() == saved and (run / "last.pt").read_bytes() == last
    # a change that does not touch the weights' meaning is allowed (more epochs)
    train_on(replace(cfg, **{"train.epochs": 2}), hand_made_fold(), run, resume=True)
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["epoch"] == 2


def test_resume_without_last_pt_says_it_starts_over(tmp_path, caplog):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    with caplog.at_level(logging.WARNING, logger="hpasc.training"):
        train_on(cfg, hand_made_fold(), tmp_path / "fresh", resume=True)
    assert any("has no last.pt; starting this fold from scratch" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_of_another_model_is_a_named_error(tmp_path):
    from hpasc.train import train_on
    from hpasc.training.state import CheckpointError

    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    run = train_on(cfg, hand_made_fold(), tmp_path / "run", stop_after_steps=1)
    (run / "config.yaml").unlink()  # no saved config to compare: the checkpoint itself must not fit
    with pytest.raises(CheckpointError, match=r"last\.pt: does not fit this config's model"):
        train_on(replace(cfg, **{"model.embedding_dim": 32}), hand_made_fold(), run, resume=True)


def test_resume_sweeps_temporaries_a_kill_left(tmp_path):
    from hpasc.train import train_on

    cfg = tiny_cfg(tmp_path, "train.epochs=1")
    run = train_on(cfg, hand_made_fold(), tmp_path / "run", stop_after_steps=1)
    stale = [run / ".last.pt.abc123.tmp", run / ".log.csv.x.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run / "notes.txt"
    keep.write_text("mine")
    train_on(cfg, hand_made_fold(), run, resume=True)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
