"""Attention-guided masking (MaskAlign: Xue et al., "Stare at What You See: Masked Image Modeling without
Reconstruction", CVPR 2023; official OpenDriveLab/maskalign models_pretrain.py).

A frozen teacher's last-block CLS-to-patch attention ``a`` (B, N), averaged over heads, weights a random order of
the tokens: MaskAlign draws ``multinomial(a, N, replacement=False)`` and keeps the first K tokens **visible**, so
salient patches are likelier to be seen ("stare at what you see"). The scores come from a target through
``Target.token_scores`` (``TeacherTarget(attention_scores=True)``).

Vectorised with the Gumbel-top-k trick (Vieira 2014; Kool et al., ICML 2019): with i.i.d. Gumbel noise
``g = -log(-log(u))``, ``u ~ U(0, 1)`` from the step's generator, the K largest ``log(a) + g`` are distributed as
K sequential draws without replacement with probabilities proportional to ``a``. This strategy returns the scores
``-(log(a) + g)`` and the shared rule "keep the K lowest visible" (:class:`~mim.masking.base.ScoreMasking`) keeps
exactly those K. Zero weights score ``+inf`` and stay hidden while enough positive weights remain; the scale of
``a`` does not matter. Equivalence with sequential weighted sampling is tested statistically
(tests/test_masking_attention.py); the random stream is not ``torch.multinomial``'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mim.masking.base import ScoreMasking
from mim.types import TokenGrid

__all__ = ["AttentionMasking", "gumbel_topk_scores"]


def gumbel_topk_scores(weights: Tensor, uniform: Tensor) -> Tensor:
    """Scores whose K lowest are a weighted sample of K tokens without replacement.

    Args:
        weights: (B, N) non-negative sampling weights (any scale; negative values count as 0).
        uniform: (B, N) U[0, 1) noise.

    Returns:
        (B, N) float32 ``-(log(weights) + Gumbel)``.
    """
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.float().clamp(tiny, 1.0 - 2**-24)))  # (B, N) standard Gumbel
    return -(weights.float().clamp_min(0).log() + gumbel)  # (B, N)


class AttentionMasking(ScoreMasking):
    """MaskAlign's attention-guided masking: keep K tokens drawn by teacher attention without replacement.

    Needs per-token scores (``needs_scores = True``): the teacher's CLS attention, e.g. from
    ``TeacherTarget(attention_scores=True)``. Exactly ``K = int(N * (1 - mask_ratio))`` tokens stay visible.

    Args:
        mask_ratio: fraction of tokens hidden, in (0, 1). MaskAlign recommends 0.7 (K = 58 of 196).
    """

    needs_scores = True

    def __init__(self, *, mask_ratio: float = 0.7) -> None:
        super().__init__(mask_ratio=mask_ratio)

    def scores(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None,
        progress: float,
    ) -> Tensor:
        n = grid.num_tokens
        assert scores is not None  # (B, N), checked by ScoreMasking.__call__
        uniform = torch.rand(batch_size, n, generator=generator, device=device)  # (B, N)
        return gumbel_topk_scores(scores.detach().to(device), uniform)  # (B, N)
