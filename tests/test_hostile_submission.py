"""Hostile and careless input on the format surface: submission, truth and sample files through
``validate``, ``score`` and ``blend``. Every case ends in a named one-line error (exit 2) or a named
problem row, never a traceback, a silent wrong value or an unbounded allocation."""
from __future__ import annotations

import base64
import time
import zlib

import numpy as np
import pandas as pd
import pytest

from hpasc.cli import main
from hpasc.metric import ScoreError, score
from hpasc.rle import MaskDecodeError, encode_mask, mask_runs
from hpasc.submission import (
    SubmissionError,
    parse_prediction_string,
    read_sample,
    read_submission,
    validate_submission,
)

H = W = 8


def _mask() -> str:
    m = np.zeros((H, W), bool)
    m[2:5, 1:6] = True
    return encode_mask(m)


def _write(path, rows, header="ID,ImageWidth,ImageHeight,PredictionString", encoding="utf-8"):
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


@pytest.fixture
def files(tmp_path):
    m = _mask()
    truth = _write(tmp_path / "truth.csv", [("a", W, H, f"0 {m}"), ("b", W, H, f"5|16 {m}")])
    sample = _write(tmp_path / "sample.csv", [("a", W, H, ""), ("b", W, H, "")])
    return tmp_path, truth, sample, m


