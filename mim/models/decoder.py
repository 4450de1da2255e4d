"""The MAE decoder: a narrow transformer over visible latents plus mask tokens.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (Section 3, "MAE decoder";
facebookresearch/mae models_mae.py ``forward_decoder``): project the encoder's output to the decoder width, put
a shared learned mask token at every hidden position, add a fixed sin-cos position embedding and run a few
transformer blocks.

Subset path (Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking", CVPR 2023;
OpenGVLab/VideoMAEv2 models/modeling_pretrain.py): with ``keep`` (B, Kd) the decoder runs on the K visible latents
plus one mask token at each decoder-kept position only (K + Kd tokens instead of N) and predicts those Kd.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.utils.checkpoint
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from mim.checks import check_choice
from mim.models.crate import CrateDecoderBlock
from mim.models.embed import sincos_for_grid
from mim.tokens import gather_tokens, scatter_tokens
from mim.types import TokenGrid

__all__ = ["BlockStack", "MAEDecoder", "set_activation_checkpointing", "transformer_blocks"]


class BlockStack(nn.ModuleList):
    """Transformer blocks run in sequence; with ``grad_checkpointing`` each block's activations are recomputed in the
    backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant; the RNG state is replayed, so drop path
    and dropout recompute the same draws). The state-dict keys are a ``ModuleList``'s (``<name>.<i>.``)."""

    grad_checkpointing: bool = False

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        checkpointing = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return x


def transformer_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, *, block: Literal["vit", "crate"] = "vit"
) -> BlockStack:
    """``depth`` timm ViT blocks of width ``dim`` (qkv bias, LayerNorm eps 1e-6): the stack of MAE's decoder,
    HPM's loss predictor and the JEPA predictor. ``block="crate"``: CRATE-MAE's decoder layers instead
    (:class:`~mim.models.crate.CrateDecoderBlock`; ``mlp_ratio`` unused)."""
    if block == "crate":
        return BlockStack(CrateDecoderBlock(dim, num_heads) for _ in range(depth))
    norm = partial(nn.LayerNorm, eps=1e-6)
    return BlockStack(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
        for _ in range(depth)
    )


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Recompute block activations in the backward pass (``enabled``) in every block stack inside ``module``: timm
    ViTs (encoders, teachers: ``set_grad_checkpointing``) and :class:`BlockStack` (decoders, predictors).

    Saves the activations of all but one block at a time, for about one more forward pass of compute (a switch of
    issue 13: memory against speed). Frozen parts run without autograd and are unaffected.

    Returns:
        The number of block stacks switched.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, BlockStack):
            m.grad_checkpointing = enabled
            count += 1
        elif isinstance(m, VisionTransformer):
            m.set_grad_checkpointing(enabled)
            count += 1
    return count


