"""The command line: every command group registers, and hpasc's own errors exit 2 without a traceback."""
import pytest

from hpasc.cli import COMMAND_MODULES, build_parser, main

COMMANDS = ("synth", "folds", "score", "validate", "segment", "cells", "train", "predict", "merge",
            "cv", "blend", "report", "explain", "demo")


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    # every group module adds commands of its own: none empty, none claimed twice, nothing else
    import argparse
    import importlib

    owned = []
    for name in COMMAND_MODULES:
        group = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"hpasc.cli.{name}").register(group)
        assert group.choices, f"cli.{name} registers no command"
        owned += list(group.choices)
    assert len(owned) == len(set(owned)) and set(owned) == set(sub.choices)


def test_scorer_modules_start_without_torch():
    """The scorer and the format stand alone: importing them must not pull in torch (DESIGN rule)."""
    import subprocess
    import sys

    modules = ["labels", "paths", "io", "rle", "submission", "metric", "cell_eval", "synthetic", "folds",
               "fsutil", "cli.fmt"]
    code = ("import sys; " + "; ".join(f"import hpasc.{m}" for m in modules)
            + "; bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')];"
            + " print(bad[:3]); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    assert main(["train", str(bad), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "epoch" in err and "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    code = main(["score", str(tmp_path / "truth.csv"), str(tmp_path / "sub.csv")])
    assert code == 2
    assert "truth.csv" in capsys.readouterr().err


def _parser_raising(exc):
    """A parser whose only command raises ``exc``: main's error handling seen in isolation."""
    import argparse

    def boom(_args):
        raise exc

    parser = argparse.ArgumentParser(prog="hpasc")
    parser.add_subparsers(dest="command").add_parser("boom").set_defaults(func=boom)
    return parser


def test_hpasc_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import hpasc.cli as cli
    from hpasc.config import ConfigError

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(ConfigError("x.yaml: unknown key(s) a")))
    assert main(["boom"]) == 2
    assert capsys.readouterr().err.strip() == "error: x.yaml: unknown key(s) a"
    monkeypatch.setenv("HPASC_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["boom"])
    monkeypatch.delenv("HPASC_DEBUG")
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_raising(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):  # not ours: a real bug shows its traceback
        main(["boom"])
