"""Submission rows: build them from cell masks and confidences, write, read and validate them.

A submission CSV has the columns ``ID,ImageWidth,ImageHeight,PredictionString``; the PredictionString of
an image is space-separated ``class confidence mask`` triples, one per (cell, class) kept, where ``mask``
is the competition encoding of the cell (``hpasc.rle``). It always lists exactly the IDs of the
sample_submission, in its order, with the real image width and height. No torch here.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .fsutil import atomic_path
from .labels import NUM_CLASSES, LabelError, parse_label
from .rle import MaskDecodeError, encode_label_map, mask_runs

COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
DEFAULT_DIGITS = 7  # significant digits of a confidence: float32 resolution, ranks survive the rounding


class SubmissionError(ValueError):
    """A submission (or truth / sample) file or row that cannot be used. Names the file or row."""


# ---------------------------------------------------------------------------------------------------
# building rows


def prediction_string(
    encodings: Mapping[int, str] | Sequence[str],
    probs: np.ndarray,
    cell_ids: np.ndarray | Sequence[int],
    floor: float = 0.0,
    digits: int = DEFAULT_DIGITS,
) -> str:
    """One image's PredictionString: a ``class confidence mask`` triple per cell and class kept.

    ``probs[i]`` holds the 19 class confidences of cell ``cell_ids[i]``; its mask is
    ``encodings[cell_ids[i]]`` for a mapping (e.g. from ``encode_label_map``) or ``encodings[i]`` for a
    sequence aligned with the rows. A class is kept when its confidence is ``>= floor`` and ``> 0``.
    Confidences are written with ``digits`` significant digits (``%.7g`` by default). Triples come in
    cell order, then class order.
    """
    probs = np.asarray(probs, dtype=np.float64)
    cell_ids = np.asarray(cell_ids).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must have shape (n_cells, {NUM_CLASSES}), got {probs.shape}")
    if probs.shape[0] != cell_ids.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows of probs but {cell_ids.shape[0]} cell ids")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    if isinstance(encodings, Mapping):
        missing = [int(c) for c in cell_ids if int(c) not in encodings]
        if missing:
            raise ValueError(f"cell ids without a mask encoding: {missing[:10]}")
        masks = [encodings[int(c)] for c in cell_ids]
    else:
        masks = list(encodings)
        if len(masks) != cell_ids.shape[0]:
            raise ValueError(f"{len(masks)} encodings for {cell_ids.shape[0]} cells")
    keep = (probs >= floor) & (probs > 0)
    fmt = f"%d %.{int(digits)}g %s"
    parts = [
        fmt % (c, probs[i, c], masks[i]) for i in range(probs.shape[0]) for c in np.flatnonzero(keep[i])
    ]
    return " ".join(parts)


def image_prediction_string(
    label_map: np.ndarray,
    probs: np.ndarray,
    cell_ids: np.ndarray | Sequence[int] | None = None,
    floor: float = 0.0,
    digits: int = DEFAULT_DIGITS,
) -> str:
    """Label map + per-cell confidences -> PredictionString, every mask encoded once.

    ``cell_ids`` defaults to the ids present in ``labels`` in ascending order (the row order of
    ``probs``).
    """
    encodings = encode_label_map(label_map)
    if cell_ids is None:
        cell_ids = np.fromiter(encodings, dtype=np.int64, count=len(encodings))
    return prediction_string(encodings, probs, cell_ids, floor=floor, digits=digits)


# ---------------------------------------------------------------------------------------------------
# files


MAX_SIDE = 65536  # a larger image side is a typo or an attack, never a microscope image


def parse_size(text: object) -> int | None:
    """An ``ImageWidth``/``ImageHeight`` cell -> int in 1..MAX_SIDE, or None. Accepts ``2048`` and
    ``2048.0`` (a float column), never ``1e400``, ``10**23`` or ``-5``."""
    text = str(text).strip()
    if text.endswith(".0"):
        text = text[:-2]
    if not (text.isascii() and text.isdecimal() and len(text) <= 6):
        return None
    value = int(text)
    return value if 0 < value <= MAX_SIDE else None


def read_submission(path: os.PathLike | str, kind: str = "submission") -> pd.DataFrame:
    """A ``ID,ImageWidth,ImageHeight,PredictionString`` CSV -> DataFrame (sizes int, strings str).

    Empty PredictionStrings stay ``""``; a UTF-8 byte-order mark is ignored (as by ``validate``).
    Raises ``SubmissionError`` naming the file when it cannot be read, its header differs or a size is
    not an integer in 1..MAX_SIDE (naming the row). ``kind`` only words the messages.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{kind} {path}: cannot read ({str(exc)[:200]})") from None
    if tuple(df.columns) != COLUMNS:
        raise SubmissionError(f"{kind} {path}: header is {','.join(df.columns)[:200]}, expected {','.join(COLUMNS)}")
    for col in ("ImageWidth", "ImageHeight"):
        values = [parse_size(v) for v in df[col]]
        bad = [i for i, v in enumerate(values) if v is None]
        if bad:
            i = bad[0]
            raise SubmissionError(f"{kind} {path}: row {i + 1} ({str(df.ID.iat[i])[:80]}): {col} "
                                  f"{str(df[col].iat[i])[:40]!r} is not an integer in 1..{MAX_SIDE}")
        df[col] = np.asarray(values, np.int64)
    return df


