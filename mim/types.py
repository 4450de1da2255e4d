"""Shared types and conventions of mim, stated once.

Shape-letter glossary (used in every docstring and trailing shape comment):

    B  batch size                      N  tokens in the full grid (N = T_ * H_ * W_)
    K  visible tokens per sample       M  target groups (1 for MAE, 4 blocks for I-JEPA)
    T  tokens per target group         D  embedding width
    P  values per patch (p * p * C)    C  image channels
    Kd tokens the decoder keeps (dual masking)

Token numbering: tokens are numbered in raster order over the token grid,
``k = (t * H + h) * W + w``. Images have ``t = 0``; a table of F features is the grid (1, 1, F).

Mask convention: a mask is **index tensors with a fixed count per batch**:

* ``visible`` (B, K) int64, sorted ascending: the tokens the encoder sees;
* ``targets`` (B, M, T) int64: the tokens each target group predicts (for MAE, M = 1 and the
  group holds the N - K hidden tokens, sorted ascending);
* ``decoder`` (B, Kd) int64 or None: the tokens a decoder reconstructs (dual masking).

A step may draw several mask sets (V-JEPA's short- and long-range masks, :class:`~mim.masking.MultiMasking`): the
first set's ``Masks`` holds the others in ``more``, and :attr:`Masks.sets` lists them all; the module runs the encoder
and every target once per set and averages the losses. ``set_index`` tells a target which set it sees (V-JEPA gives
each set its own mask token).

Indices address patch tokens only; prefix tokens (cls, registers) are the encoder's business.
The boolean view :attr:`Masks.hidden` (B, N) has **True = hidden** (not seen by the encoder).
The visible count is ``K = int(N * (1 - mask_ratio))``, the form of MAE and the image references
(:func:`num_visible`); VideoMAE's tube mask floors the hidden count instead (``TubeMasking(count="videomae")``).

Batches are dicts (:class:`Batch`): the data loaders yield ``uint8`` images and the datamodule
normalises them on the device (``on_after_batch_transfer``), so a model always receives
float images normalised with the dataset's mean and std.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TypedDict

import torch
from torch import Tensor

__all__ = ["Batch", "Masks", "TokenGrid", "num_visible", "step_seed"]


class Batch(TypedDict, total=False):
    """One batch as the model sees it.

    Keys:
        image: (B, C, H, W) float, normalised (uint8 before ``on_after_batch_transfer``).
        video: (B, C, T, H, W) float clips, normalised (uint8 before ``on_after_batch_transfer``).
        label: (B,) int64 class index, where the dataset has labels.
    """

    image: Tensor
    video: Tensor
    label: Tensor


@dataclass(frozen=True)
class TokenGrid:
    """The shape of a token grid: ``T`` time slots x ``H`` rows x ``W`` columns (raster order).

    Attributes:
        t: tokens along time (1 for images and tables).
        h: token rows.
        w: token columns (features for a table).
    """

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        for name in ("t", "h", "w"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenGrid.{name} must be a positive int, got {value!r}")

    @property
    def num_tokens(self) -> int:
        """N = t * h * w."""
        return self.t * self.h * self.w

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Visible count ``K = int(N * (1 - mask_ratio))`` (facebookresearch/mae models_mae.py ``random_masking``).

    ``N - int(N * mask_ratio)`` differs for many ratios (N = 196, ratio 0.7: 59 instead of 58).
    """
    return int(num_tokens * (1 - mask_ratio))


@dataclass
class Masks:
    """Where to hide, as index tensors with a fixed count per batch (see the module docstring).

    Attributes:
        visible: (B, K) int64, sorted ascending.
        targets: (B, M, T) int64.
        num_tokens: N, the size of the full token grid.
        decoder: (B, Kd) int64 or None.
        set_index: which of the step's mask sets this is (0 for a single mask).
        num_sets: how many mask sets the step has.
        more: the step's further mask sets (only on set 0; each with its own counts).
    """

    visible: Tensor
    targets: Tensor
    num_tokens: int
    decoder: Tensor | None = None
    set_index: int = 0
    num_sets: int = 1
    more: tuple[Masks, ...] = ()

    @property
    def sets(self) -> list[Masks]:
        """Every mask set of the step, in order: this one (without ``more``) and ``more``."""
        if not self.more:
            return [self]
        return [replace(self, more=()), *self.more]

    @property
    def batch_size(self) -> int:
        return self.visible.shape[0]

    @property
    def hidden(self) -> Tensor:
        """(B, N) bool, True = hidden from the encoder."""
        hidden = torch.ones(self.batch_size, self.num_tokens, dtype=torch.bool, device=self.visible.device)
        return hidden.scatter_(1, self.visible, False)  # (B, N)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Masks:
        decoder = None if self.decoder is None else self.decoder.to(device, non_blocking=non_blocking)
        return Masks(
            self.visible.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.num_tokens,
            decoder,
            self.set_index,
            self.num_sets,
            tuple(m.to(device, non_blocking=non_blocking) for m in self.more),
        )


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from integers (seed, step, rank, micro-batch, ...) and tags: pure Python, no device work.

    Every random draw of a training step comes from a generator seeded with this (masks on the device, augmentation
    draws on the host), so a resumed run replays the same draws.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
