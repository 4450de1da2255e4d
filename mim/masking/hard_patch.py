"""Hard-patch mining (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023).

HPM hides the patches a teacher predicts to be hard to reconstruct. A loss predictor (an option of
:class:`~mim.targets.pixels.PixelTarget`) run by an EMA copy of the student scores every token of the full
image; this strategy receives those scores through ``Target.token_scores`` and hides

* the ``k = int(M * alpha)`` tokens with the largest predicted loss (M = N - K hidden tokens in all), and
* ``M - k`` further tokens chosen uniformly at random among the rest,

where ``alpha`` follows an easy-to-hard schedule that reaches ``max_hard_fraction`` (HPM: 0.5) at the end of
training (official Haochen-Wang409/HPM models_mae_learn_loss.py ``generate_mask``, called from
engine_pretrain.py with the epoch):

* ``ramp_every="epoch"`` (the official code): ``alpha = max_hard_fraction * (e + 1) / T`` for epoch ``e``
  (0-based) of ``T = epochs``, constant within an epoch. The module passes only ``progress`` (optimizer steps done
  / total steps), so ``e = floor(progress * T)`` (:func:`epoch_index`): ``epochs`` must be the run's
  ``trainer.max_epochs``, with the same number of optimizer steps in every epoch.
* ``ramp_every="step"``: ``alpha = max_hard_fraction * progress``, moving every step (a continuous version; at
  the start of epoch ``e`` it is one epoch behind the official ``(e + 1) / T``).

Vectorised: the official ``generate_mask`` loops over samples in NumPy after a ``.cpu()`` per sample; here the
random part is U[0, 1) noise from the step's generator, the hard tokens get the score 2 (above any noise) and the
K lowest scores stay visible, so there is no host sync and no loop. The distribution is the same as the official
one (the top-k are always hidden, the rest is a uniform subset); the random stream is not bit-identical to
NumPy's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_int, check_range
from mim.masking.base import ScoreMasking
from mim.types import TokenGrid

__all__ = ["HardPatchMasking", "epoch_index", "hard_patch_scores", "num_hard"]


def epoch_index(progress: float, epochs: int) -> int:
    """The 0-based epoch ``e = floor(progress * epochs)``, clamped to ``[0, epochs - 1]``.

    ``progress`` is ``global_step / total_steps``: with ``S`` optimizer steps per epoch, step ``k`` gives
    ``floor(k / S)``. A 1e-9 slack absorbs the rounding of ``k / (epochs * S) * epochs`` just below an integer (the
    first step of an epoch); distinct steps differ by ``1 / S``, far more.
    """
    return min(max(math.floor(float(progress) * epochs + 1e-9), 0), epochs - 1)


def num_hard(num_tokens: int, num_visible: int, alpha: float) -> int:
    """k = int(M * alpha), the number of hidden tokens chosen by predicted difficulty (M = N - K)."""
    return int((num_tokens - num_visible) * alpha)


def hard_patch_scores(predicted: Tensor, noise: Tensor, num_hard: int) -> Tensor:
    """Masking scores that hide the ``num_hard`` hardest tokens and leave the rest to the noise.

    Args:
        predicted: (B, N) predicted difficulty (larger = harder).
        noise: (B, N) U[0, 1) noise.
        num_hard: k, 0 <= k <= N - K.

    Returns:
        (B, N) scores for "keep the K lowest visible": the k hardest tokens score 2.0, the others their noise.
    """
    if num_hard <= 0:
        return noise
    hardest = torch.topk(predicted, num_hard, dim=1, sorted=False).indices  # (B, k)
    return noise.scatter(1, hardest, 2.0)  # (B, N)


class HardPatchMasking(ScoreMasking):
    """HPM's easy-to-hard masking from predicted per-token difficulty.

    Needs per-token scores (``needs_scores = True``): pair it with a target that provides them, e.g.
    ``PixelTarget(loss_predictor=True)``. Exactly ``K = int(N * (1 - mask_ratio))`` tokens stay visible.

    Args:
        mask_ratio: fraction of tokens hidden, in (0, 1). HPM uses 0.75.
        max_hard_fraction: alpha at the end of training: the share of the hidden tokens chosen by difficulty,
            in [0, 1]. HPM uses 0.5 (half hard, half random in the last epoch).
        ramp_every: ``step`` (alpha moves with ``progress``) or ``epoch`` (HPM's official ``(e + 1) / T`` steps,
            needs ``epochs``); see the module docstring.
        epochs: T, the run's number of epochs (``trainer.max_epochs``); required by ``ramp_every="epoch"``, which
            recovers the epoch from ``progress`` as ``floor(progress * T)``. Ignored per step.
    """

    needs_scores = True

    def __init__(
        self,
        *,
        mask_ratio: float = 0.75,
        max_hard_fraction: float = 0.5,
        ramp_every: Literal["step", "epoch"] = "step",
        epochs: int | None = None,
    ) -> None:
        super().__init__(mask_ratio=mask_ratio)
        self.max_hard_fraction = check_range(self, "max_hard_fraction", max_hard_fraction, 0, 1)
        self.ramp_every = check_choice(self, "ramp_every", ramp_every, ("step", "epoch"))
        if ramp_every == "epoch" and epochs is None:
            raise ValueError(
                "HardPatchMasking.epochs must be set (the run's trainer.max_epochs) with ramp_every='epoch', got None"
            )
        self.epochs = None if epochs is None else check_int(self, "epochs", epochs, minimum=1)

    def alpha(self, progress: float) -> float:
        """The share of hidden tokens chosen by difficulty at ``progress`` (the easy-to-hard ramp).

        Per epoch: ``max_hard_fraction * ((e + 1) / T)`` with ``e = epoch_index(progress, T)``, the official
        ``float((epoch + 1) / total_epoch) * 0.5`` in the same float operations. Per step:
        ``max_hard_fraction * progress`` (clamped to [0, 1]).
        """
        if self.ramp_every == "epoch":
            assert self.epochs is not None  # checked in __init__
            return self.max_hard_fraction * ((epoch_index(progress, self.epochs) + 1) / self.epochs)
        return self.max_hard_fraction * min(max(float(progress), 0.0), 1.0)

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
        noise = torch.rand(batch_size, n, generator=generator, device=device)  # (B, N)
        k = num_hard(n, self.num_visible(n), self.alpha(progress))
        return hard_patch_scores(scores.detach().to(device), noise, k)  # (B, N)
