"""Dual masking (Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking", CVPR 2023;
official OpenGVLab/VideoMAEv2 dataset/masking_generator.py and models/modeling_pretrain.py).

The encoder sees the tokens a wrapped strategy leaves visible (VideoMAE V2: tube masking, ratio 0.9); the
decoder then reconstructs only a subset of the grid, the **decoder-kept** tokens ``Masks.decoder`` (B, Kd),
instead of every hidden token. The loss is averaged over the tokens that are hidden from the encoder *and*
kept by the decoder (see :class:`~mim.targets.pixels.PixelTarget`). VideoMAE V2 chooses the decoder subset
with a *running cell*: a 2x2 spatial cell in which ``4 * ratio`` positions are dropped, the pattern rotating
by one position per time slot, so every frame keeps the same number of positions and, over four
consecutive slots, every spatial position is decoded equally often.
"""

from __future__ import annotations

from numbers import Real
from typing import Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_int, check_range, invalid
from mim.masking.base import MaskingStrategy
from mim.masking.tube import TubeMasking
from mim.types import Masks, TokenGrid, num_visible

__all__ = ["DualMasking", "RunningCellMasking", "running_cell_maps"]

NUM_PHASES = 4  # a 2x2 cell has four positions, so the running pattern has four start phases


def running_cell_maps(grid: TokenGrid, num_dropped: int, *, device: torch.device | str = "cpu") -> Tensor:
    """The four phase maps of the running-cell decoder mask, True = dropped from the decoder.

    As VideoMAEv2's ``RunningCellMaskingGenerator`` (dataset/masking_generator.py).

    A cell is a 2x2 spatial unit whose positions ``i = 2 * (h % 2) + (w % 2)`` (TL, TR, BL, BR) read a queue
    ``q = [1] * num_dropped + [0] * (4 - num_dropped)`` (1 = dropped); phase ``p`` at time slot ``t`` reads
    ``q[(i + p + t + 1) % 4]`` (the pointer advances before each read). The cell tiles the (H, W) grid.
    For ``num_dropped = 2`` the top-left cell of phase 0 runs ``1001, 0011, 0110, 1100, 1001, ...`` over t.

    Args:
        grid: the token grid; ``grid.h`` and ``grid.w`` must be even.
        num_dropped: positions dropped per cell, in 1..3.
        device: where the maps are built.

    Returns:
        (4, T, H, W) bool, one map per start phase; every (phase, slot) drops exactly ``H*W*num_dropped/4``.
    """
    if grid.h % 2 or grid.w % 2:
        raise ValueError(
            f"running-cell decoder masking tiles 2x2 cells and needs an even token grid (H, W), got "
            f"{(grid.h, grid.w)} (so does VideoMAE V2's, OpenGVLab/VideoMAEv2 dataset/masking_generator.py); "
            "choose image and patch sizes giving even H and W"
        )
    check_int("running_cell_maps", "num_dropped", num_dropped, minimum=1, maximum=3)
    p = torch.arange(NUM_PHASES, device=device).view(-1, 1, 1, 1)  # (4, 1, 1, 1)
    t = torch.arange(grid.t, device=device).view(1, -1, 1, 1)  # (1, T, 1, 1)
    row = (torch.arange(grid.h, device=device) % 2).view(1, 1, -1, 1)  # (1, 1, H, 1)
    col = (torch.arange(grid.w, device=device) % 2).view(1, 1, 1, -1)  # (1, 1, 1, W)
    return (2 * row + col + p + t + 1) % NUM_PHASES < num_dropped  # (4, T, H, W): q[j] = 1 iff j < num_dropped


