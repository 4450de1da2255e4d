"""Pixel reconstruction target with MAE's decoder and norm-pix loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (methods/IMAGE.md §1.1,
steps 12-14): the target of each hidden patch is its pixels, optionally normalised per patch by the
patch's mean and **unbiased** variance (``(x - mu) / sqrt(var + eps)``); the loss is the mean squared
error over hidden patches only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mim.masking.functional import gather_tokens
from mim.models.decoder import MAEDecoder
from mim.targets.base import Target
from mim.types import Batch, Masks

if TYPE_CHECKING:
    from mim.models.encoder import MaskedEncoder

__all__ = ["PixelTarget", "norm_pix"]


def norm_pix(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalise each patch by its own mean and unbiased variance.

    Args:
        patches: (..., P).
        eps: added to the variance before the square root.

    Returns:
        (..., P).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


class PixelTarget(Target):
    """Predict the pixels of hidden patches with an MAE decoder.

    Args:
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_num_heads: decoder heads (MAE: 16).
        decoder_mlp_ratio: MLP expansion in the decoder.
        norm_pix: normalise target patches by their mean and unbiased variance (MAE's recommended recipe).
        norm_pix_eps: epsilon added to the variance.
        weight: factor of this loss in the total.
    """

    def __init__(
        self,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix: bool = True,
        norm_pix_eps: float = 1e-6,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        if decoder_depth < 1:
            raise ValueError(f"PixelTarget.decoder_depth must be >= 1, got {decoder_depth}")
        if decoder_num_heads < 1 or decoder_dim % decoder_num_heads:
            raise ValueError(
                f"PixelTarget.decoder_dim ({decoder_dim}) must be divisible by decoder_num_heads ({decoder_num_heads})"
            )
        if decoder_dim % 4:
            raise ValueError(f"PixelTarget.decoder_dim must be divisible by 4 (sin-cos table), got {decoder_dim}")
        if not norm_pix_eps > 0:
            raise ValueError(f"PixelTarget.norm_pix_eps must be > 0, got {norm_pix_eps}")
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.decoder_num_heads, self.decoder_mlp_ratio = decoder_num_heads, decoder_mlp_ratio
        self.norm_pix, self.norm_pix_eps = norm_pix, norm_pix_eps
        self.decoder: MAEDecoder | None = None

    def bind(self, encoder: MaskedEncoder) -> None:
        self.decoder = MAEDecoder(
            grid=encoder.grid,
            in_dim=encoder.embed_dim,
            out_dim=encoder.patch_dim,
            num_prefix_tokens=encoder.num_prefix_tokens,
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            mlp_ratio=self.decoder_mlp_ratio,
        )

    def _decoder(self) -> MAEDecoder:
        if self.decoder is None:
            raise RuntimeError("PixelTarget is not bound to an encoder: call target.bind(encoder) first")
        return self.decoder

    def target_patches(self, images: Tensor, encoder: MaskedEncoder) -> Tensor:
        """(B, C, H, W) -> (B, N, P) regression targets (norm-pix applied when configured)."""
        patches = encoder.patchify(images).float()  # (B, N, P)
        return norm_pix(patches, self.norm_pix_eps) if self.norm_pix else patches

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:
        predict = masks.targets.flatten(1)  # (B, M*T) hidden tokens
        pred = self._decoder()(latent, masks.visible, predict).float()  # (B, M*T, P)
        target = gather_tokens(self.target_patches(encoder.inputs(batch), encoder), predict)  # (B, M*T, P)
        loss = (pred - target).pow(2).mean(dim=-1).mean()  # mean over P, then over hidden tokens
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """Predicted images for visualisation: visible patches from the input, hidden ones predicted.

        With norm-pix, predictions are de-normalised with each true patch's mean and std (as MAE's demo does).

        Returns:
            (B, C, H, W) (or (B, C, T, H, W) for video) in the input's normalised space.
        """
        patches = encoder.patchify(encoder.inputs(batch)).float()  # (B, N, P)
        pred = self._decoder()(latent, masks.visible).float()  # (B, N, P)
        if self.norm_pix:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True, unbiased=True) + self.norm_pix_eps).sqrt()
            pred = pred * std + mean
        hidden = masks.hidden.unsqueeze(-1)  # (B, N, 1)
        return encoder.unpatchify(torch.where(hidden, pred, patches))

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token", "decoder.decoder_pos_embed"}
