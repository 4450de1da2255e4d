"""The preprocessing of a table (:class:`TablePreprocessor`): column kinds, standardisation, category codes.

Fitted on the TRAINING split only and applied to every split; features are numeric columns first, then
categorical ones, each group in the order of the file's columns:

* numeric column j: ``(x - mean_j) / std_j`` with the train mean and the population std (ddof = 0, as in
  scikit-learn's ``StandardScaler``), missing values skipped; a std of 0 (constant column) or an all-missing
  column uses std 1 (and mean 0 when all-missing). Missing values become 0 after standardisation and are
  flagged in ``numeric_missing``. (The T-JEPA reference min-max scales instead; standardising keeps outliers
  in the validation split from leaving a fixed range.)
* categorical column k: the vocabulary is the train split's distinct values as strings, sorted, and value
  ``vocabulary[i]`` has code ``i + 1``; code 0 is reserved for missing AND unseen values. The cardinality
  (embedding rows) is ``len(vocabulary) + 1``.

The fitted state is a dict of plain python types (:meth:`TablePreprocessor.state_dict`), so a checkpoint can
carry it and ``torch.load(..., weights_only=True)`` can read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["LabelTask", "TableBatch", "TablePreprocessor", "infer_column_kinds"]

LabelTask = Literal["auto", "classification", "regression"]
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
