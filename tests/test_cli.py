"""The command line: every command group registers, and hpasc's own errors exit 2 without a traceback."""
import pytest

from hpasc.cli import COMMAND_MODULES, build_parser, main

COMMANDS = ("synth", "folds", "score", "validate", "segment", "cells", "train", "predict", "merge",
            "cv", "blend", "report", "explain", "demo")


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)
    assert len(COMMAND_MODULES) == 8


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
