"""Latent-prediction target (JEPA): predict an EMA target encoder's features of the hidden tokens.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture" (I-JEPA),
CVPR 2023, official facebookresearch/ijepa src/train.py; Bardes et al., "Revisiting Feature Prediction for
Learning Visual Representations from Video" (V-JEPA), arXiv 2404.08471, 2024, facebookresearch/jepa
app/vjepa/train.py; Thimonier et al., "T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data",
ICLR 2025, jose-melo/t-jepa src/train.py.

One step: the target encoder (an :class:`~mim.ema.EMA` copy of the encoder, eval mode, no gradient) encodes the
**full** input, optionally layer-normed without parameters (``target_norm``), and its features are gathered at
every target group, (B, M, T, D); the :class:`~mim.models.predictor.JEPAPredictor` predicts them from the context
latents (the module's shared encoder pass on ``Masks.visible``); the loss is ``smooth_l1`` (I-JEPA), ``l1``
(V-JEPA) or ``mse`` (T-JEPA); after each optimizer step the target encoder moves towards the encoder by EMA.
Every ``monitor_every``-th call also returns collapse statistics (:mod:`mim.metrics`). The paper evaluates the
**target encoder** (``targets.<i>.target_encoder.module.`` in checkpoints). Details: docs/design.md, "JEPA target".
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from mim.checks import check_choice, check_int, check_range, invalid
from mim.ema import EMA, ema_momentum
from mim.metrics import per_dimension_std, rankme
from mim.models.base import Encoder
from mim.models.predictor import JEPAPredictor
from mim.targets.base import Target
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = ["LatentTarget", "latent_loss"]

LossKind = Literal["smooth_l1", "l1", "mse"]


def latent_loss(pred: Tensor, target: Tensor, kind: LossKind) -> Tensor:
    """Mean elementwise loss between predicted and target features.

    Args:
        pred: (..., D) predictions.
        target: (..., D) targets (no gradient).
        kind: ``smooth_l1`` (Huber with beta 1: ``0.5 x^2`` for ``|x| < 1``, else ``|x| - 0.5``), ``l1`` (``|x|``)
            or ``mse`` (``x^2``), x = pred - target, averaged over every element.

    Returns:
        Scalar float32.
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "mse":
        return F.mse_loss(pred, target)
    raise ValueError(f"LatentTarget.loss must be 'smooth_l1', 'l1' or 'mse', got {kind!r}")


