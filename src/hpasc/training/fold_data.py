"""A config and a fold -> the training cells and the validation cells, with everything they need.

Segmentation and cropping happen once per dataset and are cached under ``data.work_dir``
(``masks/train/`` and ``cells/<backend>-s<size>-…/``); each fold then only selects rows of the cache.
Training uses the selection of ``cells.selection`` over the training folds; validation predicts *every*
cell of the held-out images (their image labels as weak targets), as the competition does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runs
from ..config import Config
from ..folds import COMPETITION, write_folds
from ..fsutil import read_csv
from ..labels import LabelError, multihot_matrix, parse_label
from ..paths import data_root, is_plain_id


class TrainDataError(ValueError):
    """Training data that does not fit the config (missing files, fold without images...)."""


@dataclass
class FoldData:
    """Crops (memory-mapped cache) plus the rows and targets of one fold's training and validation."""

    crops: np.ndarray  # (N, S, S, 4) uint8, the whole cache
    table: pd.DataFrame  # one row per crop: ID, cell_id, border, rel_area, Label, fold, ...
    train_rows: np.ndarray  # crop rows of the training selection
    train_targets: np.ndarray  # (n_train, 19)
    val_rows: np.ndarray  # crop rows of all cells of the validation images, image by image
    val_targets: np.ndarray  # (n_val, 19): the image labels of each cell
    masks_dir: Path
    images_dir: Path | dict[str, Path]  # one folder, or ID -> folder with several sources
    train_weights: np.ndarray | None = None  # per training row: its source's sampling weight (data.sources)

    @property
    def val_table(self) -> pd.DataFrame:
        return self.table.loc[self.val_rows]


def _source_csv(cfg: Config, source) -> Path:
    path = Path(source.train_csv)
    path = path if path.is_absolute() else Path(source.root) / path
    if not path.is_file():
        raise TrainDataError(f"data.sources {source.name}: train CSV {path} not found")
    return path


def source_folders(cfg: Config) -> dict[str, Path]:
    """Source name -> its images folder: ``COMPETITION`` -> ``data.root``'s ``train/``, each
    ``data.sources`` entry -> its root's ``train/``. Sources are told apart by name (folders, sampling
    weights, validation), so a repeated or reserved name is an error."""
    folders = {COMPETITION: data_root(cfg.data.root) / "train"}
    for source in cfg.data.sources:
        if source.name in folders:
            raise TrainDataError(f"data.sources: the name {source.name!r} is "
                                 + ("reserved for the competition images" if source.name == COMPETITION
                                    else "given to two sources"))
        folders[source.name] = Path(source.root) / "train"
    return folders


def image_sources(cfg: Config) -> dict[str, str]:
    """ID -> source name for the images of every ``data.sources`` entry (read from its train CSV); an
    image listed by none is a competition image."""
    out: dict[str, str] = {}
    for source in cfg.data.sources:
        csv = _source_csv(cfg, source)
        ids = read_csv(csv, "train CSV", TrainDataError, dtype={"ID": str}, usecols=["ID"])["ID"]
        for image_id in ids:
            if image_id in out:
                raise TrainDataError(f"{csv}: image {image_id!r} is also in source {out[image_id]}")
            out[image_id] = source.name
    return out


def _make_folds(cfg: Config, train_csv: Path) -> Path:
    """Folds of the competition images (and of every ``data.sources`` image, antibodies grouped) into the
    work dir."""
    n_folds = max(max(cfg.train.folds, default=0) + 1, 2)
    folds_path = runs.folds_file(cfg.data.work_dir)
    write_folds([train_csv, *(_source_csv(cfg, s) for s in cfg.data.sources)], folds_path,
                n_folds=n_folds, seed=cfg.train.seed)
    return folds_path


