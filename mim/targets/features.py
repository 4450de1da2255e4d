"""Masked-feature reconstruction for tables: MAE's recipe with one token per feature.

He et al. (MAE, CVPR 2022) reconstruct hidden patches; here the hidden tokens are table features
(FT-Transformer tokens, Gorishniy et al. 2021): an MAE decoder predicts, at every hidden feature, the
standardised value of a numeric feature (squared error) or the category of a categorical one (cross-entropy
over that feature's own vocabulary). Missing values are not predicted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mim.checks import check_int, check_range, invalid
from mim.models.decoder import MAEDecoder
from mim.models.table_encoder import MaskedTableEncoder
from mim.targets.base import Target
from mim.types import Batch, Masks

__all__ = ["FeatureTarget"]


class FeatureTarget(Target):
    """Predict hidden table features with an MAE decoder.

    Output row of a token: ``[value, logit_1 .. logit_Cmax]``; numeric features use ``value``, categorical feature
    k uses its first ``cardinality_k`` logits (code 0 = missing is never a target).

    Args:
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder heads.
        categorical_weight: factor of the cross-entropy terms against the squared-error terms.
        weight: factor of this loss in the total.
    """

    cardinalities: Tensor

    def __init__(
        self,
        *,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        categorical_weight: float = 1.0,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        owner = "FeatureTarget"
        check_int(owner, "decoder_depth", decoder_depth)
        check_int(owner, "decoder_num_heads", decoder_num_heads)
        if check_int(owner, "decoder_dim", decoder_dim) % decoder_num_heads or decoder_dim % 4:
            expected = f"divisible by 4 and by decoder_num_heads={decoder_num_heads}"
            raise invalid(owner, "decoder_dim", expected, decoder_dim)
        check_range(owner, "categorical_weight", categorical_weight, 0, math.inf)
        self.decoder_dim, self.decoder_depth, self.decoder_num_heads = decoder_dim, decoder_depth, decoder_num_heads
        self.categorical_weight = categorical_weight
        self.decoder: MAEDecoder | None = None

    def bind(self, encoder: MaskedTableEncoder) -> None:  # type: ignore[override]
        if not isinstance(encoder, MaskedTableEncoder) or not encoder.is_configured:
            raise ValueError("FeatureTarget needs a table encoder (mim.models.MaskedTableEncoder) with a schema")
        cards = list(encoder.category_cardinalities)
        self.num_numeric = int(encoder.num_numeric)
        self.max_categories = max(cards, default=0)
        self.register_buffer("cardinalities", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.decoder = MAEDecoder(
            grid=encoder.grid,
            in_dim=encoder.embed_dim,
            out_dim=1 + self.max_categories,
            num_prefix_tokens=encoder.num_prefix_tokens,
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
        )

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedTableEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        if self.decoder is None:
            raise RuntimeError("FeatureTarget is not bound to an encoder")
        feats: dict[str, Tensor] = batch  # type: ignore[assignment]
        predict = masks.targets.flatten(1)  # (B, T) hidden feature indices
        out = self.decoder(latent, masks.visible, predict).float()  # (B, T, 1 + Cmax)
        fn = self.num_numeric
        is_numeric = predict < fn  # (B, T)

        # numeric: squared error on the standardised value, where present
        num_idx = predict.clamp(max=max(fn - 1, 0))  # (B, T) safe index for gathering
        if fn:
            values = torch.gather(feats["numeric"].float(), 1, num_idx)  # (B, T)
            present = ~torch.gather(feats["numeric_missing"], 1, num_idx)  # (B, T)
        else:
            values = out.new_zeros(predict.shape)
            present = torch.zeros_like(is_numeric)
        num_valid = is_numeric & present
        num_loss = (out[..., 0] - values).pow(2)  # (B, T)

        # categorical: cross-entropy over the feature's own vocabulary, where not missing
        cat_idx = (predict - fn).clamp(min=0)  # (B, T)
        if self.max_categories:
            codes = torch.gather(feats["categorical"], 1, cat_idx)  # (B, T)
            card = self.cardinalities[cat_idx]  # (B, T)
            logits = out[..., 1:]  # (B, T, Cmax)
            allowed = torch.arange(self.max_categories, device=out.device) < card.unsqueeze(-1)  # (B, T, Cmax)
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            cat_loss = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (B, T)
            cat_valid = ~is_numeric & (codes > 0)
        else:
            cat_loss = out.new_zeros(predict.shape)
            cat_valid = torch.zeros_like(is_numeric)

        per_token = torch.where(is_numeric, num_loss, self.categorical_weight * cat_loss)
        valid = (num_valid | cat_valid).float()
        loss = (per_token * valid).sum() / valid.sum().clamp_min(1.0)
        numeric_mse = (num_loss * num_valid).sum() / num_valid.sum().clamp_min(1)
        categorical_ce = (cat_loss * cat_valid).sum() / cat_valid.sum().clamp_min(1)
        return {"loss": loss, "numeric_mse": numeric_mse.detach(), "categorical_ce": categorical_ce.detach()}

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"}
