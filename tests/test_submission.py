"""Submission rows: building, writing, reading back and every validator error."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hpasc.cli import main
from hpasc.rle import decode_mask, encode_mask
from hpasc.submission import (
    COLUMNS,
    Problem,
    SubmissionError,
    image_prediction_string,
    prediction_string,
    read_submission,
    validate_submission,
    write_submission,
)


def _probs(*rows: dict[int, float]) -> np.ndarray:
    out = np.zeros((len(rows), 19), np.float32)
    for i, row in enumerate(rows):
        for c, p in row.items():
            out[i, c] = p
    return out


def test_prediction_string_by_hand():
    probs = _probs({0: 0.5, 16: 0.25}, {18: 1.0, 3: 0.001})
    s = prediction_string({1: "MA", 2: "MB"}, probs, [1, 2])
    assert s == "0 0.5 MA 16 0.25 MA 3 0.001 MB 18 1 MB"
    # floor keeps >= floor; zero never written
    assert prediction_string({1: "MA", 2: "MB"}, probs, [1, 2], floor=0.25) == "0 0.5 MA 16 0.25 MA 18 1 MB"
    # a sequence of encodings is aligned with the rows
    assert prediction_string(["X", "Y"], probs[::-1], [2, 1], floor=0.5) == "18 1 X 0 0.5 Y"
    assert prediction_string({}, np.zeros((0, 19)), []) == ""


def test_confidence_digits():
    probs = _probs({0: 0.123456789})
    probs = probs.astype(np.float64)
    probs[0, 0] = 0.123456789
    assert prediction_string(["M"], probs, [1]) == "0 0.1234568 M"
    assert prediction_string(["M"], probs, [1], digits=3) == "0 0.123 M"
    tiny = np.zeros((1, 19))
    tiny[0, 5] = 3.5e-9
    assert prediction_string(["M"], tiny, [1]) == "5 3.5e-09 M"


@pytest.mark.parametrize(
    "enc, probs, ids, message",
    [
        ({1: "M"}, np.zeros((1, 18)), [1], "shape"),
        ({1: "M"}, np.zeros((2, 19)), [1], "2 rows"),
        ({1: "M"}, np.full((1, 19), np.nan), [1], "NaN"),
        ({1: "M"}, np.ones((1, 19)), [2], "without a mask"),
        (["M", "N"], np.ones((1, 19)), [1], "2 encodings"),
    ],
)
def test_prediction_string_bad_input(enc, probs, ids, message):
    with pytest.raises(ValueError, match=message):
        prediction_string(enc, probs, ids)


def test_image_prediction_string_encodes_each_cell_once():
    labels = np.zeros((6, 8), np.int32)
    labels[1:3, 1:4] = 1
    labels[3:6, 5:8] = 4
    probs = _probs({2: 0.75}, {2: 0.5, 7: 0.125})
    s = image_prediction_string(labels, probs)  # rows follow the ids present: 1, 4
    tokens = s.split()
    assert tokens[0::3] == ["2", "2", "7"] and tokens[1::3] == ["0.75", "0.5", "0.125"]
    assert tokens[2] == encode_mask(labels == 1) and tokens[5] == tokens[8] == encode_mask(labels == 4)
    assert np.array_equal(decode_mask(tokens[5], 6, 8), labels == 4)
    # explicit ids pick and order rows
    s = image_prediction_string(labels, probs[::-1], cell_ids=[4, 1], floor=0.5)
    assert s == f"2 0.5 {tokens[5]} 2 0.75 {tokens[2]}"


@pytest.fixture
def sample(tmp_path):
    df = pd.DataFrame(
        {
            "ID": ["a", "b", "c"],
            "ImageWidth": [4, 6, 4],
            "ImageHeight": [4, 3, 4],
            "PredictionString": "0 1 eNoLCAgIMAEABJkBdQ==",
        }
    )
    path = tmp_path / "sample_submission.csv"
    df.to_csv(path, index=False)
    return path


def _mask(w: int, h: int, fill=slice(0, 2)) -> str:
    m = np.zeros((h, w), bool)
    m[fill] = True
    return encode_mask(m)


def test_write_submission_order_sizes_and_round_trip(tmp_path, sample):
    rows = {"c": f"0 0.5 {_mask(4, 4)}", "a": f"3 0.25 {_mask(4, 4)}"}
    out = tmp_path / "sub" / "submission.csv"
    df = write_submission(rows, sample, out, sizes={"a": (5, 7)})
    assert df.ID.tolist() == ["a", "b", "c"]
    back = read_submission(out)
    assert tuple(back.columns) == COLUMNS
    assert back.ID.tolist() == ["a", "b", "c"]
    assert back.ImageWidth.tolist() == [5, 6, 4] and back.ImageHeight.tolist() == [7, 3, 4]  # (w, h)
    assert back.PredictionString.tolist() == [rows["a"], "", rows["c"]]
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temporary left behind
    # a DataFrame sample works the same
    df2 = write_submission(rows, pd.read_csv(sample), tmp_path / "s2.csv")
    assert df2.ImageWidth.tolist() == [4, 6, 4]


def test_write_submission_rejects_unknown_ids(tmp_path, sample):
    with pytest.raises(SubmissionError, match="not in the sample"):
        write_submission({"zzz": ""}, sample, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_read_submission_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Width,Height,PredictionString\n")
    with pytest.raises(SubmissionError, match="bad.csv: header"):
        read_submission(bad)
    bad.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,12,-3,\n")
    with pytest.raises(SubmissionError, match=r"row 1 \(x\): ImageHeight '-3'"):
        read_submission(bad)
    with pytest.raises(SubmissionError, match="cannot read"):
        read_submission(tmp_path / "missing.csv")


def _write(path, rows) -> str:
    lines = [",".join(COLUMNS)] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_valid_submission_has_no_problems(tmp_path, sample):
    m = _mask(4, 4)
    rows = [("a", 4, 4, f"0 0.5 {m} 18 1e-05 {m}"), ("b", 6, 3, ""), ("c", 4, 4, f"5 1 {m}")]
    assert validate_submission(_write(tmp_path / "s.csv", rows), sample) == []


def test_validator_reports_each_problem_with_row_and_id(tmp_path, sample):
    good = _mask(4, 4)
    rows = [
        ("a", 4, 4, f"19 0.5 {good} x 0.5 {good} 0 nan {good} 0 high {good}"),
        ("b", 6, 4, f"0 0.5 {_mask(6, 4)}"),  # wrong height; the mask is checked at the sample's 6x3
        ("c", 4, 4, f"0 0.5 {_mask(4, 4, fill=slice(0, 0))} 1 0.5 garbage 2 0.5"),
        ("c", 4, 4, ""),
        ("d", 4, 4, ""),
    ]
    problems = validate_submission(_write(tmp_path / "s.csv", rows), sample)
    text = [str(p) for p in problems]
    by_row = {}
    for p in problems:
        by_row.setdefault(p.row, []).append(p.message)
    assert all(isinstance(p, Problem) for p in problems)
    assert any("class '19' is not an id" in m and "triples 1;" in m for m in by_row[1])
    assert any("class 'x'" in m for m in by_row[1])
    assert any("confidence 'nan' is not finite" in m and "triples 3;" in m for m in by_row[1])
    assert any("confidence 'high' is not a number" in m for m in by_row[1])
    assert any("size 6x4 differs from the sample's 6x3" in m for m in by_row[2])
    assert any("does not decode at 6x3" in m for m in by_row[2])
    assert by_row[3] == ["PredictionString has 8 tokens, not a multiple of 3 (class confidence mask)"]
    assert by_row[4] == ["duplicate ID (first at row 3)"]
    assert by_row[5] == ["ID is not in the sample submission"]
    assert "row 4 (c): duplicate ID (first at row 3)" in text
    assert len(problems) == 9


def test_validator_mask_problems(tmp_path, sample):
    rows = [("a", 4, 4, f"0 0.5 {_mask(4, 4, fill=slice(0, 0))} 1 0.5 garbage"), ("b", 6, 3, ""), ("c", 4, 4, "")]
    problems = validate_submission(_write(tmp_path / "s.csv", rows), sample)
    assert [p.row for p in problems] == [1, 1]
    assert "mask is empty (triples 1; 1 of 2)" in problems[0].message
    assert "does not decode at 4x4" in problems[1].message and "(triples 2; 1 of 2)" in problems[1].message


def test_validator_file_level_problems(tmp_path, sample):
    p = tmp_path / "s.csv"
    p.write_text("ID,PredictionString\na,\n")
    (problem,) = validate_submission(p, sample)
    assert problem.row == 0 and "header" in problem.message and str(problem).startswith("file: header")
    missing = validate_submission(_write(p, [("a", 4, 4, ""), ("c", 4, 4, "")]), sample)
    assert [(q.row, q.image_id, q.message) for q in missing] == [(0, "b", "ID of the sample submission is missing")]
    shuffled = validate_submission(_write(p, [("a", 4, 4, ""), ("c", 4, 4, ""), ("b", 6, 3, "")]), sample)
    assert len(shuffled) == 1 and "order (first difference at row 2)" in shuffled[0].message
    bad_size = validate_submission(_write(p, [("a", "four", 4, ""), ("b", 6, 3, ""), ("c", 4, 4, "")]), sample)
    assert [q.row for q in bad_size] == [1] and "are not integers in 1..65536" in bad_size[0].message
    assert validate_submission(tmp_path / "nope.csv", sample)[0].message.startswith("cannot read")


def test_validate_cli_exit_codes(tmp_path, sample, capsys):
    ok = _write(tmp_path / "ok.csv", [("a", 4, 4, ""), ("b", 6, 3, ""), ("c", 4, 4, "")])
    assert main(["validate", ok, "--sample-submission", str(sample)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.csv", [("a", 4, 4, "0 0.5"), ("b", 6, 3, ""), ("c", 4, 4, "")])
    assert main(["validate", bad, "--sample-submission", str(sample)]) == 1
    out = capsys.readouterr().out
    assert "row 1 (a): PredictionString has 2 tokens" in out and "1 problem(s)" in out


@pytest.mark.real_data
def test_real_sample_submission_round_trip(tmp_path, real_hpa):
    sample = real_hpa / "sample_submission.csv"
    first = read_submission(sample).iloc[0]
    w, h = int(first.ImageWidth), int(first.ImageHeight)
    m = np.zeros((h, w), bool)
    m[10:200, 30:90] = True
    out = write_submission({first.ID: f"0 0.9 {encode_mask(m)}"}, sample, tmp_path / "submission.csv")
    assert len(out) == 559
    assert validate_submission(tmp_path / "submission.csv", sample) == []


def test_validator_reports_a_non_ascii_digit_class_instead_of_crashing(tmp_path, sample):
    m = _mask(4, 4)
    problems = validate_submission(_write(tmp_path / "s.csv", [("a", 4, 4, f"\u00b2 0.5 {m}"), ("c", 4, 4, "")]),
                                   sample)
    assert any("class '\u00b2' is not an id" in p.message for p in problems)