def read_sample(path: os.PathLike | str, bad_ids: str = "error") -> tuple[pd.DataFrame, dict[str, str]]:
    """The sample submission, checked before any long run: sizes, duplicate IDs and IDs that are not
    plain names (they become file names) are named with their rows.

    ``bad_ids="error"`` raises ``SubmissionError`` for the first bad ID; ``"keep"`` (the Kaggle kernel,
    which must still write every row) returns them as ``{ID: reason}`` beside the frame. Duplicates are
    always an error: no submission can be written for them.
    """
    from .paths import BadIDError, check_id

    if bad_ids not in ("error", "keep"):
        raise ValueError(f"bad_ids must be 'error' or 'keep', got {bad_ids!r}")
    sample = read_submission(path, kind="sample submission")
    first: dict[str, int] = {}
    bad: dict[str, str] = {}
    for r, image_id in enumerate(sample.ID, start=1):
        if image_id in first:
            raise SubmissionError(f"sample submission {path}: row {r}: duplicate ID {image_id[:80]!r} "
                                  f"(first at row {first[image_id]})")
        first[image_id] = r
        try:
            check_id(image_id)
        except BadIDError as exc:
            if bad_ids == "error":
                raise SubmissionError(f"sample submission {path}: row {r}: {exc}") from None
            bad[image_id] = str(exc)
    return sample, bad


def _sample_frame(sample: os.PathLike | str | pd.DataFrame) -> pd.DataFrame:
    if isinstance(sample, pd.DataFrame):
        missing = {"ID", "ImageWidth", "ImageHeight"} - set(sample.columns)
        if missing:
            raise SubmissionError(f"sample submission frame lacks columns {sorted(missing)}")
        return sample
    return read_submission(sample, kind="sample submission")


