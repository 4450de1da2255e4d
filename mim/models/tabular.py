"""The tabular feature tokenizer (FT-Transformer, Gorishniy et al., NeurIPS 2021; T-JEPA, t-jepa src/encoder.py).

Each feature of a row becomes one D-wide token, so a table of F features is the token grid (1, 1, F) with
token j = feature j (raster order = feature order): numeric features first, then categorical ones, as in
:class:`mim.data.table_preprocess.TablePreprocessor`.

* numeric feature j:      ``x_j * W_j + b_j``               (W_j, b_j in R^D, one pair per feature)
* missing numeric value:  ``m + b_j``                        (m in R^D, one learned vector shared by all
  numeric features; the feature identity still comes through b_j)
* categorical feature k:  ``E_k[code] + c_k``                (E_k: cardinality_k x D, c_k in R^D; code 0 is
  the missing / unseen slot and has its own learned row)

Prefix tokens (T-JEPA's [REG] / cls) and position embeddings are the encoder's business, not the tokenizer's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mim.checks import check_int, invalid

__all__ = ["FeatureTokenizer"]


class FeatureTokenizer(nn.Module):
    """Numeric and categorical table features -> one D-wide token per feature.

    Every parameter is initialised uniform in ``[-1/sqrt(D), 1/sqrt(D)]``: FT-Transformer's
    ``kaiming_uniform_(a=sqrt(5))`` on a (F, D) weight, whose fan-in is D, gives exactly this bound, and
    FT-Transformer uses the same for the biases; it keeps every token's entries O(1/sqrt(D)), so a token's
    norm is O(1) whatever D is.

    The Fc embedding tables are stored as one table of ``sum(category_cardinalities)`` rows
    (:attr:`category_embeddings`), feature k owning rows ``category_offsets[k] : category_offsets[k] +
    category_cardinalities[k]``, so all features are looked up in one call. Codes are not range-checked (that
    would synchronise with the device): a code ``>= cardinality_k`` reads another feature's rows.

    Args:
        num_numeric: Fn numeric features (>= 0).
        category_cardinalities: Fc table sizes, each >= 1 and counting the 0 (missing / unseen) slot.
        dim: D, the token width.

    Attributes:
        numeric_weight: (Fn, D) W.
        numeric_bias: (Fn, D) b.
        missing_embedding: (D,) m, used instead of ``x_j * W_j`` where the value is missing.
        category_embeddings: ``nn.Embedding(sum(cardinalities), D)``.
        category_bias: (Fc, D) c.
        category_offsets: (Fc,) int64 buffer, the first row of each feature's table.
        num_features: F = Fn + Fc.
    """

    category_offsets: Tensor

    def __init__(self, *, num_numeric: int, category_cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        owner = "FeatureTokenizer"
        check_int(owner, "num_numeric", num_numeric, minimum=0)
        cardinalities = list(category_cardinalities)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cardinalities):
            raise invalid(owner, "category_cardinalities", "a list of integers >= 1", cardinalities)
        check_int(owner, "dim", dim)
        if num_numeric + len(cardinalities) == 0:
            raise ValueError("FeatureTokenizer needs at least one feature: num_numeric=0 and no categorical features")
        self.num_numeric = num_numeric
        self.category_cardinalities = cardinalities
        self.num_categorical = len(cardinalities)
        self.num_features = num_numeric + len(cardinalities)
        self.dim = dim
        self.numeric_weight = nn.Parameter(torch.empty(num_numeric, dim))
        self.numeric_bias = nn.Parameter(torch.empty(num_numeric, dim))
        self.missing_embedding = nn.Parameter(torch.empty(dim))
        self.category_embeddings = nn.Embedding(sum(cardinalities), dim)  # 0 rows without categorical features
        self.category_bias = nn.Parameter(torch.empty(len(cardinalities), dim))
        offsets = [sum(cardinalities[:k]) for k in range(len(cardinalities))]
        self.register_buffer("category_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``[-1/sqrt(D), 1/sqrt(D)]`` for every parameter (see the class docstring)."""
        bound = 1.0 / math.sqrt(self.dim)
        for param in (
            self.numeric_weight,
            self.numeric_bias,
            self.missing_embedding,
            self.category_embeddings.weight,
            self.category_bias,
        ):
            nn.init.uniform_(param, -bound, bound)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Tokenize a table batch.

        Args:
            batch: ``"numeric"`` (B, Fn) float (standardised; the value where missing is ignored),
                ``"numeric_missing"`` (B, Fn) bool (optional; True = missing), ``"categorical"`` (B, Fc)
                int64 codes. A key may be absent when its feature count is 0.

        Returns:
            (B, F, D) tokens, numeric features first, then categorical ones.
        """
        tokens = []
        if self.num_numeric:
            x = batch["numeric"]
            if x.dim() != 2 or x.shape[1] != self.num_numeric:
                raise ValueError(f"FeatureTokenizer: numeric must be (B, {self.num_numeric}), got {tuple(x.shape)}")
            numeric = x.to(self.numeric_weight.dtype).unsqueeze(-1) * self.numeric_weight  # (B, Fn, D)
            missing = batch.get("numeric_missing")
            if missing is not None:
                numeric = torch.where(missing.unsqueeze(-1), self.missing_embedding, numeric)  # (B, Fn, D)
            tokens.append(numeric + self.numeric_bias)  # (B, Fn, D)
        if self.num_categorical:
            codes = batch["categorical"]
            if codes.dim() != 2 or codes.shape[1] != self.num_categorical:
                raise ValueError(
                    f"FeatureTokenizer: categorical must be (B, {self.num_categorical}), got {tuple(codes.shape)}"
                )
            rows = codes.long() + self.category_offsets  # (B, Fc)
            tokens.append(self.category_embeddings(rows) + self.category_bias)  # (B, Fc, D)
        return torch.cat(tokens, dim=1)  # (B, F, D)
