"""Tables (CSV or Parquet) as feature batches for tabular pretraining (T-JEPA, methods/JEPA_VIDEO.md §4).

A table of F feature columns is the token grid (1, 1, F) (see :mod:`mim.types`): feature j is token j, numeric
features first, then categorical ones, each group in the order of the file's columns.

Preprocessing (:class:`TablePreprocessor`) is fitted on the TRAINING split only and applied to every split:

* numeric column j: ``(x - mean_j) / std_j`` with the train mean and the population std (ddof = 0, as in
  scikit-learn's ``StandardScaler``), missing values skipped; a std of 0 (constant column) or an all-missing
  column uses std 1 (and mean 0 when all-missing). Missing values become 0 after standardisation and are
  flagged in ``numeric_missing``. (The T-JEPA reference min-max scales instead; standardising keeps outliers
  in the validation split from leaving a fixed range.)
* categorical column k: the vocabulary is the train split's distinct values as strings, sorted, and value
  ``vocabulary[i]`` has code ``i + 1``; code 0 is reserved for missing AND unseen values. The cardinality
  (embedding rows) is ``len(vocabulary) + 1``.

The fitted state is a dict of plain python types (:meth:`TablePreprocessor.state_dict`) that the datamodule's
``state_dict`` / ``load_state_dict`` hand to Lightning, so a checkpoint carries it and
``torch.load(..., weights_only=True)`` can read it; a restored datamodule transforms exactly as the original.

Batches (:class:`TableBatch`) are dicts::

    {"numeric": (B, Fn) float32, "numeric_missing": (B, Fn) bool, "categorical": (B, Fc) int64,
     "label": (B,) int64 (classification) or float32 (regression)  # only when label_column is set}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from mim.data.base import check_positive_int, eval_loader, loader_kwargs, train_loader

__all__ = [
    "TableBatch",
    "TableDataModule",
    "TableDataset",
    "TablePreprocessor",
    "infer_column_kinds",
    "read_table",
    "sklearn_table",
]

LabelTask = Literal["auto", "classification", "regression"]
SklearnTable = Literal["breast_cancer", "wine", "iris", "diabetes"]
_STATE_VERSION = 1


class TableBatch(TypedDict, total=False):
    """One batch of table rows.

    Keys:
        numeric: (B, Fn) float32, standardised with the train split's statistics; 0 where missing.
        numeric_missing: (B, Fn) bool, True where the raw numeric value was missing.
        categorical: (B, Fc) int64 codes in ``[0, cardinality_k)``; 0 = missing or unseen.
        label: (B,) int64 class index (classification) or float32 value (regression).
    """

    numeric: Tensor
    numeric_missing: Tensor
    categorical: Tensor
    label: Tensor


# ------------------------------------------------------------------------------------------------ reading


def read_table(path: str | Path, *, field: str = "path") -> pd.DataFrame:
    """Read a ``.csv`` or ``.parquet`` / ``.pq`` file into a DataFrame (format chosen by suffix).

    Raises:
        FileNotFoundError: when ``path`` does not exist (the message names it).
        ValueError: for an unknown suffix, or a table without rows or columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TableDataModule.{field}: table file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path)
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


def _is_categorical_dtype(series: pd.Series) -> bool:
    """Bool, object, string, category (anything non-numeric) -> categorical; int/float -> numeric."""
    return pd.api.types.is_bool_dtype(series.dtype) or not pd.api.types.is_numeric_dtype(series.dtype)


def _check_columns(field: str, names: Sequence[str], available: Sequence[str]) -> None:
    for name in names:
        if name not in available:
            raise ValueError(f"TableDataModule.{field}: column {name!r} does not exist; available: {list(available)}")


