"""HardPatchTarget: MAE's pixel target plus HPM's loss predictor and its EMA teacher.

Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023 (official code Haochen-Wang409/HPM,
``models_mae_learn_loss.py``). Next to the reconstructor, a loss predictor (a second decoder
stack on the same decoder input) learns to rank the hidden tokens by their detached reconstruction loss; the total is
``L_rec + loss_predictor_weight * L_pred``. An EMA copy of the student (encoder, decoder embedding, loss predictor)
scores every token of the full input through :meth:`HardPatchTarget.token_scores`, which drives
:class:`~mim.masking.hard_patch.HardPatchMasking`. The EMA pass runs the encoder on all N tokens and only the
loss-predictor stack (the official code also runs the reconstructor there and discards its output).

The EMA momentum ramps from 0.999 to 0.9999 over the first 100 epochs, then stays (official engine_pretrain.py:
``0.999 + epoch / 100 * (0.9999 - 0.999)`` for ``epoch < 100``, set once per epoch). ``ramp_every="epoch"``
reproduces that step function, with the epoch recovered from ``progress`` as ``floor(progress * epochs)``
(:func:`~mim.masking.hard_patch.epoch_index`; ``epochs`` must be the run's ``trainer.max_epochs``) and the ramp
length ``ema_ramp * epochs`` epochs; ``ramp_every="step"`` moves it linearly with ``progress`` (:func:`mim.ema.
ema_momentum`).
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range, invalid
from mim.ema import EMA, ema_momentum
from mim.masking.hard_patch import epoch_index
from mim.models.base import Encoder
from mim.models.encoder import MaskedEncoder
from mim.targets.loss_prediction import LossPredictor, relative_loss, standardized_mse_loss
from mim.targets.pixels import PixelTarget
from mim.types import Batch, Masks

__all__ = ["HardPatchTarget"]


class HardPatchTarget(PixelTarget):
    """Pixels of the hidden patches (as :class:`PixelTarget`) plus HPM's loss predictor and EMA teacher.

    Args:
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8); the loss predictor has as many.
        decoder_num_heads: decoder heads (MAE: 16).
        decoder_mlp_ratio: MLP expansion in the decoder and the loss predictor.
        norm_pix: normalise target patches by their mean and unbiased variance.
        norm_pix_eps: epsilon added to the variance (``patch``) or to the std (``channel``).
        norm_pix_mode: ``patch`` (MAE) or ``channel`` (VideoMAE), as :class:`PixelTarget`.
        loss_predictor_loss: ``relative`` (HPM's pairwise ranking loss, the paper's choice) or ``mse`` (against
            the per-image standardised loss).
        loss_predictor_weight: factor of the loss-predictor loss (HPM: 1, ``L_rec + L_pred``).
        ema_momentum: (start, end) momentum of the EMA teacher (HPM: 0.999 -> 0.9999).
        ema_ramp: fraction of training over which the momentum moves from start to end (HPM: 100 of 800
            epochs = 0.125), constant afterwards.
        ramp_every: ``step`` (the momentum moves with ``progress``) or ``epoch`` (HPM's official step function:
            ``start + e / (ema_ramp * epochs) * (end - start)`` in epoch ``e`` before the end of the ramp, ``end``
            after; needs ``epochs``).
        epochs: the run's number of epochs (``trainer.max_epochs``); required by ``ramp_every="epoch"``.
        weight: factor of this loss in the total.
    """

    def __init__(
        self,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix: bool = True,
        norm_pix_eps: float = 1e-6,
        norm_pix_mode: Literal["patch", "channel"] = "patch",
        loss_predictor_loss: Literal["relative", "mse"] = "relative",
        loss_predictor_weight: float = 1.0,
        ema_momentum: tuple[float, float] = (0.999, 0.9999),
        ema_ramp: float = 0.125,
        ramp_every: Literal["step", "epoch"] = "step",
        epochs: int | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            decoder_mlp_ratio=decoder_mlp_ratio,
            norm_pix=norm_pix,
            norm_pix_eps=norm_pix_eps,
            norm_pix_mode=norm_pix_mode,
            weight=weight,
        )
        owner = "HardPatchTarget"
        check_choice(owner, "loss_predictor_loss", loss_predictor_loss, ("relative", "mse"))
        check_range(owner, "loss_predictor_weight", loss_predictor_weight, 0, math.inf)
        momentum = tuple(float(m) for m in ema_momentum)
        if len(momentum) != 2 or not all(0.0 <= m <= 1.0 for m in momentum):
            raise invalid(owner, "ema_momentum", "two numbers in [0, 1]", ema_momentum, hint="start, end")
        check_range(owner, "ema_ramp", ema_ramp, 0, 1, hint="a fraction of training")
        check_choice(owner, "ramp_every", ramp_every, ("step", "epoch"))
        if ramp_every == "epoch" and epochs is None:
            raise ValueError(
                "HardPatchTarget.epochs must be set (the run's trainer.max_epochs) with ramp_every='epoch', got None"
            )
        self.ramp_every = ramp_every
        self.epochs = None if epochs is None else check_int(owner, "epochs", epochs, minimum=1)
        self.loss_predictor_loss, self.loss_predictor_weight = loss_predictor_loss, loss_predictor_weight
        self.ema_momentum, self.ema_ramp = momentum, ema_ramp
        self.loss_predictor: LossPredictor | None = None
        self.teacher: EMA | None = None

    def bind(self, encoder: Encoder) -> None:
        super().bind(encoder)
        assert isinstance(encoder, MaskedEncoder)  # checked by PixelTarget.bind
        self.loss_predictor = LossPredictor(
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            mlp_ratio=self.decoder_mlp_ratio,
            out_dim=encoder.patch_dim,
            num_prefix_tokens=encoder.num_prefix_tokens,
        )
        self.teacher = EMA(self._student(encoder))

    def _student(self, encoder: Encoder) -> nn.ModuleDict:
        """The parts of the student the EMA teacher copies (the order fixes the parameter pairing)."""
        predictor = self.loss_predictor
        if predictor is None:
            raise RuntimeError("HardPatchTarget is not bound to an encoder: call target.bind(encoder) first")
        return nn.ModuleDict(
            {"encoder": encoder, "decoder_embed": self._decoder().decoder_embed, "loss_predictor": predictor}
        )

    def _parts(self) -> tuple[LossPredictor, EMA]:
        if self.loss_predictor is None or self.teacher is None:
            raise RuntimeError("HardPatchTarget is not bound to an encoder: call target.bind(encoder) first")
        return self.loss_predictor, self.teacher

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        if masks.decoder is not None:
            raise ValueError(
                "HardPatchTarget needs masks without a decoder mask; "
                "HPM's loss predictor is not defined for dual masking (Masks.decoder)"
            )
        loss_predictor = self._parts()[0]
        x, predict, per_token = self.hidden_token_losses(batch, masks, latent, encoder)  # per_token (B, M*T)
        loss = per_token.mean()
        predicted = loss_predictor(x).float().gather(1, predict)  # (B, M*T) predicted difficulty
        rank = relative_loss if self.loss_predictor_loss == "relative" else standardized_mse_loss
        prediction_loss = rank(predicted, per_token)  # per_token is detached inside
        total = loss + self.loss_predictor_weight * prediction_loss
        return {"loss": total, "reconstruction": loss.detach(), "loss_prediction": prediction_loss.detach()}

    @torch.no_grad()
    def token_scores(self, batch: Batch, encoder: Encoder) -> Tensor:
        """(B, N) difficulty of every token, predicted by the EMA teacher on the full input.

        The teacher encodes all N tokens (no mask tokens), projects them with its decoder embedding, adds the
        decoder's fixed position table and runs its loss predictor (as HPM's official code: the mask is chosen from
        the teacher's predictions on the unmasked image).
        """
        parts = cast(nn.ModuleDict, self._parts()[1].module)
        latent = parts["encoder"](encoder.inputs(batch))  # (B, prefix+N, D)
        x = parts["decoder_embed"](latent) + self._decoder().decoder_pos_embed.to(latent.dtype)  # (B, prefix+N, Dd)
        return parts["loss_predictor"](x).float()  # (B, N)

    def momentum(self, progress: float) -> float:
        """The EMA momentum at ``progress``: per epoch (official HPM) or per step, see ``ramp_every``."""
        start, end = self.ema_momentum
        if self.ramp_every == "step":
            return ema_momentum(progress, start=start, end=end, ramp=self.ema_ramp)
        assert self.epochs is not None  # checked in __init__
        epoch, ramp_epochs = epoch_index(progress, self.epochs), self.ema_ramp * self.epochs
        if epoch >= ramp_epochs:
            return end
        return start + epoch / ramp_epochs * (end - start)  # official: 0.999 + epoch / 100 * (0.9999 - 0.999)

    def after_step(self, encoder: Encoder, progress: float, *, applied: Tensor | None = None) -> None:
        """EMA update of the teacher with :meth:`momentum` at ``progress`` (none where ``applied`` is 0)."""
        self._parts()[1].update(self._student(encoder), self.momentum(progress), applied=applied)
