"""Tables (CSV or Parquet) as feature batches for tabular pretraining (T-JEPA: Thimonier et al.,
"T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data", ICLR 2025).

A table of F feature columns is the token grid (1, 1, F) (see :mod:`mim.types`): feature j is token j, numeric
features first, then categorical ones, each group in the order of the file's columns.

The preprocessing (:class:`~mim.data.table_preprocess.TablePreprocessor`, see :mod:`mim.data.table_preprocess`
for the rules) is fitted on the TRAINING split only and applied to every split. Its fitted state is a dict of
plain python types that the datamodule's ``state_dict`` / ``load_state_dict`` hand to Lightning, so a checkpoint
carries it and ``torch.load(..., weights_only=True)`` can read it; a restored datamodule transforms exactly as
the original.

Batches (:class:`~mim.data.table_preprocess.TableBatch`) are dicts::

    {"numeric": (B, Fn) float32, "numeric_missing": (B, Fn) bool, "categorical": (B, Fc) int64,
     "label": (B,) int64 (classification) or float32 (regression)  # only when label_column is set}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from mim.checks import check_choice, check_range, invalid
from mim.data.base import (
    HeldOutLoadersMixin,
    MapResumeMixin,
    SampleKey,
    check_loader_settings,
    eval_loader,
    loader_kwargs,
    sample_key,
)
from mim.data.table_preprocess import LabelTask, TableBatch, TablePreprocessor, infer_column_kinds

__all__ = ["TableDataModule", "TableDataset", "read_table", "sklearn_table"]

SklearnTable = Literal["breast_cancer", "wine", "iris", "diabetes"]


# ------------------------------------------------------------------------------------------------ reading


def read_table(path: str | Path, *, field: str = "path") -> pd.DataFrame:
    """Read a ``.csv`` or ``.parquet`` / ``.pq`` file into a DataFrame (format chosen by suffix).

    Raises:
        FileNotFoundError: when ``path`` does not exist (the message names it).
        ValueError: for an unknown suffix, or a table without rows or columns.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"TableDataModule.{field}: {str(path)!r} is a folder; give one .csv or .parquet file (one row per sample)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"TableDataModule.{field}: table file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise ValueError(f"TableDataModule.{field}: table {str(path)!r} is empty (no header, no rows)") from None
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(
            f"TableDataModule.{field}: unknown table format {suffix!r} of {str(path)!r}; use .csv, .parquet or .pq"
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"TableDataModule.{field}: table {str(path)!r} is empty (shape {frame.shape})")
    frame.columns = [str(c) for c in frame.columns]
    return frame


# ---------------------------------------------------------------------------------------------- dataset


class TableDataset(Dataset):
    """Rows of an already transformed table; ``__getitems__`` slices whole batches at once.

    Rows are addressed by index or by the ``(index, sample_seed)`` keys of the training sampler (tables are not
    augmented: the seed is unused).

    Args:
        tensors: a :class:`TableBatch` of all rows (every value has the rows as its first dimension).
    """

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors: dict[str, Tensor] = {str(k): torch.as_tensor(v) for k, v in tensors.items()}
        lengths = {v.shape[0] for v in self.tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"TableDataset: tensors disagree on the number of rows: {sorted(lengths)}")
        self.num_rows = lengths.pop()

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: SampleKey) -> TableBatch:
        index = sample_key(key)[0]
        return {name: value[index] for name, value in self.tensors.items()}  # type: ignore[return-value]

    def __getitems__(self, keys: list[SampleKey]) -> TableBatch:
        rows = torch.as_tensor([sample_key(k)[0] for k in keys], dtype=torch.int64)  # (B,)
        return {key: value[rows] for key, value in self.tensors.items()}  # type: ignore[return-value]


def _collate_table(samples: Any) -> Any:
    """``__getitems__`` already returns a stacked batch dict; single samples (lists) use the default collate."""
    return samples if isinstance(samples, dict) else default_collate(samples)


# ------------------------------------------------------------------------------------------- datamodule


