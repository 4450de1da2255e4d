"""MaskAlign's dynamic alignment: a learnable mix of student layers, then one adapter per aligned teacher layer.

Xue et al., "Stare at What You See: Masked Image Modeling without Reconstruction", CVPR 2023 (official
OpenDriveLab/maskalign models_pretrain.py). With student block outputs ``h_1 .. h_S`` (before the final norm)
and a layer-mixing matrix ``W`` of shape (T, S) (T = teacher blocks), the student feature aligned with teacher
block ``i`` is ``s_i = head_i(sum_j W_ij h_j)``:

* ``linear`` fusion: ``W = I + 0.01`` (every entry 0.01, diagonal 1.01), needs S = T;
* ``sum`` fusion: ``W = 1 / S`` everywhere, any S and T;
* ``simple``: no fusion, ``s_i = head_i(h_i)`` (S = T).

The adapter ``head_i`` (official ``head_type``; every Linear Xavier-uniform with zero bias, every LayerNorm
weight 1 and bias 0, as the official ``_init_weights``; ``LN`` is the student's ``LayerNorm(D, eps=1e-6)``):

* ``linear`` (official default and recommended): ``Linear(D -> D_t)``;
* ``norm_linear``: ``LN(D) -> Linear(D -> D_t)``;
* ``mlp``: ``Linear(D -> D) -> GELU (exact erf) -> Linear(D -> D_t)``, hidden width D;
* ``mlp2``: ``Linear(D -> D) -> LN(D) -> Linear(D -> D_t)`` (no activation).

Only the aligned teacher layers (MaskAlign's ``top5``: the last 5 of 12) get an adapter, and only their rows of
``W`` are used; the other rows stay at their initial values (zero gradient), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mim.checks import check_choice

__all__ = ["HEAD_TYPES", "DynamicAlignment", "adapters", "linear_adapters"]

HeadType = Literal["linear", "norm_linear", "mlp", "mlp2"]
HEAD_TYPES: tuple[str, ...] = ("linear", "norm_linear", "mlp", "mlp2")


def linear_adapters(count: int, in_dim: int, out_dim: int) -> nn.ModuleList:
    """``count`` Linear(in_dim -> out_dim) adapters, Xavier-uniform weights and zero bias (MAE's linear init)."""
    return adapters("linear", count, in_dim, out_dim)


def _adapter(kind: str, in_dim: int, out_dim: int, norm_eps: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "norm_linear":
        return nn.Sequential(nn.LayerNorm(in_dim, eps=norm_eps), nn.Linear(in_dim, out_dim))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    if kind == "mlp2":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim, eps=norm_eps), nn.Linear(in_dim, out_dim))
    raise ValueError(f"adapter kind must be one of {HEAD_TYPES}, got {kind!r}")


def adapters(kind: HeadType, count: int, in_dim: int, out_dim: int, *, norm_eps: float = 1e-6) -> nn.ModuleList:
    """``count`` MaskAlign adapter heads (B, L, in_dim) -> (B, L, out_dim) of one ``kind`` (module docstring).

    Structure as the official ``distill_heads`` (OpenDriveLab/maskalign models_pretrain.py): the hidden width of
    ``mlp`` / ``mlp2`` is ``in_dim``; ``norm_eps`` is the student's LayerNorm epsilon (ViT-B/L: 1e-6). Every Linear
    is Xavier-uniform with zero bias (MAE's linear init), every LayerNorm weight 1 and bias 0.
    """
    heads = [_adapter(kind, in_dim, out_dim, norm_eps) for _ in range(count)]
    for head in heads:
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return nn.ModuleList(heads)


class DynamicAlignment(nn.Module):
    """Fuse student layers with a learnable (T, S) matrix and adapt each aligned layer to the teacher's width.

    Args:
        student_depth: S, the student's blocks.
        teacher_depth: T, the teacher's blocks.
        layers: the aligned teacher blocks (0-based, ascending); one adapter each.
        in_dim: student width D.
        out_dim: teacher width D_t.
        fusion: ``linear`` (W = I + 0.01), ``sum`` (W = 1/S) or ``simple`` (no fusion).
        head: adapter type, ``linear``, ``norm_linear``, ``mlp`` or ``mlp2`` (module docstring).
        norm_eps: epsilon of the adapters' LayerNorms (the student's: 1e-6 for MAE / timm ViTs).
    """

    layer_weights: nn.Parameter | None

    def __init__(
        self,
        *,
        student_depth: int,
        teacher_depth: int,
        layers: Sequence[int],
        in_dim: int,
        out_dim: int,
        fusion: Literal["linear", "sum", "simple"] = "linear",
        head: HeadType = "linear",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_choice("TeacherTarget", "fusion", fusion, ("linear", "sum", "simple"))
        check_choice("TeacherTarget", "head", head, HEAD_TYPES)
        if fusion in ("linear", "simple") and student_depth != teacher_depth:
            raise ValueError(
                f"TeacherTarget.fusion={fusion!r} needs as many student blocks as teacher blocks, got "
                f"{student_depth} and {teacher_depth}; use fusion='sum' for different depths"
            )
        layers = list(layers)
        if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < teacher_depth:
            raise ValueError(f"aligned teacher layers must be ascending indices in [0, {teacher_depth}), got {layers}")
        self.fusion, self.layers = fusion, layers
        self.student_depth, self.teacher_depth = student_depth, teacher_depth
        if fusion == "linear":
            init = torch.eye(teacher_depth, student_depth) + 0.01  # (T, S): I + 0.01
        elif fusion == "sum":
            init = torch.full((teacher_depth, student_depth), 1.0 / student_depth)  # (T, S)
        self.layer_weights = nn.Parameter(init) if fusion != "simple" else None
        self.heads = adapters(head, len(layers), in_dim, out_dim, norm_eps=norm_eps)

    @property
    def student_blocks(self) -> list[int]:
        """The student blocks the alignment reads: all of them with fusion, the aligned ones without."""
        return list(range(self.student_depth)) if self.layer_weights is not None else list(self.layers)

    def forward(self, blocks: Sequence[Tensor]) -> list[Tensor]:
        """Aligned student features, one per aligned teacher layer.

        Args:
            blocks: the outputs of :attr:`student_blocks`, in that order, each (B, L, D).

        Returns:
            ``len(layers)`` tensors (B, L, D_t).
        """
        if len(blocks) != len(self.student_blocks):
            raise ValueError(f"DynamicAlignment expects {len(self.student_blocks)} block outputs, got {len(blocks)}")
        if self.layer_weights is None:
            fused: Sequence[Tensor] = blocks
        else:
            h = torch.stack(list(blocks))  # (S, B, L, D)
            w = self.layer_weights[self.layers].to(h.dtype)  # (A, S): the aligned rows
            fused = torch.einsum("as,sbld->abld", w, h).unbind(0)  # A x (B, L, D)
        return [head(f) for head, f in zip(self.heads, fused)]  # A x (B, L, D_t)