def write_submission(
    rows: Mapping[str, str],
    sample_submission: os.PathLike | str | pd.DataFrame,
    path: os.PathLike | str,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> pd.DataFrame:
    """Write ``rows`` (ID -> PredictionString) as a submission CSV, atomically; returns the frame.

    The file has exactly the sample's IDs in its order; IDs without a row get an empty
    PredictionString. Sizes come from ``sizes`` (ID -> (width, height), note the order) when given
    for an ID, otherwise from the sample's columns. An ID in ``rows`` that the sample lacks is an error
    (it would silently vanish otherwise).
    """
    sample = _sample_frame(sample_submission)
    ids = sample["ID"].astype(str).tolist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SubmissionError(f"sample submission has duplicate IDs, e.g. {dup[:80]!r}")
    unknown = sorted(set(rows) - set(ids))
    if unknown:
        raise SubmissionError(f"{len(unknown)} predicted IDs are not in the sample submission: {unknown[:5]}")
    widths = sample["ImageWidth"].astype(np.int64).to_numpy().copy()
    heights = sample["ImageHeight"].astype(np.int64).to_numpy().copy()
    if sizes:
        for i, image_id in enumerate(ids):
            if image_id in sizes:
                widths[i], heights[i] = (int(v) for v in sizes[image_id])
    out = pd.DataFrame(
        {
            "ID": ids,
            "ImageWidth": widths,
            "ImageHeight": heights,
            "PredictionString": [rows.get(i, "") for i in ids],
        }
    )
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return out


# ---------------------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a submission. ``row`` is the 1-based data row (0: the file as a whole)."""

    row: int
    image_id: str
    message: str

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row else "file"
        if self.image_id:
            where += f" ({self.image_id})"
        return f"{where}: {self.message}"


# ---------------------------------------------------------------------------------------------------
# parsing PredictionStrings (the one parser: validator, scorer, blending and the demo all use it)


def _class_problem(token: str) -> str | None:
    # isdecimal() alone admits non-ASCII digits and 10**23 would overflow int64 later: check the text
    if token.isascii() and token.isdecimal() and len(token) <= 2 and int(token) < NUM_CLASSES:
        return None
    return f"class {token[:20]!r} is not an id in 0..{NUM_CLASSES - 1}"


def _confidence(token: str) -> tuple[float, str | None]:
    try:
        value = float(token)
    except ValueError:
        return math.nan, f"confidence {token[:20]!r} is not a number"
    if not math.isfinite(value):
        return value, f"confidence {token[:20]!r} is not finite"
    if value < 0:
        return value, f"confidence {token[:20]!r} is negative"
    return value, None


@dataclass(frozen=True)
class Triples:
    """A parsed submission PredictionString: one entry per ``class confidence mask`` triple, in order."""

    classes: np.ndarray  # int64
    conf: np.ndarray  # float64, finite, >= 0
    masks: list[str]


def _tokens(text: object) -> list[str]:
    return text.split() if isinstance(text, str) else []


def parse_prediction_string(text: object, where: str = "PredictionString") -> Triples:
    """``"class confidence mask ..."`` -> ``Triples``; the first bad token raises ``SubmissionError``
    naming ``where`` and the triple. Masks are not decoded here (``hpasc.rle.mask_runs`` does that)."""
    tokens = _tokens(text)
    if len(tokens) % 3:
        raise SubmissionError(f"{where}: {len(tokens)} tokens, not `class confidence mask` triples")
    n = len(tokens) // 3
    classes = np.zeros(n, np.int64)
    conf = np.zeros(n, np.float64)
    for t in range(n):
        problem = _class_problem(tokens[3 * t])
        conf[t], conf_problem = _confidence(tokens[3 * t + 1])
        problem = problem or conf_problem
        if problem:
            raise SubmissionError(f"{where}: triple {t + 1}: {problem}")
        classes[t] = int(tokens[3 * t])
    return Triples(classes, conf, tokens[2::3])


def parse_truth_string(text: object, where: str = "truth") -> tuple[list[str], list[tuple[int, ...]]]:
    """Truth PredictionString (``labels mask`` pairs, labels ``|``-joined) -> (mask strings, labels per
    cell); ``SubmissionError`` naming ``where`` and the pair when a label is bad."""
    tokens = _tokens(text)
    if len(tokens) % 2:
        raise SubmissionError(f"{where}: PredictionString has {len(tokens)} tokens, not `labels mask` pairs")
    labels = []
    for k, token in enumerate(tokens[0::2]):
        try:
            labels.append(parse_label(token[:200]))
        except LabelError as exc:
            raise SubmissionError(f"{where}: pair {k + 1}: {exc}") from None
    return tokens[1::2], labels


def _row_problems(text: str, height: int | None, width: int | None) -> list[str]:
    """What is wrong with one PredictionString (masks checked at ``height x width`` when known)."""
    tokens = _tokens(text)
    if len(tokens) % 3:
        return [f"PredictionString has {len(tokens)} tokens, not a multiple of 3 (class confidence mask)"]
    found: dict[str, list[int]] = {}  # message -> 1-based triple numbers

    def note(msg: str | None, t: int) -> None:
        if msg:
            found.setdefault(msg, []).append(t)

    mask_state: dict[str, str | None] = {}  # mask string -> problem (None = fine), decoded once
    for t in range(len(tokens) // 3):
        cls, conf, mask = tokens[3 * t : 3 * t + 3]
        note(_class_problem(cls), t + 1)
        note(_confidence(conf)[1], t + 1)
        if height is None:
            continue
        if mask not in mask_state:
            try:
                starts, _ = mask_runs(mask, height, width)
                mask_state[mask] = None if len(starts) else "mask is empty"
            except MaskDecodeError as exc:
                mask_state[mask] = f"mask does not decode at {width}x{height}: {exc}"
        note(mask_state[mask], t + 1)
    out = []
    for msg, triples in found.items():
        more = f" (triples {', '.join(map(str, triples[:5]))}{', ...' if len(triples) > 5 else ''}"
        out.append(f"{msg}{more}; {len(triples)} of {len(tokens) // 3})")
    return out


def validate_submission(path: os.PathLike | str, sample_csv: os.PathLike | str) -> list[Problem]:
    """Everything wrong with a submission file, compared with the sample submission.

    Checks the header, that the IDs are exactly the sample's in its order (no duplicates, none missing
    or extra), that ImageWidth/ImageHeight match the sample, and for every triple: a class id in
    0..18, a finite confidence, and a mask that decodes at the image size (the sample's) and is not
    empty. An empty list means the file is fine.
    """
    path = Path(path)
    sample, _ = read_sample(sample_csv, bad_ids="keep")  # duplicate IDs in the sample: an error
    try:
        with open(path, encoding="utf-8-sig") as fh:
            header = fh.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(0, "", f"cannot read {path}: {exc}")]
    if header != ",".join(COLUMNS):
        return [Problem(0, "", f"header is {header!r}, expected {','.join(COLUMNS)!r}")]
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        return [Problem(0, "", f"cannot parse {path}: {str(exc)[:200]}")]

    problems: list[Problem] = []
    sample_size = {
        i: (int(w), int(h)) for i, w, h in zip(sample.ID, sample.ImageWidth, sample.ImageHeight)
    }
    seen: dict[str, int] = {}
    for r, (image_id, w_text, h_text, text) in enumerate(df.itertuples(index=False, name=None), start=1):
        msgs = []
        if image_id in seen:
            msgs.append(f"duplicate ID (first at row {seen[image_id]})")
        else:
            seen[image_id] = r
        size = sample_size.get(image_id)
        if size is None:
            msgs.append("ID is not in the sample submission")
        w, h = parse_size(w_text), parse_size(h_text)
        if w is None or h is None:
            msgs.append(f"ImageWidth/ImageHeight {w_text[:20]!r}/{h_text[:20]!r} are not integers in 1..{MAX_SIDE}")
            w = h = None
        elif size is not None and (w, h) != size:
            msgs.append(f"size {w}x{h} differs from the sample's {size[0]}x{size[1]}")
        if size is not None:
            w, h = size  # masks must decode at the real image size
        msgs += _row_problems(text, h, w)
        problems += [Problem(r, image_id, m) for m in msgs]

    missing = [i for i in sample.ID if i not in seen]
    file_level = [Problem(0, i, "ID of the sample submission is missing") for i in missing]
    if not missing and len(df) == len(sample):  # same IDs, each once
        order = df.ID.tolist()
        if order != sample.ID.tolist():
            first = next(k for k, (a, b) in enumerate(zip(order, sample.ID)) if a != b)
            file_level.append(
                Problem(0, "", f"IDs are not in the sample submission's order (first difference at row {first + 1})")
            )
    return file_level + problems