def _cli_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` line on stderr and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _bomb(n_bytes: int) -> str:
    return base64.b64encode(zlib.compress(b"0" * n_bytes, 9)).decode()


# --------------------------------------------------------------------------- mask strings

def test_a_zlib_bomb_is_refused_before_it_inflates():
    bomb = _bomb(64 * 1024 * 1024)  # 64 MB of counts in ~65 KB: far beyond any 2048 px mask's need
    t = time.perf_counter()
    with pytest.raises(MaskDecodeError, match="inflates past"):
        mask_runs(bomb, 2048, 2048)
    assert time.perf_counter() - t < 1.0
    # the bound is what the image allows: the worst valid mask (every other pixel) still decodes
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(bool)
    starts, ends = mask_runs(encode_mask(checker), 64, 64)
    assert int((ends - starts).sum()) == 64 * 32


def test_bomb_in_a_submission_is_a_named_row_for_validate_and_a_one_line_score_error(files, capsys):
    tmp, truth, sample, m = files
    sub = _write(tmp / "sub.csv", [("a", W, H, f"0 0.9 {_bomb(4 * 1024 * 1024)}"), ("b", W, H, "")])
    problems = validate_submission(sub, sample)
    assert [(p.row, p.image_id) for p in problems] == [(1, "a")] and "inflates past" in problems[0].message
    assert "inflates past" in _cli_error(capsys, ["score", str(truth), str(sub)])


# --------------------------------------------------------------------------- tokens

@pytest.mark.parametrize("cls, conf, message", [
    ("100000000000000000000000", "0.5", "class '10000000000000000000' is not an id"),  # shown cut at 20
    ("-1", "0.5", "class '-1' is not an id"),
    ("١", "0.5", "is not an id"),  # a non-ASCII digit that int() would accept
    ("3", "-0.25", "confidence '-0.25' is negative"),
    ("3", "inf", "is not finite"),
    ("3", "1e400", "is not finite"),
    ("3", "0x10", "is not a number"),
])
def test_bad_tokens_are_named_by_every_reader(files, capsys, cls, conf, message):
    tmp, truth, sample, m = files
    sub = _write(tmp / "sub.csv", [("a", W, H, f"0 0.5 {m} {cls} {conf} {m}"), ("b", W, H, "")])
    (problem,) = validate_submission(sub, sample)
    assert problem.row == 1 and message in problem.message and "triples 2;" in problem.message
    line = _cli_error(capsys, ["score", str(truth), str(sub)])
    assert "submission a: triple 2:" in line and message in line
    with pytest.raises(SubmissionError, match="triple 2"):
        parse_prediction_string(f"0 0.5 {m} {cls} {conf} {m}")


@pytest.mark.parametrize("width", ["1e400", "100000000000000000000000", "-2048", "nan", "2048.5", "0"])
def test_image_sizes_that_are_not_small_positive_integers(files, capsys, width):
    tmp, truth, sample, m = files
    bad = _write(tmp / "bad.csv", [("a", width, H, ""), ("b", W, H, "")])
    with pytest.raises(SubmissionError, match=r"row 1 \(a\): ImageWidth .* is not an integer in 1\.\.65536"):
        read_submission(bad)
    line = _cli_error(capsys, ["score", str(bad), str(bad)])
    assert "row 1 (a)" in line and "ImageWidth" in line
    (problem,) = validate_submission(bad, sample)
    assert problem.row == 1 and "are not integers" in problem.message


def test_a_float_written_size_is_still_read(files):
    tmp, _, _, _ = files
    ok = _write(tmp / "ok.csv", [("a", "2048.0", "1728", "")])
    assert read_submission(ok)[["ImageWidth", "ImageHeight"]].values.tolist() == [[2048, 1728]]


def test_bad_truth_labels_are_one_line_errors(files, capsys):
    tmp, _, _, m = files
    truth = _write(tmp / "t.csv", [("a", W, H, f"0|99999999999999999999 {m}")])
    sub = _write(tmp / "s.csv", [("a", W, H, "")])
    line = _cli_error(capsys, ["score", str(truth), str(sub)])
    assert "truth a: pair 1" in line


# --------------------------------------------------------------------------- files and flags

def test_a_byte_order_mark_is_read_alike_by_score_and_validate(files):
    tmp, truth, sample, m = files
    rows = [("a", W, H, f"0 0.9 {m}"), ("b", W, H, "")]
    plain = _write(tmp / "plain.csv", rows)
    bom = _write(tmp / "bom.csv", rows, encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert validate_submission(bom, sample) == validate_submission(plain, sample) == []
    # classes 0, 5 and 16 have truth; only class 0 is predicted (and hit)
    assert score(truth, bom).mAP == score(truth, plain).mAP == pytest.approx(1 / 3)
    bom_sample = _write(tmp / "bom_sample.csv", [("a", W, H, ""), ("b", W, H, "")], encoding="utf-8-sig")
    assert validate_submission(plain, bom_sample) == []


def test_non_utf8_files_are_one_line_errors(files, capsys):
    tmp, truth, sample, m = files
    latin = tmp / "latin.csv"
    latin.write_bytes("ID,ImageWidth,ImageHeight,PredictionString\nä,8,8,\n".encode("latin-1"))
    assert "cannot read" in _cli_error(capsys, ["score", str(truth), str(latin)])
    assert "cannot read" in _cli_error(capsys, ["validate", str(latin), "--sample-submission", str(latin)])


@pytest.mark.parametrize("iou", ["nan", "2", "0", "-0.5"])
def test_iou_threshold_outside_0_1_is_refused(files, capsys, iou):
    _, truth, _, _ = files
    assert "IoU threshold" in _cli_error(capsys, ["score", str(truth), str(truth), "--iou", iou])


def test_duplicate_ids_in_the_sample_are_named_before_any_work(files, capsys):
    tmp, _, _, _ = files
    dup = _write(tmp / "dup.csv", [("a", W, H, ""), ("b", W, H, ""), ("a", W, H, "")])
    with pytest.raises(SubmissionError, match=r"row 3: duplicate ID 'a' \(first at row 1\)"):
        read_sample(dup)
    sub = _write(tmp / "sub.csv", [("a", W, H, ""), ("b", W, H, "")])
    assert "duplicate ID 'a'" in _cli_error(capsys, ["validate", str(sub), "--sample-submission", str(dup)])


@pytest.mark.parametrize("bad_id", ["../escape/x", "/tmp/abs", "a/b", "..", ".hidden", "C:x", "a\\b", ""])
def test_sample_ids_that_are_not_plain_names(tmp_path, bad_id):
    sample = tmp_path / "s.csv"
    pd.DataFrame({"ID": ["ok_1", bad_id], "ImageWidth": [8, 8], "ImageHeight": [8, 8],
                  "PredictionString": ["", ""]}).to_csv(sample, index=False)
    if bad_id == "":  # an empty ID cell
        with pytest.raises(SubmissionError, match="row 2"):
            read_sample(sample)
        return
    with pytest.raises(SubmissionError, match=r"row 2: image ID .* is not a plain name"):
        read_sample(sample)
    frame, bad = read_sample(sample, bad_ids="keep")  # the kernel's mode: named, kept for an empty row
    assert list(frame.ID) == ["ok_1", bad_id] and list(bad) == [bad_id]


def test_blend_names_bad_tokens(files, capsys):
    tmp, _, sample, m = files
    good = _write(tmp / "g.csv", [("a", W, H, f"0 0.9 {m}"), ("b", W, H, "")])
    bad = _write(tmp / "b.csv", [("a", W, H, f"100000000000000000000000 0.9 {m}"), ("b", W, H, "")])
    line = _cli_error(capsys, ["blend", "submissions", str(good), str(bad), "--out", str(tmp / "o.csv")])
    assert "is not an id" in line and not (tmp / "o.csv").exists()


def test_score_error_type_is_kept_for_library_callers(files):
    tmp, truth, _, m = files
    sub = _write(tmp / "s.csv", [("a", W, H, f"0 -1 {m}")])
    with pytest.raises(ScoreError, match="negative"):
        score(truth, sub)