class RunningCellMasking:
    """VideoMAE V2's running-cell decoder mask: per sample, one of four fixed phase maps, chosen uniformly.

    Not a :class:`~mim.masking.base.MaskingStrategy` (it draws no encoder mask); :class:`DualMasking` calls it.
    Each frame keeps ``Kd / T = H*W*(1 - mask_ratio)`` positions; at ratio 0.5 every spatial position is
    decoder-kept exactly twice in any four consecutive time slots. On a T = 1 grid it is a per-image 2x2 cell
    pattern (four possible maps). Holds configuration only (pickles).

    Args:
        mask_ratio: fraction of tokens dropped from the decoder: 0.25, 0.5 (VideoMAE V2) or 0.75, i.e. 1, 2
            or 3 positions of each 2x2 cell.
    """

    def __init__(self, *, mask_ratio: float = 0.5) -> None:
        self.mask_ratio = _check_cell_ratio("RunningCellMasking", "mask_ratio", mask_ratio)

    @property
    def num_dropped(self) -> int:
        """Positions dropped per 2x2 cell, ``4 * mask_ratio``."""
        return round(NUM_PHASES * self.mask_ratio)

    def num_kept(self, grid: TokenGrid) -> int:
        """Kd = N * (4 - num_dropped) / 4 decoder-kept tokens per sample (exact: H and W are even)."""
        return grid.num_tokens * (NUM_PHASES - self.num_dropped) // NUM_PHASES

    def phase_indices(self, grid: TokenGrid, *, device: torch.device | str = "cpu") -> Tensor:
        """(4, Kd) int64 decoder-kept token indices of each phase, sorted ascending (raster order)."""
        dropped = running_cell_maps(grid, self.num_dropped, device=device).flatten(1)  # (4, N)
        order = torch.argsort(dropped.to(torch.uint8), dim=1, stable=True)  # (4, N) kept first, in index order
        return order[:, : self.num_kept(grid)]  # (4, Kd)

    def __call__(self, batch_size: int, grid: TokenGrid, *, generator: torch.Generator, device: torch.device) -> Tensor:
        """Draw one phase per sample.

        Args:
            batch_size: B.
            grid: the token grid (even H and W).
            generator: the only source of randomness; must live on ``device``.
            device: where the indices are created.

        Returns:
            (B, Kd) int64 decoder-kept token indices, sorted ascending.
        """
        table = self.phase_indices(grid, device=device)  # (4, Kd)
        phase = torch.randint(NUM_PHASES, (batch_size,), generator=generator, device=device)  # (B,)
        return table[phase]  # (B, Kd)

    def __repr__(self) -> str:
        return f"RunningCellMasking(mask_ratio={self.mask_ratio!r})"


def _check_cell_ratio(owner: str, field: str, value: float) -> float:
    number = isinstance(value, Real) and not isinstance(value, bool)
    if not (number and any(abs(float(value) - q / NUM_PHASES) < 1e-9 for q in (1, 2, 3))):
        expected = "0.25, 0.5 or 0.75 for a running-cell decoder mask (1, 2 or 3 of the 4 positions of a 2x2 cell)"
        raise invalid(owner, field, expected, value)
    return float(value)


