"""Self-distillation for further pretraining (SD): pull the student's full-image representation towards a frozen
further-pretrained copy of itself.

Lee et al., "Self-Distillation for Further Pre-training of Transformers", ICLR 2023 (arXiv 2210.02871); official code
seanie12/self-distillation (``trainer.py``, ``SelfPreTrainer``). Spec: methods/MORE.md §4.

The method has three pretraining stages; this target is stage 2's extra loss:

* stage 0: an MAE encoder + decoder theta_0 (the paper: ImageNet MAE ViT-B/16);
* stage 1: further MAE pretraining of theta_0 on the (small) target data: theta_1 (``PretrainModule(init_checkpoint=)``,
  recipes/sd/stage1_*.yaml), then ``mim export`` of its encoder;
* stage 2: the student starts from **theta_0 again** (encoder and decoder) and trains the MAE loss plus this target:
  the teacher is theta_1's encoder, frozen. Per step, besides the module's masked pass (the MAE loss), the student
  encoder runs a **second, unmasked** forward **with gradient** over the full images, and the loss is

      L_SD = (1/B) * sum_b ||s_b - t_b||^2     (summed over D, mean over the batch)

  where ``s`` and ``t`` are the student's and the teacher's CLS token after the final norm (HF ViTMAE's
  ``last_hidden_state[:, 0]`` without masking; ``feature="cls"``), or the mean of the final-normed patch tokens
  (``feature="avg"``, for encoders without a class token; not in the paper). The official code calls ``backward()``
  on the MAE loss and on this term separately (implicit weight 1), which sums the gradients as one total loss does.

The sum over D makes the term about D times a per-element MSE (D = 768 for ViT-B): weight 1 is relative to that
scale. The teacher is a :class:`~mim.models.teacher.FrozenTeacher`: eval mode, no gradient, **not** a registered
submodule (never in ``parameters()``, ``state_dict()`` or an optimizer group); the state dict records its file's
SHA-256, and a resumed run with another teacher file is refused (as :class:`~mim.targets.teacher.TeacherTarget`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from mim.checks import check_choice, invalid
from mim.models.encoder import MaskedEncoder, check_timm_name
from mim.models.teacher import FrozenTeacher, encoder_timm_kwargs
from mim.targets.base import Target
from mim.targets.teacher import PinnedTeacher
from mim.types import Batch, Masks

__all__ = ["SelfDistillTarget", "distill_feature", "self_distill_loss"]

FEATURES = ("cls", "avg")

# Bookkeeping of MaskedEncoder.capture_blocks that the second (unmasked) forward pass would overwrite.
_CAPTURE_STATE = ("block_outputs", "_captured_for")


def distill_feature(tokens: Tensor, num_prefix: int, feature: Literal["cls", "avg"]) -> Tensor:
    """The distilled vector of a final-normed token sequence.

    Args:
        tokens: (B, prefix + N, D) final-normed output over the full input, prefix tokens (cls, registers) first.
        num_prefix: the number of prefix tokens.
        feature: ``cls`` (row 0: the class token) or ``avg`` (the mean of the N patch tokens).

    Returns:
        (B, D).
    """
    if feature == "cls":
        return tokens[:, 0]  # (B, D)
    return tokens[:, num_prefix:].mean(dim=1)  # (B, D)


def self_distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``(1/B) * sum_b ||s_b - t_b||^2``: the squared L2 distance summed over D, averaged over the batch (fp32).

    Args:
        student: (B, D).
        teacher: (B, D).

    Returns:
        () the loss.
    """
    diff = student.float() - teacher.float()  # (B, D)
    return diff.pow(2).sum(dim=-1).mean()


