"""Frozen-teacher feature targets: MaskAlign and MR-MAE's feature mimicking.

A frozen teacher (any timm ViT-family model, weights from a local file: mim/models/teacher.py) sees the **full**
input; the student's features at the **visible** tokens are regressed onto the teacher's features at the same
tokens (gathered with ``Masks.visible``, the order the encoder used).

* MaskAlign (Xue et al., "Stare at What You See: Masked Image Modeling without Reconstruction", CVPR 2023; official
  OpenDriveLab/maskalign models_pretrain.py): ``student_layers="blocks"``. Every student block output goes through
  the dynamic alignment (mim/models/align.py) and regresses the whitened outputs of the last teacher blocks with
  ``2 * SmoothL1``; no decoder, no mask tokens. ``attention_scores=True`` also feeds AttentionMasking. The
  official ``loss_weights`` map to ``layers`` and ``loss_weights`` here: ``top5`` = ``layers=5`` (mean),
  ``mean`` = all blocks (mean), ``out`` = ``layers=[-1]``, ``linear_decay`` = ``loss_weights="linear_decay"``
  (:func:`layer_loss_weights`); the official ``head_type`` is ``head``.
* MR-MAE (Gao et al., "Mimic before Reconstruct: Enhancing Masked Autoencoders with Feature Mimicking", IJCV 2023,
  arXiv 2303.05475; no code released): ``student_layers="output"``. The encoder's final latent, through a linear
  head, regresses the teacher's whitened features with MSE, next to a PixelTarget in the same recipe.

The teacher is frozen, runs once per step under ``torch.no_grad()`` and is **not** a registered submodule (never in
``parameters()`` or ``state_dict()``; the state dict records its file's hash). Details: docs/design.md, "Frozen
teachers are unregistered modules" and "Teacher targets".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mim.checks import check_choice, invalid
from mim.models.align import HEAD_TYPES, DynamicAlignment, HeadType, adapters
from mim.models.encoder import MaskedEncoder, check_timm_name
from mim.models.teacher import FrozenTeacher, TeacherOutput
from mim.targets.base import Target
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = ["PinnedTeacher", "TeacherTarget", "feature_distance", "layer_loss_weights", "normalize_features"]


def normalize_features(y: Tensor, mode: Literal["whiten", "l2", "none"], eps: float = 1e-5) -> Tensor:
    """MaskAlign's target normalisation over the last dim.

    Args:
        y: (..., D_t).
        mode: ``whiten`` (LayerNorm without affine parameters), ``l2`` (unit L2 norm) or ``none``.
        eps: LayerNorm epsilon (MaskAlign: 1e-5).

    Returns:
        (..., D_t).
    """
    if mode == "whiten":
        return F.layer_norm(y, y.shape[-1:], eps=eps)
    if mode == "l2":
        return F.normalize(y, dim=-1)
    return y


def feature_distance(pred: Tensor, target: Tensor, loss: Literal["smooth_l1", "l2", "l1"]) -> Tensor:
    """Mean over all elements: ``2 * SmoothL1(beta=1)`` (MaskAlign's scale), MSE, or L1."""
    if loss == "smooth_l1":
        return 2.0 * F.smooth_l1_loss(pred, target, beta=1.0)
    if loss == "l2":
        return F.mse_loss(pred, target)
    return F.l1_loss(pred, target)


def layer_loss_weights(layers: Sequence[int], mode: Literal["mean", "linear_decay"]) -> list[float]:
    """The weight of each aligned teacher block's distance in the loss.

    ``mean``: ``1 / len(layers)`` each (MaskAlign's ``top5`` with the last 5 blocks, ``mean`` with all).
    ``linear_decay``: ``w_i = i / sum_j j`` over the aligned blocks, ``i`` the **0-based** block index, so the
    deepest block weighs most and block 0 weighs 0. With every block aligned this is MaskAlign's official
    ``weight_list = [i / sum(range(T)) for i in range(T)]`` (OpenDriveLab/maskalign models_pretrain.py
    ``forward_loss``; 12 blocks: 0, 1/66, ..., 11/66).

    Args:
        layers: the aligned 0-based teacher block indices, ascending.
        mode: ``mean`` or ``linear_decay``.

    Returns:
        One Python float per entry of ``layers``, summing to 1.
    """
    if mode == "mean":
        return [1 / len(layers)] * len(layers)
    total = sum(layers)
    if total <= 0:
        raise ValueError(
            f"TeacherTarget.loss_weights='linear_decay' gives block 0 the weight 0; the aligned blocks {list(layers)} "
            "would all weigh 0: align deeper blocks"
        )
    return [i / total for i in layers]


def _channels(name: str, value: Sequence[float] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    out = tuple(float(v) for v in value)
    if not out:
        raise invalid("TeacherTarget", name, "a list of one value per channel", value)
    if name.endswith("std") and not all(v > 0 for v in out):
        raise invalid("TeacherTarget", name, "> 0 per channel", value)
    return out


class PinnedTeacher:
    """What the targets that learn from a frozen teacher file share (:class:`TeacherTarget`,
    :class:`~mim.targets.SelfDistillTarget`): the :class:`~mim.models.teacher.FrozenTeacher` is **not** a registered
    submodule (never in ``parameters()``, ``state_dict()`` or an optimizer group) yet moves with the target
    (``.to(device)``); the state dict records its architecture, file and weights' SHA-256, and loading a state dict
    written with another teacher is refused.

    A subclass (listed before ``Target``) sets ``teacher_arch``, ``teacher_checkpoint``, ``_expected = None`` and
    ``object.__setattr__(self, "_teacher", None)`` in ``__init__``, and calls :meth:`_set_teacher` in ``bind``.
    """

    _teacher: FrozenTeacher | None  # set with object.__setattr__: not a registered submodule
    _expected: dict[str, Any] | None
    teacher_arch: str
    teacher_checkpoint: str

    def _set_teacher(self, teacher: FrozenTeacher) -> None:
        """Keep ``teacher`` unregistered, then check it against a state dict loaded before ``bind``."""
        object.__setattr__(self, "_teacher", teacher)
        if self._expected is not None:
            self._verify(self._expected)

    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher (weights loaded on first use)."""
        teacher = self._teacher
        if teacher is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to an encoder: call target.bind(encoder) first")
        return teacher

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Move / cast the unregistered teacher with the target (``.to(device)``, ``.half()``, ...)."""
        super()._apply(fn, recurse)  # type: ignore[misc]
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """Where the teacher came from and the SHA-256 of its weights (loads the weights if not yet loaded)."""
        sha = self._teacher.load() if self._teacher is not None else None
        return {"teacher_arch": self.teacher_arch, "teacher_checkpoint": self.teacher_checkpoint, "sha256": sha}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Check that this run's teacher is the one the state dict was written with (arch and weights hash)."""
        self._expected = dict(state)
        if self._teacher is not None:
            self._verify(self._expected)

    def _verify(self, state: dict[str, Any]) -> None:
        owner = type(self).__name__
        if state.get("teacher_arch") not in (None, self.teacher_arch):
            raise ValueError(
                f"{owner}: this checkpoint was written with teacher_arch {state['teacher_arch']!r}, "
                f"this run builds {self.teacher_arch!r}"
            )
        recorded = state.get("sha256")
        if recorded is None:
            return
        current = self.teacher.load()
        if current != recorded:
            raise ValueError(
                f"{owner}: the teacher file changed since this checkpoint was written: "
                f"{Path(self.teacher_checkpoint)} has weights sha256 {current[:16]}..., the checkpoint recorded "
                f"{recorded[:16]}... (from {state.get('teacher_checkpoint')}). Restore the original teacher file "
                "or start a new run"
            )


class TeacherTarget(PinnedTeacher, Target):
    """Align the student's visible-token features with a frozen teacher's features (MaskAlign / MR-MAE).

    Args:
        teacher_arch: timm model name of the teacher (e.g. ``vit_base_patch16_clip_224``); built with
            ``pretrained=False, num_classes=0``.
        teacher_checkpoint: path of a local weights file (timm/torch state dict, ``.safetensors``, ``mim export``
            output). Read on first use (the first step), not at construction, so a recipe naming it can be built
            where the file is absent; a missing file then raises ``FileNotFoundError`` naming it.
        teacher_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``,
            ``depth`` ...). The teacher's patch grid must equal the student's (its input is resized bicubically to
            the teacher's ``img_size``, MaskAlign's CLIP-L/14 at 196 px).
        student_layers: ``blocks`` (MaskAlign: all student block outputs through the dynamic alignment) or
            ``output`` (MR-MAE mimicking: the encoder's final latent through one ``head`` adapter per teacher layer).
        layers: aligned teacher blocks: an int n = the last n blocks, or a list of 0-based indices (negative from
            the end). Default: 5 (MaskAlign's ``top5``) for ``blocks`` with ``loss_weights="mean"``, every block
            for ``linear_decay``, 1 (the last block) for ``output``.
        loss_weights: how the aligned blocks' distances are combined: ``mean`` (``1/len(layers)`` each; with the
            default layers MaskAlign's recommended ``top5``) or ``linear_decay`` (``i / sum_j j`` for 0-based
            block ``i`` among the aligned ones; the official ``linear_decay`` with every block aligned). Block 0
            weighs 0 under ``linear_decay`` and is then dropped from the aligned blocks (no adapter; the official
            code builds one that never receives a gradient). See :func:`layer_loss_weights`.
        fusion: ``linear`` (W = I + 0.01; needs equal depths), ``sum`` (W = 1/S) or ``simple`` (no fusion);
            ``blocks`` mode only.
        head: adapter type (official ``head_type``, mim/models/align.py): ``linear`` (``Linear(D -> D_t)``, the
            official default and recommended), ``norm_linear`` (``LayerNorm(D) -> Linear(D -> D_t)``), ``mlp``
            (``Linear(D -> D) -> GELU -> Linear(D -> D_t)``) or ``mlp2`` (``Linear(D -> D) -> LayerNorm(D) ->
            Linear(D -> D_t)``); the LayerNorms use the student's final-norm epsilon. Both modes.
        target_norm: ``whiten`` (LayerNorm without affine, eps 1e-5), ``l2`` or ``none``.
        loss: ``smooth_l1`` (x2, MaskAlign), ``l2`` (MSE) or ``l1``.
        align_cls: include the CLS token in the loss (needs a class token in both models). Default: True for
            ``blocks`` (MaskAlign), False for ``output`` (MR-MAE mimics patch tokens).
        input_mean: per-channel mean the batch was normalised with (the datamodule's); with ``input_std``.
        input_std: per-channel std the batch was normalised with.
        teacher_mean: per-channel mean the teacher expects (e.g. CLIP's); the input is re-normalised
            ``(x * input_std + input_mean - teacher_mean) / teacher_std``. Default (all four None): identity.
        teacher_std: per-channel std the teacher expects.
        attention_scores: provide the teacher's last-block CLS-to-patch attention (B, N), mean over heads, as
            :meth:`token_scores` (for :class:`~mim.masking.attention.AttentionMasking`).
        freeze_final_norm: ``blocks`` mode: set ``requires_grad=False`` on the student's final norm, which the
            MaskAlign loss never reaches (it stays at its init either way, as in the official
            OpenDriveLab/maskalign code; frozen, DDP needs no ``find_unused_parameters``). Set False when another
            target trains on the final latent.
        weight: factor of this loss in the total.
    """

    _cache: tuple[Tensor, int, TeacherOutput] | None
    input_scale: Tensor
    input_shift: Tensor
    alignment: DynamicAlignment | None
    heads: nn.ModuleList | None

    def __init__(
        self,
        *,
        teacher_arch: str,
        teacher_checkpoint: str,
        teacher_kwargs: dict[str, Any] | None = None,
        student_layers: Literal["blocks", "output"] = "blocks",
        layers: int | list[int] | None = None,
        loss_weights: Literal["mean", "linear_decay"] = "mean",
        fusion: Literal["linear", "sum", "simple"] = "linear",
        head: HeadType = "linear",
        target_norm: Literal["whiten", "l2", "none"] = "whiten",
        loss: Literal["smooth_l1", "l2", "l1"] = "smooth_l1",
        align_cls: bool | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        teacher_mean: list[float] | None = None,
        teacher_std: list[float] | None = None,
        attention_scores: bool = False,
        freeze_final_norm: bool = True,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)

        owner = "TeacherTarget"
        check_timm_name(owner, "teacher_arch", teacher_arch)
        if not str(teacher_checkpoint):
            raise invalid(owner, "teacher_checkpoint", "the path of a local weights file", teacher_checkpoint)
        choices = {
            "student_layers": (student_layers, ("blocks", "output")),
            "loss_weights": (loss_weights, ("mean", "linear_decay")),
            "fusion": (fusion, ("linear", "sum", "simple")),
            "head": (head, HEAD_TYPES),
            "target_norm": (target_norm, ("whiten", "l2", "none")),
            "loss": (loss, ("smooth_l1", "l2", "l1")),
        }
        for field, (value, allowed) in choices.items():
            check_choice(owner, field, value, allowed)
        if isinstance(layers, bool) or (isinstance(layers, int) and layers < 1):
            raise invalid(owner, "layers", "a count >= 1 or a list of block indices", layers)
        if isinstance(layers, list) and (not layers or not all(isinstance(i, int) for i in layers)):
            raise invalid(owner, "layers", "a non-empty list of block indices", layers)
        means = {n: _channels(n, v) for n, v in (("input_mean", input_mean), ("input_std", input_std))}
        means |= {n: _channels(n, v) for n, v in (("teacher_mean", teacher_mean), ("teacher_std", teacher_std))}
        given = [n for n, v in means.items() if v is not None]
        if given and len(given) != 4:
            raise ValueError(
                "TeacherTarget.input_mean, input_std, teacher_mean and teacher_std must be set together "
                f"(the input is re-normalised from the data's statistics to the teacher's), got only {given}"
            )
        lengths = {len(v) for v in means.values() if v is not None}
        if given and len(lengths - {1}) > 1:
            raise ValueError(
                f"TeacherTarget: the mean/std lists must have one value per channel (or a single value), got {means}"
            )
        self.teacher_arch, self.teacher_checkpoint = teacher_arch, str(teacher_checkpoint)
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.student_layers, self.layers_spec, self.fusion, self.head = student_layers, layers, fusion, head
        self.loss_weights = loss_weights
        self.target_norm, self.loss, self.align_cls_spec = target_norm, loss, align_cls
        self.attention_scores, self.freeze_final_norm = attention_scores, freeze_final_norm
        if given:
            mi, si = torch.tensor(means["input_mean"]), torch.tensor(means["input_std"])
            mt, st = torch.tensor(means["teacher_mean"]), torch.tensor(means["teacher_std"])
            scale, shift = si / st, (mi - mt) / st  # x_t = x * scale + shift
        else:
            scale, shift = torch.ones(0), torch.zeros(0)
        self.register_buffer("input_scale", scale.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("input_shift", shift.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.layers: list[int] = []
        self.block_weights: list[float] = []
        self.align_cls = False
        self.alignment: DynamicAlignment | None = None
        self.heads: nn.ModuleList | None = None
        self._num_student_prefix = 0
        self._expected: dict[str, Any] | None = None
        object.__setattr__(self, "_teacher", None)  # not a registered submodule: see the module docstring
        object.__setattr__(self, "_cache", None)

    # ------------------------------------------------------------------ construction
    def bind(self, encoder: MaskedEncoder) -> None:  # type: ignore[override]
        if not isinstance(encoder, MaskedEncoder) or encoder.is_video:
            raise ValueError("TeacherTarget needs an image encoder (mim.models.MaskedEncoder with num_frames=1)")
        teacher = FrozenTeacher(
            arch=self.teacher_arch, checkpoint=self.teacher_checkpoint, model_kwargs=self.teacher_kwargs
        )
        grid = (encoder.grid.h, encoder.grid.w)
        if teacher.grid_size != grid:
            raise ValueError(
                f"TeacherTarget: the teacher's patch grid {teacher.grid_size} differs from the student's {grid}; "
                "set teacher_kwargs (img_size / patch_size) so that both have the same tokens"
            )
        depth = teacher.depth
        spec = self.layers_spec
        if spec is None:  # top5 / all blocks for linear_decay (MaskAlign), the last block (MR-MAE)
            spec = 1 if self.student_layers == "output" else (depth if self.loss_weights == "linear_decay" else 5)
        if isinstance(spec, int):
            layers = list(range(depth - min(spec, depth), depth))
        else:
            if not all(-depth <= i < depth for i in spec):
                raise ValueError(f"TeacherTarget.layers: indices {spec} out of range for a {depth}-block teacher")
            layers = sorted({i % depth for i in spec})
        weights = layer_loss_weights(layers, self.loss_weights)
        layers = [i for i, w in zip(layers, weights) if w > 0]  # linear_decay's block 0 weighs 0: not aligned
        weights = [w for w in weights if w > 0]
        align_cls = self.align_cls_spec if self.align_cls_spec is not None else self.student_layers == "blocks"
        if align_cls and (encoder.vit.cls_token is None or not teacher.has_class_token):
            raise ValueError("TeacherTarget.align_cls needs a class token in both the student and the teacher")
        if self.attention_scores:
            teacher.check_attention()
        if self.input_scale.numel() not in (0, 1, encoder.in_chans, teacher.in_chans):
            raise ValueError(
                f"TeacherTarget: the mean/std lists have {self.input_scale.numel()} channels; the student reads "
                f"{encoder.in_chans}, the teacher {teacher.in_chans}"
            )
        self.layers, self.block_weights, self.align_cls = layers, weights, bool(align_cls)
        norm_eps = float(getattr(encoder.vit.norm, "eps", 1e-6))  # the adapters' LayerNorms (norm_linear, mlp2)
        self._num_student_prefix = encoder.num_prefix_tokens
        if self.student_layers == "blocks":
            self.alignment = DynamicAlignment(
                student_depth=len(encoder.vit.blocks),
                teacher_depth=depth,
                layers=layers,
                in_dim=encoder.embed_dim,
                out_dim=teacher.embed_dim,
                fusion=self.fusion,
                head=self.head,
                norm_eps=norm_eps,
            )
            encoder.capture_blocks(self.alignment.student_blocks)
            if self.freeze_final_norm:
                encoder.vit.norm.requires_grad_(False)
        else:
            self.heads = adapters(self.head, len(layers), encoder.embed_dim, teacher.embed_dim, norm_eps=norm_eps)
        self._set_teacher(teacher)

    # ------------------------------------------------------------------ teacher pass
    def teacher_output(self, batch: Batch, encoder: MaskedEncoder) -> TeacherOutput:
        """The teacher's features (and CLS attention) of the full input, computed once per batch.

        A result is reused while the batch's input is the same tensor object, unmodified (``_version``): the
        module calls :meth:`token_scores` before drawing masks and :meth:`forward` after the encoder pass.
        """
        images = encoder.inputs(batch)
        cache = self._cache
        if cache is not None and cache[0] is images and cache[1] == images._version:
            return cache[2]
        x = images
        if self.input_scale.numel():
            x = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)  # (B, C, H, W)
        out = self.teacher(x, self.layers, attention=self.attention_scores)
        object.__setattr__(self, "_cache", (images, images._version, out))
        return out

    @torch.no_grad()
    def token_scores(self, batch: Batch, encoder: MaskedEncoder) -> Tensor | None:  # type: ignore[override]
        """(B, N) the teacher's last-block CLS-to-patch attention, mean over heads; None unless ``attention_scores``.

        The same teacher pass then serves :meth:`forward` (one teacher forward per step).
        """
        if not self.attention_scores:
            return None
        scores = self.teacher_output(batch, encoder).cls_attention
        assert scores is not None
        return scores.float()  # (B, N)

    # ------------------------------------------------------------------ loss
    def _tokens(self, x: Tensor, num_prefix: int) -> Tensor:
        """(B, prefix + K, D) -> (B, [1 +] K, D): the CLS token (when aligned) and the patch tokens."""
        patches = x[:, num_prefix:]
        return torch.cat([x[:, :1], patches], dim=1) if self.align_cls else patches

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        out = self.teacher_output(batch, encoder)
        object.__setattr__(self, "_cache", None)  # consumed: the next batch computes its own
        teacher = self.teacher
        targets = []
        for i in self.layers:
            y = normalize_features(out.features[i].float(), self.target_norm)  # (B, prefix_t+N, D_t)
            patches = gather_tokens(y[:, teacher.num_prefix_tokens :], masks.visible)  # (B, K, D_t)
            targets.append(torch.cat([y[:, :1], patches], dim=1) if self.align_cls else patches)  # (B, [1+]K, D_t)
        if self.alignment is not None:
            captured = encoder.captured_blocks(latent)
            blocks = [self._tokens(captured[j], self._num_student_prefix) for j in self.alignment.student_blocks]
            preds = self.alignment(blocks)  # A x (B, [1+]K, D_t)
        else:
            assert self.heads is not None
            z = self._tokens(latent, self._num_student_prefix)  # (B, [1+]K, D)
            preds = [head(z) for head in self.heads]  # A x (B, [1+]K, D_t)
        per_layer = [feature_distance(p.float(), t, self.loss) for p, t in zip(preds, targets)]
        if self.loss_weights == "mean":
            loss = torch.stack(per_layer).mean()
        else:  # linear_decay: sum_i w_i * l_i, in the official order, with host-side weights (no sync)
            loss = self.block_weights[0] * per_layer[0]
            for w, v in zip(self.block_weights[1:], per_layer[1:]):
                loss = loss + w * v
        result = {"loss": loss}
        if len(per_layer) > 1:
            result |= {f"block{i}": v.detach() for i, v in zip(self.layers, per_layer)}
        return result

    def never_decay(self) -> set[str]:
        """MaskAlign excludes the layer-mixing matrix from weight decay (``distill_weights``, main_pretrain.py)."""
        if self.alignment is not None and self.alignment.layer_weights is not None:
            return {"alignment.layer_weights"}
        return set()