def infer_column_kinds(
    frame: pd.DataFrame,
    *,
    numeric_columns: Sequence[str] | None = None,
    categorical_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    drop_columns: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Split the feature columns into (numeric, categorical), each in the order of the table's columns.

    Every column except ``label_column`` and ``drop_columns`` is a feature. A column listed in
    ``numeric_columns`` / ``categorical_columns`` has that kind; any other column is inferred from its dtype:
    bool, object, string and category dtypes are categorical, integer and float dtypes numeric (an integer
    column with few distinct values stays numeric unless listed as categorical).

    Raises:
        ValueError: naming a listed column that does not exist (with the available ones), a column listed
            twice (as both kinds, or as a feature and the label / a dropped column), or no feature left.
    """
    available = list(frame.columns)
    numeric_set, categorical_set = list(numeric_columns or ()), list(categorical_columns or ())
    _check_columns("numeric_columns", numeric_set, available)
    _check_columns("categorical_columns", categorical_set, available)
    _check_columns("drop_columns", list(drop_columns), available)
    if label_column is not None:
        _check_columns("label_column", [label_column], available)
    excluded = set(drop_columns) | ({label_column} if label_column is not None else set())
    both = sorted(set(numeric_set) & set(categorical_set))
    if both:
        raise ValueError(f"TableDataModule: columns {both} are listed in both numeric_columns and categorical_columns")
    clash = sorted((set(numeric_set) | set(categorical_set)) & excluded)
    if clash:
        raise ValueError(f"TableDataModule: feature columns {clash} are also the label_column or in drop_columns")
    numeric, categorical = [], []
    for name in available:
        if name in excluded:
            continue
        if name in categorical_set or (name not in numeric_set and _is_categorical_dtype(frame[name])):
            categorical.append(name)
        else:
            numeric.append(name)
    if not numeric and not categorical:
        raise ValueError(f"TableDataModule: no feature columns left in {available} after label and drop_columns")
    return numeric, categorical


def _category_strings(series: pd.Series) -> list[str | None]:
    """The values of ``series`` as strings (None where missing); integral floats print as ints ("3", not "3.0").

    Integer codes stored as floats (what a NaN does to an int column) thereby match their int spelling.
    """
    out: list[str | None] = []
    for value in series.tolist():
        if value is None or (not isinstance(value, str) and bool(pd.isna(value))):
            out.append(None)
        elif isinstance(value, float) and value.is_integer():
            out.append(str(int(value)))
        else:
            out.append(str(value))
    return out


def _numeric_values(series: pd.Series, column: str) -> np.ndarray:
    """(R,) float64 with NaN where missing; ValueError naming the column when a value is not a number."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype("float64").to_numpy()
    try:
        return pd.to_numeric(series, errors="raise").astype("float64").to_numpy(na_value=np.nan)
    except (ValueError, TypeError) as error:
        raise ValueError(f"TableDataModule: numeric column {column!r} holds a non-numeric value ({error})") from None


# ------------------------------------------------------------------------------------------- preprocessor


class TablePreprocessor:
    """The fitted preprocessing of a table: columns, numeric statistics, category vocabularies, label classes.

    Build it with :meth:`fit` (on the training split) or :meth:`from_state_dict`; :meth:`transform` turns
    any split into a :class:`TableBatch` of all its rows. See the module docstring for the rules.

    Args:
        numeric_columns: Fn numeric feature names, in token order.
        categorical_columns: Fc categorical feature names, in token order (after the numeric ones).
        means: Fn train means (raw units).
        stds: Fn train standard deviations (all > 0).
        vocabularies: Fc sorted lists of category strings; value ``vocabularies[k][i]`` has code ``i + 1``.
        label_column: the label's column, or None.
        label_task: "classification" or "regression" (required with ``label_column``).
        label_classes: for classification with a non-integer label: the sorted class strings (class index =
            position); None for integer labels, which are used as class indices as they are.
    """

    def __init__(
        self,
        *,
        numeric_columns: Sequence[str],
        categorical_columns: Sequence[str],
        means: Sequence[float],
        stds: Sequence[float],
        vocabularies: Sequence[Sequence[str]],
        label_column: str | None = None,
        label_task: Literal["classification", "regression"] | None = None,
        label_classes: Sequence[str] | None = None,
    ) -> None:
        self.numeric_columns = [str(c) for c in numeric_columns]
        self.categorical_columns = [str(c) for c in categorical_columns]
        self.means = [float(m) for m in means]
        self.stds = [float(s) for s in stds]
        self.vocabularies = [[str(v) for v in vocab] for vocab in vocabularies]
        self.label_column = label_column
        self.label_task = label_task
        self.label_classes = None if label_classes is None else [str(c) for c in label_classes]
        if len(self.means) != len(self.numeric_columns) or len(self.stds) != len(self.numeric_columns):
            raise ValueError(
                f"TablePreprocessor: {len(self.numeric_columns)} numeric_columns but {len(self.means)} means "
                f"and {len(self.stds)} stds"
            )
        if not all(s > 0 and math.isfinite(s) for s in self.stds):
            raise ValueError(f"TablePreprocessor.stds must be finite and > 0, got {self.stds}")
        if len(self.vocabularies) != len(self.categorical_columns):
            raise ValueError(
                f"TablePreprocessor: {len(self.categorical_columns)} categorical_columns but "
                f"{len(self.vocabularies)} vocabularies"
            )
        if label_column is not None and label_task not in ("classification", "regression"):
            raise ValueError(
                f"TablePreprocessor.label_task must be 'classification' or 'regression' with a label_column, "
                f"got {label_task!r}"
            )
        self._codes = [{value: i + 1 for i, value in enumerate(vocab)} for vocab in self.vocabularies]
        self._label_codes = None if self.label_classes is None else {c: i for i, c in enumerate(self.label_classes)}

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        *,
        numeric_columns: Sequence[str],
        categorical_columns: Sequence[str],
        label_column: str | None = None,
        label_task: LabelTask = "auto",
    ) -> TablePreprocessor:
        """Fit on ``frame`` (the training split): numeric mean/std, sorted vocabularies, label classes.

        Args:
            frame: the training rows.
            numeric_columns, categorical_columns: from :func:`infer_column_kinds`.
            label_column: the label's column, or None.
            label_task: "auto" picks regression for a float label column, classification otherwise.
        """
        if frame.shape[0] == 0:
            raise ValueError("TablePreprocessor.fit: the training split has no rows")
        means, stds = [], []
        for name in numeric_columns:
            values = _numeric_values(frame[name], name)  # (R,) with NaN
            present = values[~np.isnan(values)]
            mean = float(present.mean()) if present.size else 0.0
            std = float(present.std()) if present.size else 1.0  # ddof = 0
            means.append(mean)
            stds.append(std if std > 0 and math.isfinite(std) else 1.0)
        vocabularies = [
            sorted({v for v in _category_strings(frame[name]) if v is not None}) for name in categorical_columns
        ]
        task: Literal["classification", "regression"] | None = None
        classes: list[str] | None = None
        if label_column is not None:
            label = frame[label_column]
            if label_task == "auto":
                task = "regression" if pd.api.types.is_float_dtype(label.dtype) else "classification"
            elif label_task in ("classification", "regression"):
                task = label_task
            else:
                raise ValueError(
                    f"TableDataModule.label_task must be 'auto', 'classification' or 'regression', got {label_task!r}"
                )
            is_int = pd.api.types.is_integer_dtype(label.dtype) and not pd.api.types.is_bool_dtype(label.dtype)
            if task == "classification" and not is_int:
                classes = sorted({v for v in _category_strings(label) if v is not None})
        return cls(
            numeric_columns=numeric_columns,
            categorical_columns=categorical_columns,
            means=means,
            stds=stds,
            vocabularies=vocabularies,
            label_column=label_column,
            label_task=task,
            label_classes=classes,
        )

    # ---------------------------------------------------------------- properties

    @property
    def num_numeric(self) -> int:
        """Fn."""
        return len(self.numeric_columns)

    @property
    def category_cardinalities(self) -> list[int]:
        """Fc embedding-table sizes, each ``len(vocabulary) + 1`` (code 0 = missing / unseen)."""
        return [len(vocab) + 1 for vocab in self.vocabularies]

    @property
    def num_features(self) -> int:
        """F = Fn + Fc, the number of tokens per row."""
        return len(self.numeric_columns) + len(self.categorical_columns)

    @property
    def num_classes(self) -> int | None:
        """Classes of a classification label with ``label_classes``; None otherwise (see :meth:`transform`)."""
        return None if self.label_classes is None else len(self.label_classes)

    # ----------------------------------------------------------------- transform

    def transform(self, frame: pd.DataFrame) -> TableBatch:
        """All rows of ``frame`` as one :class:`TableBatch` (B = number of rows).

        Raises:
            ValueError: when a fitted column is missing from ``frame`` (naming it and the available ones), a
                numeric column holds a non-number, or a classification label is missing / unseen / not an int.
        """
        needed = self.numeric_columns + self.categorical_columns
        if self.label_column is not None:
            needed = needed + [self.label_column]
        _check_columns("preprocessor", needed, list(frame.columns))
        rows = frame.shape[0]
        numeric = np.zeros((rows, self.num_numeric), dtype=np.float64)  # (B, Fn)
        missing = np.zeros((rows, self.num_numeric), dtype=bool)  # (B, Fn)
        for j, name in enumerate(self.numeric_columns):
            values = _numeric_values(frame[name], name)  # (B,)
            missing[:, j] = np.isnan(values)
            numeric[:, j] = np.where(missing[:, j], 0.0, (values - self.means[j]) / self.stds[j])
        categorical = np.zeros((rows, len(self.categorical_columns)), dtype=np.int64)  # (B, Fc)
        for k, name in enumerate(self.categorical_columns):
            codes = self._codes[k]
            categorical[:, k] = [0 if v is None else codes.get(v, 0) for v in _category_strings(frame[name])]
        batch: TableBatch = {
            "numeric": torch.from_numpy(numeric.astype(np.float32)),
            "numeric_missing": torch.from_numpy(missing),
            "categorical": torch.from_numpy(categorical),
        }
        if self.label_column is not None:
            batch["label"] = self._transform_label(frame[self.label_column])
        return batch

    def _transform_label(self, series: pd.Series) -> Tensor:
        name = self.label_column
        if self.label_task == "regression":
            return torch.from_numpy(_numeric_values(series, str(name)).astype(np.float32))  # (B,)
        maybe = _category_strings(series)
        if any(v is None for v in maybe):
            raise ValueError(f"TableDataModule: classification label column {name!r} has missing values")
        strings = [str(v) for v in maybe]
        if self._label_codes is not None:
            unseen = sorted({v for v in strings if v not in self._label_codes})
            if unseen:
                raise ValueError(
                    f"TableDataModule: label column {name!r} has classes {unseen} not in the training split's "
                    f"{self.label_classes}"
                )
            return torch.tensor([self._label_codes[v] for v in strings], dtype=torch.int64)  # (B,)
        try:
            return torch.tensor([int(v) for v in strings], dtype=torch.int64)  # (B,)
        except ValueError:
            raise ValueError(f"TableDataModule: integer label column {name!r} holds a non-integer value") from None

    # --------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain python types (str, float, list, None): safe for ``weights_only`` loads."""
        return {
            "version": _STATE_VERSION,
            "numeric_columns": list(self.numeric_columns),
            "categorical_columns": list(self.categorical_columns),
            "means": list(self.means),
            "stds": list(self.stds),
            "vocabularies": [list(v) for v in self.vocabularies],
            "label_column": self.label_column,
            "label_task": self.label_task,
            "label_classes": None if self.label_classes is None else list(self.label_classes),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> TablePreprocessor:
        """Inverse of :meth:`state_dict`."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"TablePreprocessor: unsupported state version {state.get('version')!r}")
        return cls(
            numeric_columns=state["numeric_columns"],
            categorical_columns=state["categorical_columns"],
            means=state["means"],
            stds=state["stds"],
            vocabularies=state["vocabularies"],
            label_column=state["label_column"],
            label_task=state["label_task"],
            label_classes=state["label_classes"],
        )


# ---------------------------------------------------------------------------------------------- dataset


class TableDataset(Dataset):
    """Rows of an already transformed table; ``__getitems__`` slices whole batches at once.

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

    def __getitem__(self, index: int) -> TableBatch:
        return {key: value[index] for key, value in self.tensors.items()}  # type: ignore[return-value]

    def __getitems__(self, indices: list[int]) -> TableBatch:
        rows = torch.as_tensor(indices, dtype=torch.int64)  # (B,)
        return {key: value[rows] for key, value in self.tensors.items()}  # type: ignore[return-value]


def _collate_table(samples: Any) -> Any:
    """``__getitems__`` already returns a stacked batch dict; single samples (lists) use the default collate."""
    return samples if isinstance(samples, dict) else default_collate(samples)


# ------------------------------------------------------------------------------------------- datamodule


class TableDataModule(LightningDataModule):
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
        seed: seeds the training shuffle (:class:`EpochShuffleSampler`) and the ``val_fraction`` split.

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
        check_positive_int(owner, "batch_size", batch_size)
        check_positive_int(owner, "num_workers", num_workers, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{owner}.seed must be an int, got {seed!r}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"{owner}.val_fraction must be in [0, 1), got {val_fraction!r}")
        if val_path is not None and val_fraction > 0:
            raise ValueError(f"{owner}: give val_path or val_fraction > 0, not both (got val_fraction={val_fraction})")
        if label_task not in ("auto", "classification", "regression"):
            raise ValueError(f"{owner}.label_task must be 'auto', 'classification' or 'regression', got {label_task!r}")
        if isinstance(drop_columns, str):
            raise ValueError(f"{owner}.drop_columns must be a list of column names, got the string {drop_columns!r}")
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
        return train_loader("TableDataModule", self.train_dataset, seed=self.seed, unit="rows", **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return eval_loader(self.val_dataset, **self._loader_kwargs())

    def state_dict(self) -> dict[str, Any]:
        """The fitted preprocessing as plain python types (Lightning stores it in the checkpoint)."""
        return {"preprocessor": self.fit_preprocessor().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the preprocessing from a checkpoint; datasets built earlier are rebuilt with it."""
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
    if name not in loaders:
        raise ValueError(f"sklearn_table.name must be one of {sorted(loaders)}, got {name!r}")
    if file_format not in ("csv", "parquet"):
        raise ValueError(f"sklearn_table.file_format must be 'csv' or 'parquet', got {file_format!r}")
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