class DualMasking(MaskingStrategy):
    """VideoMAE V2's dual masking: an encoder mask from a wrapped strategy plus a decoder mask.

    ``Masks.visible`` and ``Masks.targets`` are the wrapped strategy's (the encoder-hidden tokens as one target
    group); ``Masks.decoder`` (B, Kd) holds the decoder-kept tokens, sorted ascending. A decoder then takes
    the K visible latents plus one mask token at **every** decoder-kept position, visible to the encoder or
    not (as the official models/modeling_pretrain.py), and the loss counts only tokens that are hidden *and*
    decoder-kept.

    * ``decoder_mask="running_cell"``: :class:`RunningCellMasking` (needs even H and W);
      ``Kd = N * (1 - decoder_mask_ratio)``.
    * ``decoder_mask="random"``: ``Kd = int(N * (1 - decoder_mask_ratio))`` tokens per sample, uniformly at
      random over the whole grid.
    * ``decoder_mask_ratio = 0`` reproduces VideoMAE V1 / MAE: the decoder keeps the complement of the visible
      tokens (``decoder`` = the hidden tokens), so the decoder input and the loss are V1's exactly (as in the
      official code). The ``decoder_mask`` kind is then irrelevant.

    Counts with the defaults, as the official code (the tube keeps ``H*W - int(0.9 * H*W)`` positions per slot,
    ``TubeMasking(count="videomae")``; each spatial position is decoder-kept in exactly 4 of 8 slots, so the loss
    covers 4 x the hidden positions): on VideoMAE's ViT-B grid 8x14x14, K = 8 * 20 = 160 visible, Kd = 784,
    exactly 4 * 176 = 704 loss tokens per clip, decoder input 160 + 784 = 944 tokens; on VideoMAE V2's ViT-g grid
    8x16x16, K = 208, Kd = 1024, 4 * 230 = 920 loss tokens. ``TubeMasking(count="mae")`` gives 152 / 708 and
    200 / 924 instead.

    Randomness: the wrapped strategy draws first from the generator, then the decoder mask. ``needs_scores``
    mirrors the wrapped strategy, and ``scores`` / ``progress`` are passed through to it.

    Args:
        encoder: the encoder-side strategy; it must return one target group holding exactly the N - K hidden
            tokens (TubeMasking, RandomMasking, ColoredNoiseMasking, ...), and no decoder mask of its own.
            Default: ``TubeMasking(mask_ratio=0.9)`` (VideoMAE V2). In YAML, a nested ``class_path`` /
            ``init_args``.
        decoder_mask_ratio: fraction of the grid dropped from the decoder, in [0, 1); for ``running_cell``
            one of 0, 0.25, 0.5 (VideoMAE V2), 0.75.
        decoder_mask: ``running_cell`` (VideoMAE V2) or ``random``.
    """

    def __init__(
        self,
        *,
        encoder: MaskingStrategy = TubeMasking(mask_ratio=0.9),
        decoder_mask_ratio: float = 0.5,
        decoder_mask: Literal["running_cell", "random"] = "running_cell",
    ) -> None:
        if not isinstance(encoder, MaskingStrategy):
            raise ValueError(f"DualMasking.encoder must be a MaskingStrategy, got {type(encoder).__name__}")
        if isinstance(encoder, DualMasking):
            raise ValueError("DualMasking.encoder must not be a DualMasking (it already draws a decoder mask)")
        check_choice("DualMasking", "decoder_mask", decoder_mask, ("running_cell", "random"))
        ratio = check_range("DualMasking", "decoder_mask_ratio", decoder_mask_ratio, 0, 1, high_open=True)
        if decoder_mask == "running_cell" and ratio > 0:
            _check_cell_ratio("DualMasking", "decoder_mask_ratio", ratio)
        self.encoder = encoder
        self.decoder_mask_ratio = ratio
        self.decoder_mask = decoder_mask
        self.needs_scores = encoder.needs_scores  # type: ignore[misc]  # scores are passed to the wrapped strategy
        self._cell = RunningCellMasking(mask_ratio=ratio) if decoder_mask == "running_cell" and ratio > 0 else None

    def num_decoder_kept(self, grid: TokenGrid) -> int | None:
        """Kd for ``grid``; None for ratio 0 (then Kd = N - K, the wrapped strategy's hidden count)."""
        if self.decoder_mask_ratio == 0:
            return None
        if self._cell is not None:
            return self._cell.num_kept(grid)
        return num_visible(grid.num_tokens, self.decoder_mask_ratio)

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
        if self._cell is not None and (grid.h % 2 or grid.w % 2):  # fail before drawing anything
            running_cell_maps(grid, self._cell.num_dropped)
        masks = self.encoder(batch_size, grid, generator=generator, device=device, scores=scores, progress=progress)
        n, k = grid.num_tokens, masks.visible.shape[1]
        if masks.decoder is not None:
            raise ValueError(f"DualMasking.encoder ({self.encoder!r}) returned its own decoder mask")
        if masks.targets.shape[1:] != (1, n - k):
            raise ValueError(
                f"DualMasking.encoder ({self.encoder!r}) must return one target group holding the N - K = {n - k} "
                f"hidden tokens, got targets of shape {tuple(masks.targets.shape)} (B, M, T)"
            )
        if self.decoder_mask_ratio == 0:  # V1: the decoder reconstructs every hidden token
            decoder = masks.targets[:, 0].sort(dim=1).values  # (B, N-K)
        elif self._cell is not None:
            decoder = self._cell(batch_size, grid, generator=generator, device=device)  # (B, Kd)
        else:
            kd = num_visible(n, self.decoder_mask_ratio)
            if kd < 1:
                raise ValueError(
                    f"DualMasking.decoder_mask_ratio must keep at least one of the {n} tokens for the decoder "
                    f"(at most 1 - 1/{n} = {1 - 1 / n:.4g}), got {self.decoder_mask_ratio}; lower decoder_mask_ratio"
                )
            noise = torch.rand(batch_size, n, generator=generator, device=device)  # (B, N)
            decoder = torch.argsort(noise, dim=1)[:, :kd].sort(dim=1).values  # (B, Kd)
        return Masks(visible=masks.visible, targets=masks.targets, num_tokens=n, decoder=decoder)

    def __repr__(self) -> str:
        return (
            f"DualMasking(encoder={self.encoder!r}, decoder_mask_ratio={self.decoder_mask_ratio!r}, "
            f"decoder_mask={self.decoder_mask!r})"
        )
