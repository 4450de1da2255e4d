"""MaskAlign's dynamic alignment: a learnable mix of student layers, then one adapter per aligned teacher layer.

Xue et al., "Stare at What You See: Masked Image Modeling without Reconstruction", CVPR 2023 (official
OpenDriveLab/maskalign models_pretrain.py). With student block outputs ``h_1 .. h_S`` (before the final norm)
and a layer-mixing matrix ``W`` of shape (T, S) (T = teacher blocks), the student feature aligned with teacher
block ``i`` is ``s_i = head_i(sum_j W_ij h_j)``:

* ``linear`` fusion: ``W = I + 0.01`` (every entry 0.01, diagonal 1.01), needs S = T;
* ``sum`` fusion: ``W = 1 / S`` everywhere, any S and T;
* ``simple``: no fusion, ``s_i = head_i(h_i)`` (S = T).

Only the aligned teacher layers (MaskAlign's ``top5``: the last 5 of 12) get an adapter, and only their rows of
``W`` are used; the other rows stay at their initial values (zero gradient), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mim.checks import check_choice

__all__ = ["DynamicAlignment", "linear_adapters"]


def linear_adapters(count: int, in_dim: int, out_dim: int) -> nn.ModuleList:
    """``count`` Linear(in_dim -> out_dim) adapters, Xavier-uniform weights and zero bias (MAE's linear init)."""
    heads = [nn.Linear(in_dim, out_dim) for _ in range(count)]
    for head in heads:
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)
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
    ) -> None:
        super().__init__()
        check_choice("TeacherTarget", "fusion", fusion, ("linear", "sum", "simple"))
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
        self.heads = linear_adapters(len(layers), in_dim, out_dim)

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