def read_folds(cfg: Config) -> pd.DataFrame:
    """``data.folds_csv`` (ID, Label, fold); made from ``data.train_csv`` (and the sources' train CSVs)
    into the work dir when absent."""
    root = data_root(cfg.data.root)
    folds_path = runs.resolve_data_file(cfg, cfg.data.folds_csv)
    if folds_path is None:
        train_csv = runs.resolve_data_file(cfg, cfg.data.train_csv)
        if train_csv is None:
            raise TrainDataError(f"neither folds ({cfg.data.folds_csv}) nor train csv ({cfg.data.train_csv}) "
                                 f"found under {root} or the working directory")
        folds_path = _make_folds(cfg, train_csv)
    folds = read_csv(folds_path, "folds CSV", TrainDataError, dtype={"ID": str, "Label": str})
    missing = [c for c in ("ID", "Label", "fold") if c not in folds]
    if missing:
        raise TrainDataError(f"{folds_path}: missing column(s) {', '.join(missing)}; expected ID,Label,fold")
    for r, (image_id, label) in enumerate(zip(folds["ID"], folds["Label"]), start=1):
        if not is_plain_id(image_id):
            raise TrainDataError(f"{folds_path}: row {r}: image ID {image_id!r} is not a plain name")
        try:
            parse_label(label)
        except LabelError as exc:
            raise TrainDataError(f"{folds_path}: row {r} ({image_id}): {exc}") from None
    fold_values = pd.to_numeric(folds["fold"], errors="coerce")
    bad = fold_values.isna() | (fold_values != fold_values.round()) | (fold_values < 0)
    if bad.any():
        r = int(np.flatnonzero(bad.to_numpy())[0])
        raise TrainDataError(f"{folds_path}: row {r + 1}: fold {folds['fold'].iat[r]!r} is not an integer >= 0")
    folds["fold"] = fold_values.astype(int)
    if cfg.data.max_images is not None:
        folds = folds.iloc[:cfg.data.max_images]
    folders = source_folders(cfg)
    sources = image_sources(cfg)
    folds["source"] = [sources.get(i, COMPETITION) for i in folds["ID"]]
    for name, first in folds.groupby("source", sort=False)["ID"].first().items():
        folder = folders[name]
        if not any(folder.glob(f"{first}_*")):
            raise TrainDataError(f"{folds_path}: image {first} ({name}) not found in {folder} "
                                 "(folds file of another dataset?)")
    return folds.reset_index(drop=True)


def training_images(cfg: Config, table: pd.DataFrame) -> Path | dict[str, Path]:
    """Where the images of ``table`` (ID and, with ``data.sources``, source: as ``read_folds`` gives)
    are: ``data.root``'s ``train/``, or with ``data.sources`` a mapping ID -> folder
    (``hpasc.io.image_folder``)."""
    folders = source_folders(cfg)
    if not cfg.data.sources or "source" not in table:
        return folders[COMPETITION]
    return {str(i): folders.get(name, folders[COMPETITION]) for i, name in zip(table["ID"], table["source"])}


def ensure_masks(cfg: Config, ids: list[str], images_dir, masks_dir: Path) -> list[str]:
    """Segment the training images once; returns the IDs that have masks (failures are left out)."""
    from ..segmentation.folder import mask_paths, segment_folder

    have = [i for i in ids if all(p.is_file() for p in mask_paths(masks_dir, i))]
    if len(have) < len(ids):  # segment_folder skips the images done and returns those with masks
        have = segment_folder(images_dir, masks_dir, cfg.segmentation, ids=ids,
                              workers=max(cfg.train.num_workers, 1))
    done = set(have)
    missing = [i for i in ids if i not in done]
    if missing:
        warnings.warn(f"{len(missing)} training image(s) without masks are left out, e.g. {missing[0]}",
                      stacklevel=2)
    return have