class MAEDecoder(nn.Module):
    """Reconstructs per-token outputs from the encoder's visible latents.

    Args:
        grid: the token grid (images: (1, gh, gw); video: (gt, gh, gw)).
        in_dim: encoder width D.
        out_dim: values predicted per token (P for pixels).
        num_prefix_tokens: prefix tokens (cls, registers) at the front of the latents; passed through.
        dim: decoder width (MAE: 512).
        depth: decoder blocks (MAE: 8).
        num_heads: attention heads (MAE: 16).
        mlp_ratio: MLP expansion.
        block: ``vit`` (timm blocks, MAE) or ``crate`` (CRATE-MAE's decoder layers ``v = A LN(x)``,
            ``x - MSSA(LN(v))``: Pai et al., ICLR 2024; :class:`~mim.models.crate.CrateDecoderBlock`).
    """

    def __init__(
        self,
        *,
        grid: TokenGrid,
        in_dim: int,
        out_dim: int,
        num_prefix_tokens: int = 1,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        block: Literal["vit", "crate"] = "vit",
    ) -> None:
        super().__init__()
        check_choice("MAEDecoder", "block", block, ("vit", "crate"))
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_for_grid(dim, grid, num_prefix_tokens)  # (prefix+N, Dd): 2-D for images, 3-D for video
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # fixed
        self.decoder_blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio, block=block)
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, out_dim)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        from mim.models.encoder import init_mae_weights_

        init_mae_weights_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, latent: Tensor, visible: Tensor, outputs: Tensor | None = None, *, keep: Tensor | None = None
    ) -> Tensor:
        """Decode.

        Args:
            latent: (B, prefix + K, D) encoder output.
            visible: (B, K) int64 positions of the latent's patch tokens.
            outputs: (B, T) int64 tokens to predict, or None for all N tokens.
            keep: (B, Kd) int64 decoder-kept positions (dual masking): decode only ``[prefix; visible latents;
                mask tokens at keep]`` and predict at ``keep`` (see :meth:`forward_subset`). Excludes ``outputs``.

        Returns:
            (B, T, out_dim); (B, N, out_dim) when ``outputs`` and ``keep`` are None; (B, Kd, out_dim) with ``keep``.
        """
        if keep is not None:
            if outputs is not None:
                raise ValueError("MAEDecoder: give outputs (full path) or keep (subset path), not both")
            return self.forward_subset(latent, visible, keep)
        return self.decode(self.embed(latent, visible), outputs)

    def embed(self, latent: Tensor, visible: Tensor | None = None) -> Tensor:
        """The decoder's input sequence: projected latents at their positions, mask tokens elsewhere, plus positions.

        Args:
            latent: (B, prefix + K, D) encoder output.
            visible: (B, K) int64 positions of the latent's patch tokens, or None when all N tokens are present
                in raster order (then there are no mask tokens).

        Returns:
            (B, prefix + N, Dd).
        """
        b = latent.shape[0]
        x = self.decoder_embed(latent)  # (B, prefix+K, Dd)
        if visible is not None:
            prefix, vis = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
            full = self.mask_token.to(x.dtype).expand(b, self.grid.num_tokens, -1)  # (B, N, Dd)
            full = scatter_tokens(full, visible, vis)  # (B, N, Dd)
            x = torch.cat([prefix, full], dim=1)  # (B, prefix+N, Dd)
        return x + self.decoder_pos_embed.to(x.dtype)  # (B, prefix+N, Dd)

    def decode(self, x: Tensor, outputs: Tensor | None = None) -> Tensor:
        """Blocks, norm and prediction head over an :meth:`embed` sequence.

        Args:
            x: (B, prefix + N, Dd).
            outputs: (B, T) int64 tokens to predict, or None for all N.

        Returns:
            (B, T or N, out_dim).
        """
        x = self.decoder_blocks(x)
        x = x[:, self.num_prefix_tokens :]  # (B, N, Dd)
        if outputs is not None:
            x = gather_tokens(x, outputs)  # (B, T, Dd)
        return self.decoder_pred(self.decoder_norm(x))  # (B, T or N, out_dim)

    def forward_subset(self, latent: Tensor, visible: Tensor, keep: Tensor) -> Tensor:
        """VideoMAE V2's decoder on a subset: visible latents plus mask tokens at the decoder-kept positions.

        The input sequence is ``[prefix; embed(latent_j) + pos[visible_j]; mask_token + pos[keep_i]]``: K + Kd
        tokens, with a mask token at **every** kept position, also where the encoder saw the token (as the
        official code). Attention is permutation-equivariant, so with ``keep`` = the hidden tokens this equals the
        full path's predictions at those tokens (up to float rounding).

        Args:
            latent: (B, prefix + K, D) encoder output.
            visible: (B, K) int64 positions of the latent's patch tokens.
            keep: (B, Kd) int64 positions to predict, Kd >= 1.

        Returns:
            (B, Kd, out_dim) predictions, in the order of ``keep``.
        """
        b, c = latent.shape[0], self.num_prefix_tokens
        if keep.ndim != 2 or keep.shape[0] != b or keep.shape[1] < 1:
            raise ValueError(f"MAEDecoder: keep must be (B={b}, Kd >= 1) token indices, got {tuple(keep.shape)}")
        kd = keep.shape[1]
        x = self.decoder_embed(latent)  # (B, prefix+K, Dd)
        pos = self.decoder_pos_embed.to(x.dtype)  # (1, prefix+N, Dd)
        grid_pos = pos[:, c:].expand(b, -1, -1)  # (B, N, Dd)
        prefix = x[:, :c] + pos[:, :c]  # (B, prefix, Dd)
        vis = x[:, c:] + gather_tokens(grid_pos, visible)  # (B, K, Dd)
        queries = self.mask_token.to(x.dtype) + gather_tokens(grid_pos, keep)  # (B, Kd, Dd)
        x = torch.cat([prefix, vis, queries], dim=1)  # (B, prefix+K+Kd, Dd)
        x = self.decoder_blocks(x)
        x = x[:, x.shape[1] - kd :]  # (B, Kd, Dd): the query rows
        return self.decoder_pred(self.decoder_norm(x))  # (B, Kd, out_dim)
