"""The masking interface: *where* to hide.

A strategy maps (batch size, token grid, generator) to :class:`~mim.types.Masks`. Strategies hold
validated configuration only: no parameters, no devices, no state besides their config, so they pickle
and run identically in the training step or in DataLoader workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import random
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from mim.checks import check_range
from mim.masking.functional import scores_to_masks
from mim.types import Masks, TokenGrid, num_visible, step_seed

__all__ = ["MaskingStrategy", "ScoreMasking", "host_random", "stream_position"]


def stream_position(generator: torch.Generator) -> int:
    """Where ``generator`` is in its random stream, read on the host: no device work, no sync.

    A CUDA (Philox) generator's whole state is its seed and offset, both kept on the host; a CPU (Mersenne Twister)
    generator's state is 5 KB of host memory, fingerprinted (about 5 us). Two draws from one generator see different
    positions; a generator reseeded with the same seed sees the same one.
    """
    try:
        return generator.get_offset()
    except RuntimeError:  # "CPU Generator does not use offset"
        state = generator.get_state()  # a host uint8 tensor, read without a Tensor method
        digest = hashlib.blake2b(ctypes.string_at(state.data_ptr(), state.nbytes), digest_size=8).digest()
        return int.from_bytes(digest, "little")


def host_random(generator: torch.Generator, tag: str) -> random.Random:
    """A Python generator for the few per-batch numbers a strategy needs on the host (block shapes, counts).

    Seeded from ``generator``'s seed and :func:`stream_position` (the module seeds the mask generator from (seed,
    step, rank, micro-batch)), so the draws replay on resume, differ between successive batches of one generator, and
    cost no host sync: drawing them on the device and reading them back would cost one per step (issue 13).
    ``tag`` keeps the streams of different uses apart.
    """
    return random.Random(step_seed(generator.initial_seed(), stream_position(generator), tag))


class MaskingStrategy(ABC):
    """Chooses, per sample, which tokens the encoder sees and which ones the targets predict.

    Subclasses implement :meth:`__call__`. Randomness comes only from the ``generator`` argument.
    """

    needs_scores: ClassVar[bool] = False
    """True: the module passes per-token ``scores`` (B, N), e.g. predicted difficulty for hard-patch mining."""

    @abstractmethod
    def __call__(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None = None,
        progress: float = 0.0,
    ) -> Masks:
        """Draw masks for one batch.

        Args:
            batch_size: B.
            grid: the token grid (N = grid.num_tokens).
            generator: the only source of randomness; must live on ``device``.
            device: where the index tensors are created.
            scores: (B, N) per-token scores, only for strategies with ``needs_scores``.
            progress: fraction of training done, in [0, 1] (for schedules).

        Returns:
            Masks with ``visible`` (B, K) and ``targets`` (B, M, T).
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class ScoreMasking(MaskingStrategy):
    """Masking as one operation: per-token scores -> argsort -> keep the K lowest visible.

    Random (MAE), colored-noise (ColorMAE) and hard-patch (HPM) masking differ only in the scores.
    The hidden tokens form one target group (M = 1).

    Args:
        mask_ratio: fraction of tokens hidden from the encoder, in (0, 1); K = int(N * (1 - mask_ratio)).
    """

    def __init__(self, *, mask_ratio: float = 0.75) -> None:
        self.mask_ratio = check_range(self, "mask_ratio", mask_ratio, 0, 1, low_open=True, high_open=True)

    def num_visible(self, num_tokens: int) -> int:
        """K = int(N * (1 - mask_ratio)), at least 1 and at most N - 1."""
        k = num_visible(num_tokens, self.mask_ratio)
        if not 0 < k < num_tokens:
            raise ValueError(
                f"{type(self).__name__}.mask_ratio must keep at least one of the {num_tokens} tokens visible and one "
                f"hidden (at most 1 - 1/{num_tokens} = {1 - 1 / num_tokens:.4g}), got {self.mask_ratio} "
                f"({k} visible); lower mask_ratio or use more tokens (a larger image or a smaller patch)"
            )
        return k

    @abstractmethod
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
        """(B, N) float scores; the K lowest of each row stay visible."""

    def __call__(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None = None,
        progress: float = 0.0,
    ) -> Masks:
        if self.needs_scores and scores is None:
            raise ValueError(f"{type(self).__name__} needs per-token scores (B, N); got scores=None")
        if self.needs_scores and scores is not None and scores.shape != (batch_size, grid.num_tokens):
            raise ValueError(
                f"{type(self).__name__} needs scores of shape (B, N) = ({batch_size}, {grid.num_tokens}), "
                f"got {tuple(scores.shape)}"
            )
        s = self.scores(batch_size, grid, generator=generator, device=device, scores=scores, progress=progress)
        return scores_to_masks(s, self.num_visible(grid.num_tokens))