def prepare_cells(cfg: Config, build: bool = True):
    """The cell cache of the config's training images (built when ``build``, else only loaded: the other
    DDP ranks need neither the folds file nor the masks, which rank 0 has just made)."""
    from ..cells import build_cell_cache, load_cell_cache

    masks_dir = runs.masks_dir(cfg.data.work_dir, "train")
    cache_dir = runs.cells_cache_dir(cfg.data.work_dir, cfg.segmentation.backend, cfg.cells)
    if build:
        folds = read_folds(cfg)
        images_dir = training_images(cfg, folds)
        ids = ensure_masks(cfg, folds["ID"].tolist(), images_dir, masks_dir)
        cache = build_cell_cache(images_dir, masks_dir, ids, cfg.cells, cache_dir, labels=folds,
                                 workers=max(cfg.train.num_workers, 1))
    else:
        cache = load_cell_cache(cache_dir)
        images_dir = training_images(cfg, cache.table.drop_duplicates("ID"))
    return cache, images_dir, masks_dir


def with_truth_labels(cfg: Config, table: pd.DataFrame, masks_dir: Path) -> pd.DataFrame:
    """The cell table with ``truth_label`` (``hpasc.cells.truth``) from ``data.truth_csv``; the crop rows
    (the table's index) are kept."""
    from ..cells.truth import truth_cell_labels

    truth_csv = runs.resolve_data_file(cfg, cfg.data.truth_csv)
    if truth_csv is None:
        raise TrainDataError(f"cells.selection: truth needs data.truth_csv (cell-level truth of the training "
                             f"images), got {cfg.data.truth_csv!r}")
    ids = list(dict.fromkeys(table["ID"].astype(str)))
    matched = truth_cell_labels(truth_csv, masks_dir, ids).set_index(["ID", "cell_id"])["truth_label"]
    keys = pd.MultiIndex.from_arrays([table["ID"].astype(str), table["cell_id"].astype(np.int64)])
    return table.assign(truth_label=matched.reindex(keys).to_numpy())


def fold_data(cfg: Config, fold: int, cache, images_dir: Path, masks_dir: Path, round_: int = 0) -> FoldData:
    """Split a loaded cell cache into fold ``fold``'s training selection and validation cells; in a
    pseudo-label round (``round_`` >= 1) the training targets come from the round before
    (``hpasc.training.pseudo``)."""
    from ..data import select_cells

    table = cache.table
    if cfg.cells.selection == "truth":
        table = with_truth_labels(cfg, table, masks_dir)
    if "fold" not in table:
        raise TrainDataError(f"{cache.root}: the cell table has no fold column (labels not stored)")
    labelled = table[table["fold"].notna()]
    fold_col = labelled["fold"].astype(int)
    if not (fold_col == fold).any():
        raise TrainDataError(f"fold {fold}: no validation images (folds present: {sorted(fold_col.unique())})")
    train_table = labelled[fold_col != fold]
    train_rows, train_targets = select_cells(train_table, cfg.cells.selection, cfg.cells.max_cells_per_image,
                                             seed=cfg.train.seed)
    if len(train_rows) == 0:
        raise TrainDataError(f"fold {fold}: the selection {cfg.cells.selection!r} left no training cells")
    if round_ > 0:
        from .pseudo import round_targets

        train_targets = round_targets(cfg, round_, table, np.asarray(train_rows), train_targets).targets
    val = labelled[fold_col == fold]
    weights = None
    if cfg.data.sources:
        source = table["source"] if "source" in table else pd.Series(COMPETITION, index=table.index)
        skip = [s.name for s in cfg.data.sources if not s.validate]
        val = val[~source.loc[val.index].isin(skip)]
        weight_of = {s.name: s.weight for s in cfg.data.sources}
        weights = source.loc[train_rows].map(lambda n: weight_of.get(n, 1.0)).to_numpy(np.float64)
        if not (weights > 0).any():
            raise TrainDataError(f"fold {fold}: every training cell has sampling weight 0 (data.sources weights)")
        if (weights == 1.0).all():  # equal weights: keep the plain shuffle (without replacement)
            weights = None
    return FoldData(
        crops=cache.crops, table=table, train_rows=np.asarray(train_rows, np.int64),
        train_targets=np.asarray(train_targets, np.float32), val_rows=val.index.to_numpy(np.int64),
        val_targets=multihot_matrix(val["Label"].astype(str)), masks_dir=masks_dir, images_dir=images_dir,
        train_weights=weights)
