"""The JEPA predictor: a narrow transformer that predicts target-encoder features at target positions.

I-JEPA (Assran et al., CVPR 2023; official facebookresearch/ijepa src/models/vision_transformer.py,
``VisionTransformerPredictor``), V-JEPA (Bardes et al., arXiv 2404.08471, 2024; facebookresearch/jepa
src/models/predictor.py) and T-JEPA (Thimonier et al., ICLR 2025; jose-melo/t-jepa src/predictors.py).

The context latents are projected to the predictor width P and get the predictor's own fixed sin-cos position
rows at their token indices; each target token becomes a query, a learnable mask token plus the position
row at its index (one shared token; V-JEPA: one per mask set). The predictor runs transformer blocks over ``[prefix; context; queries]``, normalises and
projects the query outputs back to the encoder width D. ``groups="separate"`` (I-JEPA, T-JEPA) gives each target
group of a sample its own sequence, so groups never attend to each other; ``"joint"`` (V-JEPA) puts the queries of
all groups of a sample in one sequence. Outputs are (B, M, T, D), the layout of the targets. Sequence layout,
prefix tokens, position tables and initialisation: docs/design.md, "JEPA predictor".
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mim.checks import check_choice, check_int, invalid
from mim.models.decoder import transformer_blocks
from mim.models.embed import sincos_1d, sincos_for_grid
from mim.tokens import gather_tokens
from mim.types import TokenGrid

__all__ = ["JEPAPredictor", "predictor_pos_table"]

Groups = Literal["separate", "joint"]


def predictor_pos_table(dim: int, grid: TokenGrid) -> Tensor:
    """The predictor's fixed position table over the N grid tokens (no prefix rows).

    Args:
        dim: P, the predictor width.
        grid: the token grid; ``t == h == 1`` (a table's (1, 1, F)) gives a 1-D table over the token index.

    Returns:
        (N, P) float32.
    """
    if grid.t == 1 and grid.h == 1:
        return sincos_1d(dim, torch.arange(grid.w)).float()  # (N, P)
    return sincos_for_grid(dim, grid)  # (N, P)


class JEPAPredictor(nn.Module):
    """Predicts D-wide target features at the target tokens from the context latents.

    Args:
        grid: the encoder's token grid.
        in_dim: D, the encoder width (input and output width).
        num_prefix_tokens: prefix tokens at the front of the latents (cls / registers / [REG]); passed as context.
        dim: P, the predictor width (I-JEPA: 384); divisible by 4 and by ``num_heads``.
        depth: transformer blocks (I-JEPA ViT-H: 12).
        num_heads: attention heads (I-JEPA: the encoder's, 16 for ViT-H: head width 24).
        mlp_ratio: MLP expansion (4).
        groups: ``separate`` (one sequence per target group, I-JEPA) or ``joint`` (one per sample, V-JEPA).
        num_mask_tokens: learnable mask tokens; ``forward(mask_index=i)`` uses token ``i`` (V-JEPA: one per mask
            generator, 2). Stored as ``mask_token`` (S, 1, P).
        mask_token_init: ``trunc_normal`` (std 0.02: I-JEPA) or ``zeros`` (V-JEPA's ``zero_init_mask_tokens``).
    """

    def __init__(
        self,
        *,
        grid: TokenGrid,
        in_dim: int,
        num_prefix_tokens: int = 0,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        groups: Groups = "separate",
        num_mask_tokens: int = 1,
        mask_token_init: Literal["trunc_normal", "zeros"] = "trunc_normal",
    ) -> None:
        super().__init__()
        owner = "JEPAPredictor"
        check_int(owner, "depth", depth)
        check_int(owner, "num_heads", num_heads)
        if check_int(owner, "dim", dim) % num_heads or dim % 4:
            raise invalid(owner, "dim", f"divisible by 4 and by num_heads={num_heads}", dim)
        check_choice(owner, "groups", groups, ("separate", "joint"))
        check_int(owner, "num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_int(owner, "num_mask_tokens", num_mask_tokens)
        self.mask_token_init = check_choice(owner, "mask_token_init", mask_token_init, ("trunc_normal", "zeros"))
        self.grid, self.num_prefix_tokens, self.groups = grid, num_prefix_tokens, groups
        self.predictor_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(num_mask_tokens, 1, dim))  # (S, 1, P)
        table = predictor_pos_table(dim, grid)  # (N, P)
        self.predictor_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # (1, N, P), fixed
        self.predictor_blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.predictor_proj = nn.Linear(dim, in_dim)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.mask_token_init == "trunc_normal":
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, visible: Tensor, targets: Tensor, mask_index: int = 0) -> Tensor:
        """Predict the target features.

        Args:
            latent: (B, prefix + K, D) context-encoder output.
            visible: (B, K) int64 grid positions of the latent's patch tokens.
            targets: (B, M, T) int64 grid positions to predict, M groups of T tokens.
            mask_index: which mask token the queries start from (the step's mask set, ``Masks.set_index``); with a
                single mask token every set shares it.

        Returns:
            (B, M, T, D) predictions, in the order of ``targets``.
        """
        b, m, t = targets.shape
        c = self.num_prefix_tokens
        x = self.predictor_embed(latent)  # (B, prefix+K, P)
        pos = self.predictor_pos_embed.to(x.dtype).expand(b, -1, -1)  # (B, N, P)
        context = torch.cat([x[:, :c], x[:, c:] + gather_tokens(pos, visible)], dim=1)  # (B, prefix+K, P)
        s = self.mask_token.shape[0]
        if s > 1 and not 0 <= mask_index < s:
            raise ValueError(f"JEPAPredictor has {s} mask tokens, got mask_index={mask_index}")
        token = self.mask_token[mask_index if s > 1 else 0].unsqueeze(0)  # (1, 1, P)
        queries = token.to(x.dtype) + gather_tokens(pos, targets.reshape(b, m * t))  # (B, M*T, P)
        if self.groups == "joint":
            seq = torch.cat([context, queries], dim=1)  # (B, prefix+K+M*T, P)
        else:
            ctx = context.unsqueeze(1).expand(-1, m, -1, -1).reshape(b * m, context.shape[1], -1)  # (B*M, prefix+K, P)
            seq = torch.cat([ctx, queries.reshape(b * m, t, -1)], dim=1)  # (B*M, prefix+K+T, P) sample-major
        seq = self.predictor_blocks(seq)
        num_queries = m * t if self.groups == "joint" else t
        out = seq[:, seq.shape[1] - num_queries :]  # (B, M*T, P) joint, (B*M, T, P) separate
        out = self.predictor_proj(self.predictor_norm(out))  # (B, M*T, D) or (B*M, T, D)
        return out.reshape(b, m, t, -1)  # (B, M, T, D)
