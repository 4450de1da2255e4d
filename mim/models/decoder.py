"""The MAE decoder: a narrow transformer over visible latents plus mask tokens.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (methods/IMAGE.md §1.1,
steps 7-11): project the encoder's output to the decoder width, put a shared learned mask token at
every hidden position, add a fixed sin-cos position embedding and run a few transformer blocks.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mim.masking.functional import gather_tokens, scatter_tokens
from mim.models.embed import sincos_for_grid
from mim.types import TokenGrid

__all__ = ["MAEDecoder"]


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
    ) -> None:
        super().__init__()
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_for_grid(dim, grid, num_prefix_tokens)  # (prefix+N, Dd): 2-D for images, 3-D for video
        self.decoder_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # fixed
        self.decoder_blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),  # type: ignore[arg-type]
            )
            for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, out_dim)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        from mim.models.encoder import init_mae_weights_

        init_mae_weights_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, visible: Tensor, outputs: Tensor | None = None) -> Tensor:
        """Decode.

        Args:
            latent: (B, prefix + K, D) encoder output.
            visible: (B, K) int64 positions of the latent's patch tokens.
            outputs: (B, T) int64 tokens to predict, or None for all N tokens.

        Returns:
            (B, T, out_dim), or (B, N, out_dim) when ``outputs`` is None.
        """
        b = latent.shape[0]
        x = self.decoder_embed(latent)  # (B, prefix+K, Dd)
        prefix, vis = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        full = self.mask_token.to(x.dtype).expand(b, self.grid.num_tokens, -1)  # (B, N, Dd)
        full = scatter_tokens(full, visible, vis)  # (B, N, Dd)
        x = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed.to(x.dtype)  # (B, prefix+N, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = x[:, self.num_prefix_tokens :]  # (B, N, Dd)
        if outputs is not None:
            x = gather_tokens(x, outputs)  # (B, T, Dd)
        return self.decoder_pred(self.decoder_norm(x))  # (B, T or N, out_dim)
