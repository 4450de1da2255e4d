"""The target interface: *what* to predict."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from torch import Tensor, nn

from mim.checks import check_range
from mim.models.base import Encoder
from mim.types import Batch, Masks

__all__ = ["Target"]


class Target(nn.Module, ABC):
    """A prediction target with its own head (decoder, predictor, adapter) and loss.

    Lifecycle: the module calls :meth:`bind` once with the encoder (heads that depend on the encoder's
    width or grid are built there, before any optimizer or distributed wrapper exists), then
    :meth:`encode` (optional) and :meth:`forward` every step and :meth:`after_step` after every optimizer step.

    Args:
        weight: factor of this target's loss in the total loss (>= 0).
    """

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        check_range(self, "weight", weight, 0, math.inf, high_open=True)
        self.weight = float(weight)

    def bind(self, encoder: Encoder) -> None:  # noqa: B027 - optional hook
        """Build whatever depends on the encoder (called once, at module construction)."""

    @abstractmethod
    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: Encoder) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            batch: the normalised batch.
            masks: the step's masks.
            latent: (B, prefix + K, D) encoder output on the visible tokens.
            encoder: the (student) encoder.

        Returns:
            A dict with ``loss`` (scalar) and any other scalars to log.
        """

    def encode(self, batch: Batch, masks: Masks, inputs: Tensor, encoder: Encoder) -> Tensor | None:
        """The step's shared latent, when this target runs the encoder itself; None (default): the module runs
        ``encoder(inputs, masks.visible)``.

        A target that must run the encoder differently (MixedAE's mixed sequences) returns the (B, prefix + K, D)
        latent here; every target then receives it as ``latent`` and the step has one encoder pass. At most one target
        of a module may return one.
        """
        return None

    def token_scores(self, batch: Batch, encoder: Encoder) -> Tensor | None:
        """(B, N) per-token scores for score-driven masking (hard-patch mining); None by default."""
        return None

    def after_step(  # noqa: B027 - optional hook
        self, encoder: Encoder, progress: float, *, applied: Tensor | None = None
    ) -> None:
        """Called after each optimizer step (EMA updates and the like); no-op by default.

        ``applied`` is None after a step that was applied; a () float tensor on the device (1.0: applied, 0.0:
        skipped for a non-finite loss) when that was decided on the device without a host sync (a fused optimizer):
        an EMA update then passes it on (:meth:`mim.ema.EMA.update`), so a skipped step leaves the EMA unchanged.
        """

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of special tokens: decayed only with ``decay_special_tokens``."""
        return set()

    def never_decay(self) -> set[str]:
        """Names (relative to this module) of parameters never weight-decayed (e.g. MaskAlign's layer mixing)."""
        return set()