class SelfDistillTarget(PinnedTeacher, Target):
    """SD's distillation term: the student's unmasked full-image feature regresses a frozen teacher's.

    Args:
        teacher_arch: timm model name of the teacher (e.g. ``vit_base_patch16_224``: stage 1's encoder); built with
            ``pretrained=False, num_classes=0``.
        teacher_checkpoint: path of the teacher's local weights file: a ``mim export`` of stage 1 (or its mim
            checkpoint; any file :class:`~mim.models.teacher.FrozenTeacher` reads). Read on first use, so a recipe
            naming it can be built where the file is absent; a missing file then raises ``FileNotFoundError``.
        teacher_kwargs: ``timm.create_model`` arguments of the teacher; None: the student's own (its ``img_size``,
            ``patch_size``, ``in_chans`` and ``model_kwargs``: SD's teacher is a further-pretrained copy of the
            student's architecture). The teacher's width must equal the student's.
        feature: what is distilled: ``cls`` (the class token after the final norm, the paper's; both models need a
            class token) or ``avg`` (the mean of the final-normed patch tokens).
        weight: factor of this loss in the total (the paper: 1, the MAE loss weighing 1 too).
    """

    def __init__(
        self,
        *,
        teacher_arch: str,
        teacher_checkpoint: str,
        teacher_kwargs: dict[str, Any] | None = None,
        feature: Literal["cls", "avg"] = "cls",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        owner = "SelfDistillTarget"
        check_timm_name(owner, "teacher_arch", teacher_arch)
        if not isinstance(teacher_checkpoint, str | Path) or not str(teacher_checkpoint):
            raise invalid(owner, "teacher_checkpoint", "the path of a local weights file", teacher_checkpoint)
        if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
            raise invalid(owner, "teacher_kwargs", "a dict of timm.create_model arguments or None", teacher_kwargs)
        check_choice(owner, "feature", feature, FEATURES)
        self.teacher_arch, self.teacher_checkpoint = teacher_arch, str(teacher_checkpoint)
        self.teacher_kwargs = None if teacher_kwargs is None else dict(teacher_kwargs)
        self.feature = feature
        self._num_student_prefix = 0
        self._expected: dict[str, Any] | None = None
        object.__setattr__(self, "_teacher", None)  # not a registered submodule: see the module docstring

    # ------------------------------------------------------------------ construction
    def bind(self, encoder: MaskedEncoder) -> None:  # type: ignore[override]
        owner = "SelfDistillTarget"
        if not isinstance(encoder, MaskedEncoder) or encoder.is_video:
            raise ValueError(f"{owner} needs an image encoder (mim.models.MaskedEncoder with num_frames=1)")
        kwargs = self.teacher_kwargs if self.teacher_kwargs is not None else encoder_timm_kwargs(encoder.config)
        teacher = FrozenTeacher(arch=self.teacher_arch, checkpoint=self.teacher_checkpoint, model_kwargs=kwargs)
        if teacher.embed_dim != encoder.embed_dim:
            raise ValueError(
                f"{owner}: the teacher's width {teacher.embed_dim} differs from the student's {encoder.embed_dim}; "
                "SD regresses the student's feature onto the teacher's directly (no adapter)"
            )
        if self.feature == "cls" and (encoder.vit.cls_token is None or not teacher.has_class_token):
            raise ValueError(
                f"{owner}.feature='cls' needs a class token in both the student and the teacher "
                f"(student: {encoder.vit.cls_token is not None}, teacher: {teacher.has_class_token}); use 'avg'"
            )
        self._num_student_prefix = encoder.num_prefix_tokens
        self._set_teacher(teacher)

    # ------------------------------------------------------------------ loss
    def student_feature(self, images: Tensor, encoder: MaskedEncoder) -> Tensor:
        """The student's feature from an unmasked forward pass with gradient.

        The pass leaves the encoder's captured block outputs (:meth:`~mim.models.encoder.MaskedEncoder.capture_blocks`)
        as the module's masked pass left them, so another target of the same step can still read them.

        Args:
            images: (B, C, H, W) normalised.
            encoder: the student encoder.

        Returns:
            (B, D).
        """
        saved: dict[str, Any] = {k: encoder.__dict__[k] for k in _CAPTURE_STATE if k in encoder.__dict__}
        try:
            z = encoder(images)  # (B, prefix + N, D) final-normed, every token visible
        finally:
            encoder.__dict__.update(saved)
        return distill_feature(z, self._num_student_prefix, self.feature)  # (B, D)

    def teacher_feature(self, images: Tensor) -> Tensor:
        """The teacher's feature of the full images, under ``no_grad``: (B, C, H, W) -> (B, D)."""
        teacher = self.teacher
        z = teacher.final_features(images)  # (B, prefix_t + N, D)
        return distill_feature(z, teacher.num_prefix_tokens, self.feature)  # (B, D)

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        images = encoder.inputs(batch)  # (B, C, H, W)
        t = self.teacher_feature(images)  # (B, D)
        s = self.student_feature(images, encoder)  # (B, D)
        return {"loss": self_distill_loss(s, t)}