class TableDataModule(HeldOutLoadersMixin, MapResumeMixin, LightningDataModule):
    """A CSV or Parquet table as :class:`TableBatch` batches, with the preprocessing fitted on the train split.

    Args:
        train_path: the training table (``.csv``, ``.parquet`` or ``.pq``).
        val_path: a validation table with the same columns, or None.
        val_fraction: without ``val_path``: the share of the training table's rows held out for validation
            (a seeded permutation; 0 = no validation). Must be in [0, 1).
        numeric_columns: columns forced to be numeric; other columns are inferred (see
            :func:`infer_column_kinds`).
        categorical_columns: columns forced to be categorical (e.g. integer codes).
        label_column: the label column (not a feature), or None for an unlabelled table.
        drop_columns: columns that are neither features nor label (ids, leaks).
        label_task: "auto" (float label -> regression, anything else -> classification), "classification"
            (int64 labels: integer labels as they are, other labels as indices of their sorted classes) or
            "regression" (float32 labels).
        batch_size: rows per device and step (the training loader drops the last partial batch).
        num_workers: loader worker processes (0 loads in the main process).
        seed: seeds the training order (:class:`~mim.data.base.EpochShuffleSampler`, this rank's share under DDP)
            and the ``val_fraction`` split.

    A checkpoint carries the fitted preprocessing and the training position, so a run resumed mid-epoch sees the
    rows of the uninterrupted run (:class:`~mim.data.base.MapResumeMixin`).

    Attributes:
        preprocessor: the fitted :class:`TablePreprocessor` (fitted on first use, or restored by
            :meth:`load_state_dict`).
        num_numeric, category_cardinalities, num_features, num_classes: from the preprocessor.
        train_dataset, val_dataset: built by :meth:`setup`; ``val_dataset`` is None without a validation split.
    """

    def __init__(
        self,
        *,
        train_path: str | Path,
        val_path: str | Path | None = None,
        val_fraction: float = 0.0,
        numeric_columns: Sequence[str] | None = None,
        categorical_columns: Sequence[str] | None = None,
        label_column: str | None = None,
        drop_columns: Sequence[str] = (),
        label_task: LabelTask = "auto",
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_loader_settings(owner, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_range(owner, "val_fraction", val_fraction, 0, 1, high_open=True)
        if val_path is not None and val_fraction > 0:
            raise ValueError(f"{owner}: give val_path or val_fraction > 0, not both (got val_fraction={val_fraction})")
        check_choice(owner, "label_task", label_task, ("auto", "classification", "regression"))
        if isinstance(drop_columns, str):
            raise invalid(owner, "drop_columns", "a list of column names, not a string", drop_columns)
        self.train_path = Path(train_path)
        self.val_path = None if val_path is None else Path(val_path)
        self.val_fraction = float(val_fraction)
        self.numeric_columns = None if numeric_columns is None else list(numeric_columns)
        self.categorical_columns = None if categorical_columns is None else list(categorical_columns)
        self.label_column = label_column
        self.drop_columns = list(drop_columns)
        self.label_task: LabelTask = label_task
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.preprocessor: TablePreprocessor | None = None
        self.train_dataset: TableDataset | None = None
        self.val_dataset: TableDataset | None = None
        self._frames: tuple[pd.DataFrame, pd.DataFrame | None] | None = None

    # ------------------------------------------------------------------ frames

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """The (train, validation) rows as read (and split by ``val_fraction``); read once and cached."""
        if self._frames is None:
            train = read_table(self.train_path, field="train_path")
            val = None if self.val_path is None else read_table(self.val_path, field="val_path")
            if self.val_fraction > 0:
                rows = train.shape[0]
                num_val = int(round(rows * self.val_fraction))
                if num_val < 1 or num_val >= rows:
                    raise ValueError(
                        f"TableDataModule.val_fraction={self.val_fraction} of {rows} rows leaves "
                        f"{num_val} validation and {rows - num_val} training rows; both must be >= 1"
                    )
                order = np.random.default_rng(self.seed).permutation(rows)
                val = train.iloc[np.sort(order[rows - num_val :])].reset_index(drop=True)
                train = train.iloc[np.sort(order[: rows - num_val])].reset_index(drop=True)
            self._frames = (train, val)
        return self._frames

    def fit_preprocessor(self) -> TablePreprocessor:
        """Fit (once) the preprocessing on the training split; a restored one is kept as it is."""
        if self.preprocessor is None:
            train, _ = self.frames()
            numeric, categorical = infer_column_kinds(
                train,
                numeric_columns=self.numeric_columns,
                categorical_columns=self.categorical_columns,
                label_column=self.label_column,
                drop_columns=self.drop_columns,
            )
            self.preprocessor = TablePreprocessor.fit(
                train,
                numeric_columns=numeric,
                categorical_columns=categorical,
                label_column=self.label_column,
                label_task=self.label_task,
            )
        return self.preprocessor

    @property
    def num_numeric(self) -> int:
        """Fn, the numeric features (fits the preprocessing when needed)."""
        return self.fit_preprocessor().num_numeric

    @property
    def category_cardinalities(self) -> list[int]:
        """Fc vocabulary sizes including the 0 (missing / unseen) slot."""
        return self.fit_preprocessor().category_cardinalities

    @property
    def num_features(self) -> int:
        """F = Fn + Fc tokens per row; the token grid is (1, 1, F)."""
        return self.fit_preprocessor().num_features

    @property
    def num_classes(self) -> int | None:
        """Label classes for a non-integer classification label; the max label + 1 of the train split for an
        integer one; None for regression or no label."""
        pre = self.fit_preprocessor()
        if pre.label_column is None or pre.label_task != "classification":
            return None
        if pre.num_classes is not None:
            return pre.num_classes
        self.setup("fit")
        assert self.train_dataset is not None
        return int(self.train_dataset.tensors["label"].max()) + 1

    # --------------------------------------------------------------- lightning

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            preprocessor = self.fit_preprocessor()
            train, val = self.frames()
            self.train_dataset = TableDataset(preprocessor.transform(train))
            self.val_dataset = None if val is None else TableDataset(preprocessor.transform(val))

    def _loader_kwargs(self) -> dict[str, Any]:
        return loader_kwargs(self.batch_size, self.num_workers, collate_fn=_collate_table)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_dataset is not None
        return self._train_loader(
            "TableDataModule", self.train_dataset, seed=self.seed, unit="rows", **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return eval_loader(self.val_dataset, **self._loader_kwargs())

    def data_config(self) -> dict[str, Any]:
        """The data settings as checkpoints (``checkpoint["mim"]["data"]``) and ``mim export`` record them.

        Returns:
            ``input_size`` [F] (tokens per row), ``mean`` and ``std`` (the standardisation of the Fn numeric
            columns, in raw units) and ``preprocessor`` (the whole fitted :class:`TablePreprocessor` state: columns,
            vocabularies, label), so that an exported table encoder can read new rows. Plain JSON types.
        """
        pre = self.fit_preprocessor()
        return {
            "input_size": [pre.num_features],
            "mean": list(pre.means),
            "std": list(pre.stds),
            "preprocessor": pre.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The fitted preprocessing as plain python types and, under a trainer, the training position
        (``epoch``, ``batches_done``: :meth:`MapResumeMixin.state_dict`); Lightning stores it in the checkpoint."""
        return {**super().state_dict(), "preprocessor": self.fit_preprocessor().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the preprocessing (datasets built earlier are rebuilt with it) and the training position."""
        super().load_state_dict(state_dict)
        self.preprocessor = TablePreprocessor.from_state_dict(state_dict["preprocessor"])
        self.train_dataset = self.val_dataset = None


# ------------------------------------------------------------------------------------- sklearn tables


def sklearn_table(name: SklearnTable, out_dir: str | Path, *, file_format: Literal["csv", "parquet"] = "csv") -> Path:
    """Write one of scikit-learn's packaged tables (no download) with its target as the column ``"target"``.

    Args:
        name: "breast_cancer" (569 x 30, 2 classes), "wine" (178 x 13, 3 classes), "iris" (150 x 4, 3
            classes) or "diabetes" (442 x 10, float target).
        out_dir: the folder to write ``<name>.csv`` / ``<name>.parquet`` into (created when missing).
        file_format: "csv" or "parquet".

    Returns:
        The written file's path.
    """
    from sklearn import datasets  # only this helper needs scikit-learn

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
        "diabetes": datasets.load_diabetes,
    }
    check_choice("sklearn_table", "name", name, sorted(loaders))
    check_choice("sklearn_table", "file_format", file_format, ("csv", "parquet"))
    bunch = loaders[name]()
    frame = pd.DataFrame(bunch.data, columns=[str(c) for c in bunch.feature_names])
    frame["target"] = bunch.target
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.{file_format}"
    if file_format == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path
