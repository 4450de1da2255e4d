"""CAE's latent contextual regressor: cross-attention blocks whose queries read the visible latents.

Chen et al., "Context Autoencoder for Self-Supervised Representation Learning", IJCV 2023 (arXiv 2202.03026), §3
("latent contextual regressor"); the official Atten4Vis/CAE ``RegressorBlock``. Each block updates only the queries
(one per hidden token, the same learned mask token plus the hidden token's position)::

    kv = [z_v ; q]                                   keys and values: the visible latents and the current queries
    q <- q + g1 * CrossAttn(Q = LN_q(q + pos_q), K = LN_k(kv + [pos_v ; pos_q]), V = LN_v(kv))
    q <- LN(q)                                       a layer norm on the residual stream itself, before the MLP
    q <- q + g2 * MLP(q)

The visible latents ``z_v`` are an input to every block and never an output: the regressor cannot change them
(values get no position embedding; ``g1``, ``g2`` are layer scales). A final layer norm gives the predicted latents.

:func:`layer_scale_blocks` is CAE's decoder stack: timm ViT blocks with layer scale, run over the hidden tokens only.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mim.models.decoder import BlockStack

__all__ = ["ContextRegressor", "CrossAttention", "RegressorBlock", "layer_scale_blocks"]


def _layer_scale(dim: int, init_values: float | None) -> nn.Module:
    """A learned per-channel scale starting at ``init_values`` (timm ``LayerScale``), or the identity for None."""
    return LayerScale(dim, init_values) if init_values is not None else nn.Identity()


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a separate key/value sequence.

    Separate q, k, v projections; the key projection has no bias (as CAE's BEiT-style attention: a key bias adds the
    same amount to every logit of a query row, so softmax ignores it and it would never learn).

    Args:
        dim: D, width of queries, keys and values.
        num_heads: heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention.num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attend.

        Args:
            q: (B, T, D) queries.
            k: (B, S, D) keys.
            v: (B, S, D) values.

        Returns:
            (B, T, D).
        """
        b, t, d = q.shape
        h = self.num_heads
        q = self.q(q).reshape(b, t, h, d // h).transpose(1, 2)  # (B, h, T, D/h)
        k = self.k(k).reshape(b, -1, h, d // h).transpose(1, 2)  # (B, h, S, D/h)
        v = self.v(v).reshape(b, -1, h, d // h).transpose(1, 2)  # (B, h, S, D/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, D/h)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class RegressorBlock(nn.Module):
    """One CAE regressor block (see the module docstring): updates the queries only.

    Args:
        dim: D.
        num_heads: attention heads.
        mlp_ratio: MLP expansion.
        init_values: layer-scale initial value (CAE-B: 0.1; CAE-L: 1e-5); None: no layer scale.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float | None = 0.1) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, dim, eps=1e-6)
        self.norm_q, self.norm_k, self.norm_v = norm(), norm(), norm()
        self.attn = CrossAttention(dim, num_heads)
        self.ls1 = _layer_scale(dim, init_values)
        self.norm_mlp = norm()  # on the residual stream (CAE's post-cross-attention norm), not a pre-norm branch
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _layer_scale(dim, init_values)

    def forward(self, queries: Tensor, pos_q: Tensor, context: Tensor, pos_c: Tensor) -> Tensor:
        """Update the queries.

        Args:
            queries: (B, T, D) current queries (hidden tokens).
            pos_q: (B, T, D) position embedding of the hidden tokens.
            context: (B, K, D) visible latents (read, never updated).
            pos_c: (B, K, D) position embedding of the visible tokens.

        Returns:
            (B, T, D) updated queries.
        """
        kv = torch.cat([context, queries], dim=1)  # (B, K+T, D)
        kv_pos = torch.cat([pos_c, pos_q], dim=1)  # (B, K+T, D)
        attn = self.attn(self.norm_q(queries + pos_q), self.norm_k(kv + kv_pos), self.norm_v(kv))  # (B, T, D)
        x = self.norm_mlp(queries + self.ls1(attn))  # (B, T, D)
        return x + self.ls2(self.mlp(x))  # (B, T, D)


class ContextRegressor(nn.Module):
    """CAE's latent contextual regressor: ``depth`` :class:`RegressorBlock` s and a final layer norm.

    Args:
        dim: D (the encoder's width: the predictions are aligned with the encoder's latents).
        depth: blocks (CAE: 4).
        num_heads: attention heads (CAE-B: 12).
        mlp_ratio: MLP expansion (4).
        init_values: layer-scale initial value; None: no layer scale.
    """

    def __init__(
        self, *, dim: int, depth: int = 4, num_heads: int = 12, mlp_ratio: float = 4.0, init_values: float | None = 0.1
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, mlp_ratio, init_values) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, queries: Tensor, pos_q: Tensor, context: Tensor, pos_c: Tensor) -> Tensor:
        """Predict the latents of the hidden tokens.

        Args:
            queries: (B, T, D) initial queries (mask token).
            pos_q: (B, T, D) position embedding of the hidden tokens.
            context: (B, K, D) visible latents.
            pos_c: (B, K, D) position embedding of the visible tokens.

        Returns:
            (B, T, D) predicted latents of the hidden tokens.
        """
        x = queries
        for block in self.blocks:
            x = block(x, pos_q, context, pos_c)  # (B, T, D)
        return self.norm(x)  # (B, T, D)


def layer_scale_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, init_values: float | None) -> BlockStack:
    """``depth`` timm ViT blocks with layer scale (qkv bias, LayerNorm eps 1e-6): CAE's decoder stack.

    Like :func:`mim.models.decoder.transformer_blocks`, plus ``init_values`` (CAE's decoder layer scale, 0.1 for
    CAE-B); a :class:`~mim.models.decoder.BlockStack`, so activation checkpointing reaches it.
    """
    norm = partial(nn.LayerNorm, eps=1e-6)
    return BlockStack(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values, norm_layer=norm)  # type: ignore[arg-type]
        for _ in range(depth)
    )
