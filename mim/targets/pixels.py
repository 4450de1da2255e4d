"""Pixel reconstruction target with MAE's decoder and norm-pix loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, §3 (reconstruction target; official code
facebookresearch/mae, ``models_mae.py`` ``forward_loss``): the target of each hidden patch is its pixels, optionally
normalised per patch by the patch's mean and **unbiased** variance (``(x - mu) / sqrt(var + eps)``); the loss is the
mean squared error over hidden patches only.

Video: ``norm_pix_mode="channel"`` is VideoMAE's target (Tong et al., "VideoMAE: Masked Autoencoders are
Data-Efficient Learners for Self-Supervised Video Pre-Training", NeurIPS 2022; official code MCG-NJU/VideoMAE,
``engine_for_pretraining.py``): each tubelet normalised **per channel** over its pixels with the unbiased std and
eps added *after* the square root. With a decoder mask (``Masks.decoder``: Wang et al., "VideoMAE V2: Scaling Video
Masked Autoencoders with Dual Masking", CVPR 2023, §3.3) the decoder reconstructs only the decoder-kept tokens and
the loss averages over the tokens hidden from the encoder *and* kept by the decoder.

Hard-patch mining (HPM) builds on this target in :mod:`mim.targets.hard_patch`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_int, check_range, invalid
from mim.models.base import Encoder
from mim.models.decoder import MAEDecoder
from mim.models.encoder import MaskedEncoder
from mim.targets.base import Target
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = ["PixelTarget", "norm_pix", "norm_pix_channel"]


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


def norm_pix_channel(patches: Tensor, channels: int, eps: float = 1e-6) -> Tensor:
    """VideoMAE's norm-pix: normalise each channel of each patch over its pixels, ``(x - mu) / (std + eps)``.

    The std is unbiased (divisor P/C - 1) and eps is added after the square root, as VideoMAE's official code.

    Args:
        patches: (..., P) in mim's layout, channel fastest (P = pixels * C, see mim/models/embed.py).
        channels: C.
        eps: added to the std.

    Returns:
        (..., P), same layout.
    """
    x = patches.unflatten(-1, (-1, channels))  # (..., P/C, C)
    mean = x.mean(dim=-2, keepdim=True)  # (..., 1, C)
    std = x.std(dim=-2, keepdim=True, unbiased=True)  # (..., 1, C)
    return ((x - mean) / (std + eps)).flatten(-2)  # (..., P)


class PixelTarget(Target):
    """Predict the pixels of hidden patches with an MAE decoder.

    Args:
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_num_heads: decoder heads (MAE: 16).
        decoder_mlp_ratio: MLP expansion in the decoder.
        norm_pix: normalise target patches by their mean and unbiased variance (MAE's recommended recipe).
        norm_pix_eps: epsilon added to the variance (``patch``) or to the std (``channel``).
        norm_pix_mode: ``patch`` (MAE: one mean / variance over all P values of a patch, eps inside the square
            root) or ``channel`` (VideoMAE: per channel over the patch's or tubelet's pixels, eps after it).
        decoder_block: ``vit`` (timm blocks, MAE) or ``crate`` (CRATE-MAE's decoder layers: Pai et al., "Masked
            Completion via Structured Diffusion with White-Box Transformers", ICLR 2024; :class:`mim.models.MAEDecoder`).
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
        norm_pix_mode: Literal["patch", "channel"] = "patch",
        decoder_block: Literal["vit", "crate"] = "vit",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        owner = "PixelTarget"
        self.decoder_block: Literal["vit", "crate"] = check_choice(
            owner, "decoder_block", decoder_block, ("vit", "crate")
        )
        check_int(owner, "decoder_depth", decoder_depth)
        check_int(owner, "decoder_num_heads", decoder_num_heads)
        if check_int(owner, "decoder_dim", decoder_dim) % decoder_num_heads:
            raise invalid(owner, "decoder_dim", f"divisible by decoder_num_heads={decoder_num_heads}", decoder_dim)
        if decoder_dim % 4:
            raise invalid(owner, "decoder_dim", "divisible by 4 (sin-cos table)", decoder_dim)
        check_range(owner, "norm_pix_eps", norm_pix_eps, 0, math.inf, low_open=True)
        check_choice(owner, "norm_pix_mode", norm_pix_mode, ("patch", "channel"))
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.decoder_num_heads, self.decoder_mlp_ratio = decoder_num_heads, decoder_mlp_ratio
        self.norm_pix, self.norm_pix_eps, self.norm_pix_mode = norm_pix, norm_pix_eps, norm_pix_mode
        self.decoder: MAEDecoder | None = None

    def bind(self, encoder: Encoder) -> None:
        if not isinstance(encoder, MaskedEncoder):
            raise ValueError(
                f"{type(self).__name__} predicts pixels and needs an image or video encoder "
                f"(mim.models.MaskedEncoder), got {type(encoder).__name__}"
            )
        self.decoder = MAEDecoder(
            grid=encoder.grid,
            in_dim=encoder.embed_dim,
            out_dim=encoder.patch_dim,
            num_prefix_tokens=encoder.num_prefix_tokens,
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            mlp_ratio=self.decoder_mlp_ratio,
            block=self.decoder_block,
        )

    def _decoder(self) -> MAEDecoder:
        if self.decoder is None:
            raise RuntimeError("PixelTarget is not bound to an encoder: call target.bind(encoder) first")
        return self.decoder

    def target_patches(self, images: Tensor, encoder: MaskedEncoder) -> Tensor:
        """(B, C, H, W) -> (B, N, P) regression targets (norm-pix applied when configured)."""
        return self._normalise(encoder.patchify(images).float(), encoder)  # (B, N, P)

    def _normalise(self, patches: Tensor, encoder: MaskedEncoder) -> Tensor:
        """(..., P) -> (..., P) norm-pix per ``norm_pix_mode``, or unchanged without norm-pix."""
        if not self.norm_pix:
            return patches
        if self.norm_pix_mode == "channel":
            return norm_pix_channel(patches, encoder.in_chans, self.norm_pix_eps)
        return norm_pix(patches, self.norm_pix_eps)

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        if masks.decoder is not None:
            return {"loss": self.dual_loss(batch, masks, latent, encoder)}
        return {"loss": self.hidden_token_losses(batch, masks, latent, encoder)[2].mean()}

    def hidden_token_losses(
        self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder
    ) -> tuple[Tensor, Tensor, Tensor]:
        """MAE's reconstruction of the target tokens, loss per token (the loss is its mean).

        Returns:
            ``x`` (B, prefix + N, Dd), the decoder input (embedded latents and mask tokens with positions);
            ``predict`` (B, M*T), the target token indices; ``per_token`` (B, M*T), the squared error averaged
            over the P values of each target token.
        """
        decoder = self._decoder()
        predict = masks.targets.flatten(1)  # (B, M*T) hidden tokens
        x = decoder.embed(latent, masks.visible)  # (B, prefix+N, Dd)
        pred = decoder.decode(x, predict).float()  # (B, M*T, P)
        target = gather_tokens(self.target_patches(encoder.inputs(batch), encoder), predict)  # (B, M*T, P)
        per_token = (pred - target).pow(2).mean(dim=-1)  # (B, M*T): mean over P
        return x, predict, per_token

    def dual_loss(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """VideoMAE V2's loss over the tokens hidden from the encoder and kept by the decoder.

        The decoder runs on the K visible latents plus Kd mask tokens and predicts the Kd decoder-kept tokens
        only; regression targets are built for those Kd tokens only. The per-token MSE (mean over P) is
        averaged over the kept tokens that are also target tokens (``Masks.targets``, the encoder-hidden ones
        under :class:`~mim.masking.dual.DualMasking`), without host syncs: a gathered 0/1 weight (B, Kd)
        divided by its sum clamped to >= 1 (a batch without such tokens gives loss 0).

        Returns:
            The scalar loss.
        """
        keep = masks.decoder
        assert keep is not None
        pred = self._decoder()(latent, masks.visible, keep=keep).float()  # (B, Kd, P)
        patches = gather_tokens(encoder.patchify(encoder.inputs(batch)).float(), keep)  # (B, Kd, P)
        per_token = (pred - self._normalise(patches, encoder)).pow(2).mean(dim=-1)  # (B, Kd)
        is_target = torch.zeros(keep.shape[0], masks.num_tokens, dtype=torch.bool, device=keep.device)
        is_target = is_target.scatter_(1, masks.targets.flatten(1), True)  # (B, N)
        weight = is_target.gather(1, keep).to(per_token.dtype)  # (B, Kd): hidden and decoder-kept
        return (per_token * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def reconstruct(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """Predicted images for visualisation: visible patches from the input, hidden ones predicted.

        With norm-pix, predictions are de-normalised with each true patch's mean and std (as MAE's demo does).

        Returns:
            (B, C, H, W) (or (B, C, T, H, W) for video) in the input's normalised space.
        """
        patches = encoder.patchify(encoder.inputs(batch)).float()  # (B, N, P)
        pred = self._decoder()(latent, masks.visible).float()  # (B, N, P)
        if self.norm_pix and self.norm_pix_mode == "channel":
            x = patches.unflatten(-1, (-1, encoder.in_chans))  # (B, N, P/C, C)
            std = x.std(dim=-2, keepdim=True, unbiased=True) + self.norm_pix_eps  # (B, N, 1, C)
            pred = (pred.unflatten(-1, (-1, encoder.in_chans)) * std + x.mean(dim=-2, keepdim=True)).flatten(-2)
        elif self.norm_pix:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True, unbiased=True) + self.norm_pix_eps).sqrt()
            pred = pred * std + mean
        hidden = masks.hidden.unsqueeze(-1)  # (B, N, 1)
        return encoder.unpatchify(torch.where(hidden, pred, patches))

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token", "decoder.decoder_pos_embed"}