class LatentTarget(Target):
    """JEPA: an EMA target encoder on the full input, a narrow predictor from the context to the target tokens.

    Args:
        predictor_dim: P, predictor width (I-JEPA / V-JEPA: 384; T-JEPA: 16).
        predictor_depth: predictor blocks (I-JEPA ViT-H: 12; T-JEPA: 16).
        predictor_num_heads: predictor heads; None = the encoder's (I-JEPA / V-JEPA: ``num_heads=encoder.num_heads``).
        predictor_mlp_ratio: MLP expansion in the predictor (4).
        predictor_groups: ``separate`` (each target group in its own predictor sequence; I-JEPA, T-JEPA) or
            ``joint`` (all groups of a sample in one sequence; V-JEPA's union-of-blocks target).
        loss: ``smooth_l1`` (I-JEPA), ``l1`` (V-JEPA) or ``mse`` (T-JEPA).
        momentum: (start, end) EMA momentum of the target encoder (I-JEPA: 0.996 -> 1.0; V-JEPA: 0.998 -> 1.0).
        momentum_ramp: fraction of training over which the momentum moves from start to end (1.0: all of it).
        target_norm: parameter-free layer norm of the target features (I-JEPA, V-JEPA: True; T-JEPA: False).
        monitor_every: return the collapse statistics every this many training steps' forward calls (micro-batches
            under gradient accumulation), the first call included; 0 never. With several mask sets per step, from
            the first set.
        num_mask_tokens: the predictor's mask tokens, one per mask set of the step (V-JEPA: 2, with
            :class:`~mim.masking.MultiMasking`); 1: every set shares one.
        mask_token_init: ``trunc_normal`` (std 0.02: I-JEPA, T-JEPA) or ``zeros`` (V-JEPA).
        weight: factor of this loss in the total.

    With several mask sets per step (``Masks.sets``) the target encoder runs once, on the first set's call, and its
    features are reused by the others (V-JEPA's one target pass per clip).
    """

    def __init__(
        self,
        *,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_num_heads: int | None = None,
        predictor_mlp_ratio: float = 4.0,
        predictor_groups: Literal["separate", "joint"] = "separate",
        loss: LossKind = "smooth_l1",
        momentum: tuple[float, float] = (0.996, 1.0),
        momentum_ramp: float = 1.0,
        target_norm: bool = True,
        monitor_every: int = 100,
        num_mask_tokens: int = 1,
        mask_token_init: Literal["trunc_normal", "zeros"] = "trunc_normal",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        owner = "LatentTarget"
        if check_int(owner, "predictor_dim", predictor_dim) % 4:
            raise invalid(owner, "predictor_dim", "a multiple of 4", predictor_dim)
        check_int(owner, "predictor_depth", predictor_depth)
        heads = predictor_num_heads
        if heads is not None and predictor_dim % check_int(owner, "predictor_num_heads", heads):
            raise invalid(owner, "predictor_num_heads", f"a divisor of predictor_dim={predictor_dim}", heads)
        check_range(owner, "predictor_mlp_ratio", predictor_mlp_ratio, 0, math.inf, low_open=True, high_open=True)
        check_choice(owner, "predictor_groups", predictor_groups, ("separate", "joint"))
        check_choice(owner, "loss", loss, ("smooth_l1", "l1", "mse"))
        start_end = tuple(float(m) for m in momentum)
        if len(start_end) != 2 or not all(0.0 <= m <= 1.0 for m in start_end):
            raise invalid(owner, "momentum", "two numbers in [0, 1]", momentum, hint="start, end")
        check_range(owner, "momentum_ramp", momentum_ramp, 0, 1, hint="a fraction of training")
        check_int(owner, "monitor_every", monitor_every, minimum=0, hint="0: never")
        self.num_mask_tokens = check_int(owner, "num_mask_tokens", num_mask_tokens)
        self.mask_token_init = check_choice(owner, "mask_token_init", mask_token_init, ("trunc_normal", "zeros"))
        self.predictor_dim, self.predictor_depth = predictor_dim, predictor_depth
        self.predictor_num_heads, self.predictor_mlp_ratio = predictor_num_heads, predictor_mlp_ratio
        self.predictor_groups: Literal["separate", "joint"] = predictor_groups
        self.loss: LossKind = loss
        self.momentum: tuple[float, float] = (start_end[0], start_end[1])
        self.momentum_ramp, self.target_norm, self.monitor_every = momentum_ramp, target_norm, monitor_every
        self.predictor: JEPAPredictor | None = None
        self.target_encoder: EMA | None = None
        self._calls = 0  # training forward calls, for the collapse monitor (host side)
        self._teacher: Tensor | None = None  # the target encoder's tokens, kept for the step's further mask sets

    def bind(self, encoder: Encoder) -> None:
        heads = self.predictor_num_heads or encoder.num_heads
        if self.predictor_dim % heads:
            raise ValueError(
                f"LatentTarget.predictor_dim ({self.predictor_dim}) must be divisible by the predictor heads ({heads}, "
                "the encoder's unless predictor_num_heads is set)"
            )
        self.predictor = JEPAPredictor(
            grid=encoder.grid,
            in_dim=encoder.embed_dim,
            num_prefix_tokens=encoder.num_prefix_tokens,
            dim=self.predictor_dim,
            depth=self.predictor_depth,
            num_heads=heads,
            mlp_ratio=self.predictor_mlp_ratio,
            groups=self.predictor_groups,
            num_mask_tokens=self.num_mask_tokens,
            mask_token_init=self.mask_token_init,
        )
        self.target_encoder = EMA(encoder)

    def _parts(self) -> tuple[JEPAPredictor, EMA]:
        if self.predictor is None or self.target_encoder is None:
            raise RuntimeError("LatentTarget is not bound to an encoder: call target.bind(encoder) first")
        return self.predictor, self.target_encoder

    @torch.no_grad()
    def teacher_tokens(self, batch: Batch) -> Tensor:
        """The target encoder's (layer-normed) features of every token: (B, N, D), without gradient."""
        teacher = cast(Encoder, self._parts()[1].module)  # the EMA copy of the encoder
        h = teacher(teacher.inputs(batch))[:, teacher.num_prefix_tokens :]  # (B, N, D) all tokens, prefix dropped
        if self.target_norm:
            h = F.layer_norm(h, h.shape[-1:])  # (B, N, D), parameter-free
        return h

    @torch.no_grad()
    def target_features(self, batch: Batch, targets: Tensor, tokens: Tensor | None = None) -> Tensor:
        """The target encoder's (layer-normed) features at the target tokens.

        Args:
            batch: the normalised batch (the target encoder reads it with its own ``inputs``).
            targets: (B, M, T) int64 token indices.
            tokens: (B, N, D) :meth:`teacher_tokens` of this batch, when already computed.

        Returns:
            (B, M, T, D), without gradient.
        """
        h = self.teacher_tokens(batch) if tokens is None else tokens  # (B, N, D)
        b, m, t = targets.shape
        return gather_tokens(h, targets.reshape(b, m * t)).reshape(b, m, t, -1)  # (B, M, T, D)

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: Encoder) -> dict[str, Tensor]:
        predictor = self._parts()[0]
        if self.num_mask_tokens > 1 and masks.set_index >= self.num_mask_tokens:
            raise ValueError(
                f"LatentTarget has num_mask_tokens={self.num_mask_tokens} but the step has {masks.num_sets} mask sets; "
                f"set num_mask_tokens to {masks.num_sets} (one per set) or 1 (shared)"
            )
        if masks.set_index == 0:  # the target encoder runs once per step, on the first set's call
            tokens = self.teacher_tokens(batch)  # (B, N, D)
            self._teacher = tokens if masks.num_sets > 1 else None
        elif self._teacher is None:
            raise RuntimeError(f"LatentTarget: mask set {masks.set_index} came before set 0 of its step")
        else:
            tokens = self._teacher
            if masks.set_index == masks.num_sets - 1:
                self._teacher = None  # released after the step's last set
        target = self.target_features(batch, masks.targets, tokens)  # (B, M, T, D)
        pred = predictor(latent, masks.visible, masks.targets, mask_index=masks.set_index)  # (B, M, T, D)
        out = {"loss": latent_loss(pred, target, self.loss)}
        if self.training and masks.set_index == 0:
            if self.monitor_every and self._calls % self.monitor_every == 0:
                out.update(self.collapse_stats(pred, target))
            self._calls += 1
        return out

    @staticmethod
    @torch.no_grad()
    def collapse_stats(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-dimension std (mean over D) and RankMe of target and predicted token features.

        Args:
            pred: (B, M, T, D).
            target: (B, M, T, D).

        Returns:
            ``std_target``, ``std_pred``, ``rankme_target``, ``rankme_pred``: scalar float32 tensors.
        """
        return {
            "std_target": per_dimension_std(target).mean(),
            "std_pred": per_dimension_std(pred).mean(),
            "rankme_target": rankme(target),
            "rankme_pred": rankme(pred),
        }

    def after_step(self, encoder: Encoder, progress: float, *, applied: Tensor | None = None) -> None:
        """EMA update of the target encoder with the scheduled momentum (none where ``applied`` is 0)."""
        self._parts()[1].update(encoder, self.momentum_at(progress), applied=applied)

    def momentum_at(self, progress: float) -> float:
        """The EMA momentum at ``progress`` (fraction of training done)."""
        start, end = self.momentum
        return ema_momentum(progress, start=start, end=end, ramp=self.momentum_ramp)

    def no_weight_decay(self) -> set[str]:
        return {"predictor.mask_token", "predictor.predictor_pos_embed"}
