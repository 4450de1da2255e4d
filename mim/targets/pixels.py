"""Pixel reconstruction target with MAE's decoder and norm-pix loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (methods/IMAGE.md §1.1,
steps 12-14): the target of each hidden patch is its pixels, optionally normalised per patch by the
patch's mean and **unbiased** variance (``(x - mu) / sqrt(var + eps)``); the loss is the mean squared
error over hidden patches only.

Video options (methods/JEPA_VIDEO.md §3): ``norm_pix_mode="channel"`` is VideoMAE's target (Tong et al.,
NeurIPS 2022), each tubelet normalised **per channel** over its pixels with the unbiased std and eps added
*after* the square root (3(d) pitfall 1). With a decoder mask (``Masks.decoder``, VideoMAE V2 dual masking,
Wang et al., CVPR 2023) the decoder reconstructs only the decoder-kept tokens and the loss averages over
the tokens hidden from the encoder *and* kept by the decoder (3(a) V2 steps 3-5).

Hard-patch mining option (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023;
methods/IMAGE.md §3): ``loss_predictor=True`` adds HPM's loss predictor, a second decoder stack on the same
decoder input, trained to rank the hidden tokens by their (detached) reconstruction loss, and an EMA copy of
the student (encoder, decoder embedding, loss predictor) that scores every token of the full input for
:class:`~mim.masking.hard_patch.HardPatchMasking` through :meth:`PixelTarget.token_scores`. The EMA pass runs
the encoder on all N tokens and only the loss-predictor stack (HPM's official code also runs the
reconstructor there and discards its output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from mim.ema import EMA, ema_momentum
from mim.masking.functional import gather_tokens
from mim.models.decoder import MAEDecoder
from mim.targets.base import Target
from mim.targets.loss_prediction import LossPredictor, relative_loss, standardized_mse_loss
from mim.types import Batch, Masks

if TYPE_CHECKING:
    from mim.models.encoder import MaskedEncoder

__all__ = ["PixelTarget", "norm_pix", "norm_pix_channel"]


def norm_pix(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalise each patch by its own mean and unbiased variance.

    Args:
        patches: (..., P).
        eps: added to the variance before the square root.

    Returns:
        (..., P).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def norm_pix_channel(patches: Tensor, channels: int, eps: float = 1e-6) -> Tensor:
    """VideoMAE's norm-pix: normalise each channel of each patch over its pixels, ``(x - mu) / (std + eps)``.

    The std is unbiased (divisor P/C - 1) and eps is added after the square root (JEPA_VIDEO.md 3(d).1).

    Args:
        patches: (..., P) in mim's layout, channel fastest (P = pixels * C, see mim/models/embed.py).
        channels: C.
        eps: added to the std.

    Returns:
        (..., P), same layout.
    """
    x = patches.unflatten(-1, (-1, channels))  # (..., P/C, C)
    mean = x.mean(dim=-2, keepdim=True)  # (..., 1, C)
    std = x.std(dim=-2, keepdim=True, unbiased=True)  # (..., 1, C)
    return ((x - mean) / (std + eps)).flatten(-2)  # (..., P)


class PixelTarget(Target):
    """Predict the pixels of hidden patches with an MAE decoder.

    Args:
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_num_heads: decoder heads (MAE: 16).
        decoder_mlp_ratio: MLP expansion in the decoder.
        norm_pix: normalise target patches by their mean and unbiased variance (MAE's recommended recipe).
        norm_pix_eps: epsilon added to the variance (``patch``) or to the std (``channel``).
        norm_pix_mode: ``patch`` (MAE: one mean / variance over all P values of a patch, eps inside the square
            root) or ``channel`` (VideoMAE: per channel over the patch's or tubelet's pixels, eps after it).
        loss_predictor: add HPM's loss predictor and its EMA teacher (for ``HardPatchMasking``).
        loss_predictor_loss: ``relative`` (HPM's pairwise ranking loss, the paper's choice) or ``mse`` (against
            the per-image standardised loss).
        loss_predictor_weight: factor of the loss-predictor loss (HPM: 1, ``L_rec + L_pred``).
        ema_momentum: (start, end) momentum of the EMA teacher (HPM: 0.999 -> 0.9999).
        ema_ramp: fraction of training over which the momentum moves from start to end (HPM: 100 of 800
            epochs = 0.125), constant afterwards.
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
        loss_predictor: bool = False,
        loss_predictor_loss: Literal["relative", "mse"] = "relative",
        loss_predictor_weight: float = 1.0,
        ema_momentum: tuple[float, float] = (0.999, 0.9999),
        ema_ramp: float = 0.125,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        if decoder_depth < 1:
            raise ValueError(f"PixelTarget.decoder_depth must be >= 1, got {decoder_depth}")
        if decoder_num_heads < 1 or decoder_dim % decoder_num_heads:
            raise ValueError(
                f"PixelTarget.decoder_dim ({decoder_dim}) must be divisible by decoder_num_heads ({decoder_num_heads})"
            )
        if decoder_dim % 4:
            raise ValueError(f"PixelTarget.decoder_dim must be divisible by 4 (sin-cos table), got {decoder_dim}")
        if not norm_pix_eps > 0:
            raise ValueError(f"PixelTarget.norm_pix_eps must be > 0, got {norm_pix_eps}")
        if norm_pix_mode not in ("patch", "channel"):
            raise ValueError(f"PixelTarget.norm_pix_mode must be 'patch' or 'channel', got {norm_pix_mode!r}")
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.decoder_num_heads, self.decoder_mlp_ratio = decoder_num_heads, decoder_mlp_ratio
        self.norm_pix, self.norm_pix_eps, self.norm_pix_mode = norm_pix, norm_pix_eps, norm_pix_mode
        if loss_predictor_loss not in ("relative", "mse"):
            raise ValueError(
                f"PixelTarget.loss_predictor_loss must be 'relative' or 'mse', got {loss_predictor_loss!r}"
            )
        if not loss_predictor_weight >= 0:
            raise ValueError(f"PixelTarget.loss_predictor_weight must be >= 0, got {loss_predictor_weight}")
        momentum = tuple(float(m) for m in ema_momentum)
        if len(momentum) != 2 or not all(0.0 <= m <= 1.0 for m in momentum):
            raise ValueError(f"PixelTarget.ema_momentum must be two numbers in [0, 1] (start, end), got {ema_momentum}")
        if not 0.0 <= ema_ramp <= 1.0:
            raise ValueError(f"PixelTarget.ema_ramp must be in [0, 1] (a fraction of training), got {ema_ramp}")
        self.use_loss_predictor, self.loss_predictor_loss = loss_predictor, loss_predictor_loss
        self.loss_predictor_weight, self.ema_momentum, self.ema_ramp = loss_predictor_weight, momentum, ema_ramp
        self.decoder: MAEDecoder | None = None
        self.loss_predictor: LossPredictor | None = None
        self.teacher: EMA | None = None

    def bind(self, encoder: MaskedEncoder) -> None:
        self.decoder = MAEDecoder(
            grid=encoder.grid,
            in_dim=encoder.embed_dim,
            out_dim=encoder.patch_dim,
            num_prefix_tokens=encoder.num_prefix_tokens,
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_num_heads,
            mlp_ratio=self.decoder_mlp_ratio,
        )
        if self.use_loss_predictor:
            self.loss_predictor = LossPredictor(
                dim=self.decoder_dim,
                depth=self.decoder_depth,
                num_heads=self.decoder_num_heads,
                mlp_ratio=self.decoder_mlp_ratio,
                out_dim=encoder.patch_dim,
                num_prefix_tokens=encoder.num_prefix_tokens,
            )
            self.teacher = EMA(self._student(encoder))

    def _student(self, encoder: MaskedEncoder) -> nn.ModuleDict:
        """The parts of the student the EMA teacher copies (the order fixes the parameter pairing)."""
        return nn.ModuleDict(
            {"encoder": encoder, "decoder_embed": self._decoder().decoder_embed, "loss_predictor": self.loss_predictor}
        )

    def _decoder(self) -> MAEDecoder:
        if self.decoder is None:
            raise RuntimeError("PixelTarget is not bound to an encoder: call target.bind(encoder) first")
        return self.decoder

    def target_patches(self, images: Tensor, encoder: MaskedEncoder) -> Tensor:
        """(B, C, H, W) -> (B, N, P) regression targets (norm-pix applied when configured)."""
        return self._normalise(encoder.patchify(images).float(), encoder)  # (B, N, P)

    def _normalise(self, patches: Tensor, encoder: MaskedEncoder) -> Tensor:
        """(..., P) -> (..., P) norm-pix per ``norm_pix_mode``, or unchanged without norm-pix."""
        if not self.norm_pix:
            return patches
        if self.norm_pix_mode == "channel":
            return norm_pix_channel(patches, encoder.in_chans, self.norm_pix_eps)
        return norm_pix(patches, self.norm_pix_eps)

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:
        if masks.decoder is not None:
            if self.loss_predictor is not None:
                raise ValueError(
                    "PixelTarget(loss_predictor=True) needs masks without a decoder mask; "
                    "HPM's loss predictor is not defined for dual masking (Masks.decoder)"
                )
            return {"loss": self.dual_loss(batch, masks, latent, encoder)}
        decoder = self._decoder()
        predict = masks.targets.flatten(1)  # (B, M*T) hidden tokens
        x = decoder.embed(latent, masks.visible)  # (B, prefix+N, Dd)
        pred = decoder.decode(x, predict).float()  # (B, M*T, P)
        target = gather_tokens(self.target_patches(encoder.inputs(batch), encoder), predict)  # (B, M*T, P)
        per_token = (pred - target).pow(2).mean(dim=-1)  # (B, M*T): mean over P
        loss = per_token.mean()  # then over hidden tokens
        if self.loss_predictor is None:
            return {"loss": loss}
        predicted = self.loss_predictor(x).float().gather(1, predict)  # (B, M*T) predicted difficulty
        rank = relative_loss if self.loss_predictor_loss == "relative" else standardized_mse_loss
        prediction_loss = rank(predicted, per_token)  # per_token is detached inside
        total = loss + self.loss_predictor_weight * prediction_loss
        return {"loss": total, "reconstruction": loss.detach(), "loss_prediction": prediction_loss.detach()}

    @torch.no_grad()
    def token_scores(self, batch: Batch, encoder: MaskedEncoder) -> Tensor | None:
        """(B, N) difficulty of every token predicted by the EMA teacher on the full input (HPM); None without it.

        The teacher encodes all N tokens (no mask tokens), projects them with its decoder embedding, adds the
        decoder's fixed position table and runs its loss predictor (methods/IMAGE.md §3.2 step 2).
        """
        if self.teacher is None:
            return None
        parts = self.teacher.module
        latent = parts["encoder"](encoder.inputs(batch))  # (B, prefix+N, D)
        x = parts["decoder_embed"](latent) + self._decoder().decoder_pos_embed.to(latent.dtype)  # (B, prefix+N, Dd)
        return parts["loss_predictor"](x).float()  # (B, N)

    def after_step(self, encoder: MaskedEncoder, progress: float) -> None:
        """EMA update of the teacher (HPM), ``m`` moving from ``ema_momentum[0]`` to ``[1]`` over ``ema_ramp``."""
        if self.teacher is None:
            return
        start, end = self.ema_momentum
        self.teacher.update(self._student(encoder), ema_momentum(progress, start=start, end=end, ramp=self.ema_ramp))

    def dual_loss(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """VideoMAE V2's loss over the tokens hidden from the encoder and kept by the decoder.

        The decoder runs on the K visible latents plus Kd mask tokens and predicts the Kd decoder-kept tokens
        only; regression targets are built for those Kd tokens only. The per-token MSE (mean over P) is
        averaged over the kept tokens that are also target tokens (``Masks.targets``, the encoder-hidden ones
        under :class:`~mim.masking.dual.DualMasking`), without host syncs: a gathered 0/1 weight (B, Kd)
        divided by its sum clamped to >= 1 (a batch without such tokens gives loss 0).

        Returns:
            The scalar loss.
        """
        keep = masks.decoder
        assert keep is not None
        pred = self._decoder()(latent, masks.visible, keep=keep).float()  # (B, Kd, P)
        patches = gather_tokens(encoder.patchify(encoder.inputs(batch)).float(), keep)  # (B, Kd, P)
        per_token = (pred - self._normalise(patches, encoder)).pow(2).mean(dim=-1)  # (B, Kd)
        is_target = torch.zeros(keep.shape[0], masks.num_tokens, dtype=torch.bool, device=keep.device)
        is_target = is_target.scatter_(1, masks.targets.flatten(1), True)  # (B, N)
        weight = is_target.gather(1, keep).to(per_token.dtype)  # (B, Kd): hidden and decoder-kept
        return (per_token * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def reconstruct(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """Predicted images for visualisation: visible patches from the input, hidden ones predicted.

        With norm-pix, predictions are de-normalised with each true patch's mean and std (as MAE's demo does).

        Returns:
            (B, C, H, W) (or (B, C, T, H, W) for video) in the input's normalised space.
        """
        patches = encoder.patchify(encoder.inputs(batch)).float()  # (B, N, P)
        pred = self._decoder()(latent, masks.visible).float()  # (B, N, P)
        if self.norm_pix and self.norm_pix_mode == "channel":
            x = patches.unflatten(-1, (-1, encoder.in_chans))  # (B, N, P/C, C)
            std = x.std(dim=-2, keepdim=True, unbiased=True) + self.norm_pix_eps  # (B, N, 1, C)
            pred = (pred.unflatten(-1, (-1, encoder.in_chans)) * std + x.mean(dim=-2, keepdim=True)).flatten(-2)
        elif self.norm_pix:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True, unbiased=True) + self.norm_pix_eps).sqrt()
            pred = pred * std + mean
        hidden = masks.hidden.unsqueeze(-1)  # (B, N, 1)
        return encoder.unpatchify(torch.where(hidden, pred, patches))

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token", "decoder.decoder_pos_embed"}
