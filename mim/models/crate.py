"""CRATE blocks: white-box transformer layers (MSSA + ISTA) that stand in for timm's ``Block``.

Yu et al., "White-Box Transformers via Sparse Rate Reduction", NeurIPS 2023 (the CRATE layer), and Pai, Wu,
Buchanan, Yu, Ma, "Masked Completion via Structured Diffusion with White-Box Transformers", ICLR 2024 (CRATE-MAE:
the same encoder layer and a decoder layer that undoes it). Written from the specification
(/work/shared/methods/MORE.md section 6.2, the release ``Ma-Lab-Berkeley/CRATE`` ``model/crate_ae``):

- **MSSA** (multi-head subspace self-attention): one projection ``U`` (D, D), no bias, split into h heads of
  d_h = D / h; per head ``w = U_h z`` serves as query, key and value: ``softmax(w wᵀ / √d_h) w``; then an output
  ``Linear(D, D)`` with bias.
- **Encoder layer** (:class:`CrateBlock`): ``z½ = z + MSSA(LN(z))``; ``u = LN(z½)``; one ISTA step on a dictionary
  ``D`` (D, D) from ``u``: ``z' = ReLU(u + η Dᵀ(u − D u) − η λ)`` (η = ``step_size`` 0.1, λ = ``lambd`` 0.5 as
  released). There is no residual around the ISTA step other than ``u`` itself.
- **Decoder layer** (:class:`CrateDecoderBlock`): ``v = A LN(x)`` (A (D, D), no bias); ``x' = v − MSSA(LN(v))``.

Vectors are columns in the formulas; in code a row of tokens ``u`` (…, D) maps to ``D u`` as ``F.linear(u, D)``.
Both blocks have timm ``Block``'s call signature (``x -> x`` on (B, L, D)) and accept timm's constructor arguments,
so ``timm.create_model(..., block_fn=CrateBlock)`` builds a CRATE ViT; MLP arguments are ignored.
Parameters per layer: 3D² + 5D (a timm ViT block with qkv bias and MLP ratio 4 has 12D² + 13D).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from mim.checks import check_int, check_range, invalid

__all__ = ["MSSA", "CrateBlock", "CrateDecoderBlock", "ista_step"]


def ista_step(u: Tensor, dictionary: Tensor, step_size: float, lambd: float) -> Tensor:
    """One proximal-gradient (ISTA) step towards a sparse code of ``u`` in ``dictionary``, started from ``u``.

    ``ReLU(u + η Dᵀ(u − D u) − η λ)``: a gradient step on ½‖u − D z‖² at z = u, then the non-negative soft threshold.

    Args:
        u: (..., D) tokens.
        dictionary: (D, D) the matrix D.
        step_size: η.
        lambd: λ, the sparsity weight (threshold η λ).

    Returns:
        (..., D), non-negative.
    """
    residual = u - F.linear(u, dictionary)  # (..., D): u - D u
    grad = F.linear(residual, dictionary.t())  # (..., D): Dᵀ(u - D u)
    return F.relu(u + step_size * grad - step_size * lambd)


class MSSA(nn.Module):
    """Multi-head subspace self-attention: queries, keys and values are one projection per head.

    Args:
        dim: width D.
        num_heads: heads h (D divisible by h).
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        proj_bias: bias of the output projection (released: yes).
    """

    def __init__(
        self, dim: int, num_heads: int, *, attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise invalid("MSSA", "dim", f"divisible by num_heads={num_heads}", dim)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.subspaces = nn.Linear(dim, dim, bias=False)  # U = [U_1 ... U_h], one (d_h, D) block per head
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        b, n, d = x.shape
        w = self.subspaces(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d_h)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(w, w, w, dropout_p=drop)  # (B, h, L, d_h): softmax(w wᵀ/√d_h) w
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        return self.proj_drop(self.proj(out))


def _raw_matrix(dim: int) -> nn.Parameter:
    """A (D, D) parameter with ``nn.Linear``'s default Kaiming-uniform init (as the release's raw matrices)."""
    weight = nn.Parameter(torch.empty(dim, dim))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class CrateBlock(nn.Module):
    """CRATE encoder layer: ``z½ = z + MSSA(LN(z))``, then ``ReLU(u + η Dᵀ(u − D u) − η λ)`` with ``u = LN(z½)``.

    Takes timm ``Block``'s constructor arguments (``timm.create_model(arch, block_fn=CrateBlock)``); ``mlp_ratio``,
    ``qkv_bias``, ``act_layer``, ``mlp_layer``, ``attn_layer``, ``norm_layer`` and ``depth`` are ignored (the norms
    are ``nn.LayerNorm(eps=norm_eps)``, as released). Layer scale and q/k norms have no CRATE counterpart and are
    refused.

    Args:
        dim: width D.
        num_heads: MSSA heads.
        step_size: η of the ISTA step (released 0.1).
        lambd: λ of the ISTA step (released 0.5; see MORE.md 6.4 for its history).
        norm_eps: LayerNorm epsilon (released 1e-5).
        proj_bias: bias of MSSA's output projection.
        attn_drop: attention dropout.
        proj_drop: dropout after MSSA's output projection.
        drop_path: stochastic depth on the MSSA branch (the ISTA step has no residual to drop to).
        init_values: must be None (timm's layer scale).
        qk_norm: must be False.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        step_size: float = 0.1,
        lambd: float = 0.5,
        norm_eps: float = 1e-5,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        qk_norm: bool = False,
        **ignored: Any,
    ) -> None:
        super().__init__()
        owner = "CrateBlock"
        check_int(owner, "dim", dim)
        check_int(owner, "num_heads", num_heads)
        check_range(owner, "step_size", step_size, 0, math.inf, low_open=True)
        check_range(owner, "lambd", lambd, 0, math.inf)
        if init_values is not None:
            raise invalid(owner, "init_values", "None (CRATE has no layer scale)", init_values)
        if qk_norm:
            raise invalid(owner, "qk_norm", "False (MSSA has no separate queries and keys)", qk_norm)
        self.step_size, self.lambd = float(step_size), float(lambd)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MSSA(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, proj_bias=proj_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.dictionary = _raw_matrix(dim)  # D

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D), non-negative."""
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, L, D): compression
        return ista_step(self.norm2(x), self.dictionary, self.step_size, self.lambd)  # (B, L, D): sparsification

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}, lambd={self.lambd}"


class CrateDecoderBlock(nn.Module):
    """CRATE-MAE decoder layer: ``v = A LN(x)``, ``x' = v − MSSA(LN(v))`` (the encoder layer's steps reversed).

    Takes timm ``Block``'s constructor arguments like :class:`CrateBlock`; MLP arguments are ignored.

    Args:
        dim: width D.
        num_heads: MSSA heads.
        norm_eps: LayerNorm epsilon (released 1e-5).
        proj_bias: bias of MSSA's output projection.
        attn_drop: attention dropout.
        proj_drop: dropout after MSSA's output projection.
        drop_path: stochastic depth on the MSSA branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm_eps: float = 1e-5,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        **ignored: Any,
    ) -> None:
        super().__init__()
        check_int("CrateDecoderBlock", "dim", dim)
        check_int("CrateDecoderBlock", "num_heads", num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.expand = _raw_matrix(dim)  # A
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MSSA(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, proj_bias=proj_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        v = F.linear(self.norm1(x), self.expand)  # (B, L, D): A LN(x)
        return v - self.drop_path(self.attn(self.norm2(v)))  # (B, L, D)
