"""CAE: regress the latents of the hidden patches from the visible ones, then decode their pixels.

Chen et al., "Context Autoencoder for Self-Supervised Representation Learning", IJCV 2023 (arXiv 2202.03026);
official code Atten4Vis/CAE (``models/modeling_cae.py``, ``furnace/engine_for_pretraining.py``) and the pixel-target
variant of PaddlePaddle/VIMER ``CAE/`` (``--target_mode rgb``). Spec: methods/MORE.md §1, methods/IMAGE.md §6.

One step, on top of the module's shared encoder pass over the visible tokens (``z_v``, prefix dropped):

1. **Regressor** (:class:`~mim.models.regressor.ContextRegressor`): one query per hidden token (a learned mask token
   plus the token's fixed sin-cos position) cross-attends to ``[z_v ; queries]``; the visible latents are never
   updated. Output ``z_pred`` (B, T, D), the predicted latents of the hidden tokens.
2. **Alignment target**: the **same encoder** (not an EMA copy: CAE copies the weights every step, momentum 0), in
   its current mode (train: drop path on, as official), run on the **hidden** tokens only under ``torch.no_grad``,
   prefix dropped: ``z_tgt`` (B, T, D).
3. **Decoder**: ``z_pred + pos`` through layer-scaled self-attention blocks over the hidden tokens only, a layer norm
   and ``Linear(D, P)``: pixels of the hidden patches (the official CAE predicts DALL-E token ids; mim uses VIMER's
   pixel variant with MAE's norm-pix targets, as methods/MORE.md §1.3 says).
4. **Loss**: ``MSE(pred, norm_pix(patches[hidden])) + align_weight * MSE(z_pred, z_tgt)``, each a mean over all
   elements (CAE: ``align_weight`` 2).

The hidden tokens are ``Masks.targets`` flattened (for :class:`~mim.masking.RandomMasking`, M = 1: every hidden token).
The encoder's gradient comes only through ``z_v``; the alignment pass leaves the encoder's captured block outputs
(:meth:`~mim.models.encoder.MaskedEncoder.capture_blocks`) as the visible pass left them, so another target of the
same step can still read them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mim.checks import check_int, check_range, invalid
from mim.models.base import Encoder
from mim.models.embed import sincos_for_grid
from mim.models.encoder import MaskedEncoder, init_mae_weights_
from mim.models.regressor import ContextRegressor, layer_scale_blocks
from mim.targets.base import Target
from mim.targets.pixels import norm_pix
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = ["ContextRegressionTarget"]

# Bookkeeping of MaskedEncoder.capture_blocks that a second forward pass would overwrite.
_CAPTURE_STATE = ("block_outputs", "_captured_for")


class ContextRegressionTarget(Target):
    """Context Autoencoder: latent regressor + alignment to the encoder on the hidden tokens + pixel decoder.

    Args:
        regressor_depth: cross-attention blocks of the regressor (CAE: 4).
        decoder_depth: self-attention blocks of the decoder over the hidden tokens (CAE: 4).
        num_heads: heads of regressor and decoder; None = the encoder's (CAE-B: 12, the encoder's).
        mlp_ratio: MLP expansion in regressor and decoder (4).
        init_values: layer-scale initial value of regressor and decoder blocks (CAE-B: 0.1; CAE-L: 1e-5); None: no
            layer scale.
        align_weight: factor of the alignment loss (CAE: 2).
        norm_pix: normalise the target patches by their mean and unbiased variance (MAE's norm-pix).
        norm_pix_eps: epsilon added to the variance.
        weight: factor of this target's loss in the total.
    """

    def __init__(
        self,
        *,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.1,
        align_weight: float = 2.0,
        norm_pix: bool = True,
        norm_pix_eps: float = 1e-6,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        owner = "ContextRegressionTarget"
        check_int(owner, "regressor_depth", regressor_depth)
        check_int(owner, "decoder_depth", decoder_depth, minimum=0)
        if num_heads is not None:
            check_int(owner, "num_heads", num_heads)
        check_range(owner, "mlp_ratio", mlp_ratio, 0, math.inf, low_open=True, high_open=True)
        if init_values is not None:
            check_range(owner, "init_values", init_values, 0, math.inf, low_open=True, high_open=True)
        check_range(owner, "align_weight", align_weight, 0, math.inf, high_open=True)
        check_range(owner, "norm_pix_eps", norm_pix_eps, 0, math.inf, low_open=True)
        self.regressor_depth, self.decoder_depth = regressor_depth, decoder_depth
        self.num_heads, self.mlp_ratio, self.init_values = num_heads, mlp_ratio, init_values
        self.align_weight, self.norm_pix, self.norm_pix_eps = float(align_weight), norm_pix, norm_pix_eps
        self.regressor: ContextRegressor | None = None
        self.decoder_blocks: nn.Module | None = None
        self.decoder_norm: nn.LayerNorm | None = None
        self.decoder_pred: nn.Linear | None = None

    def bind(self, encoder: Encoder) -> None:
        if not isinstance(encoder, MaskedEncoder):
            raise ValueError(
                f"ContextRegressionTarget predicts pixels and needs an image or video encoder (mim.models.MaskedEncoder), "
                f"got {type(encoder).__name__}"
            )
        dim = encoder.embed_dim
        heads = self.num_heads or encoder.num_heads
        if dim % heads:
            raise invalid("ContextRegressionTarget", "num_heads", f"a divisor of the encoder width {dim}", heads)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # The fixed sin-cos table of the token grid at the encoder's width (CAE reuses the encoder's table).
        table = sincos_for_grid(dim, encoder.grid)  # (N, D)
        self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)  # (1, N, D), fixed
        self.regressor = ContextRegressor(
            dim=dim, depth=self.regressor_depth, num_heads=heads, mlp_ratio=self.mlp_ratio, init_values=self.init_values
        )
        self.decoder_blocks = layer_scale_blocks(dim, self.decoder_depth, heads, self.mlp_ratio, self.init_values)
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, encoder.patch_dim)
        with torch.no_grad():
            # Xavier-uniform linears (the official base run's top-level re-init, methods/IMAGE.md §6.4 pitfall 3);
            # layer scales keep init_values.
            init_mae_weights_(self)
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # CAE truncates at +-1 std

    def _parts(self) -> tuple[ContextRegressor, nn.Module, nn.LayerNorm, nn.Linear]:
        if self.regressor is None or self.decoder_blocks is None or self.decoder_norm is None:
            raise RuntimeError("ContextRegressionTarget is not bound to an encoder: call target.bind(encoder) first")
        assert self.decoder_pred is not None
        return self.regressor, self.decoder_blocks, self.decoder_norm, self.decoder_pred

    def regress(self, latent: Tensor, masks: Masks, num_prefix_tokens: int) -> Tensor:
        """The regressor's predicted latents of the hidden tokens.

        Args:
            latent: (B, prefix + K, D) encoder output on the visible tokens.
            masks: the step's masks; the hidden tokens are ``masks.targets`` flattened (T = M * T').
            num_prefix_tokens: prefix rows of ``latent`` (dropped: the regressor reads patch latents only).

        Returns:
            (B, T, D).
        """
        regressor = self._parts()[0]
        hidden = masks.targets.flatten(1)  # (B, T)
        b, t = hidden.shape
        z_v = latent[:, num_prefix_tokens:]  # (B, K, D)
        pos = self.pos_embed.to(z_v.dtype).expand(b, -1, -1)  # (B, N, D)
        pos_v, pos_h = gather_tokens(pos, masks.visible), gather_tokens(pos, hidden)  # (B, K, D), (B, T, D)
        queries = self.mask_token.to(z_v.dtype).expand(b, t, -1)  # (B, T, D)
        return regressor(queries, pos_h, z_v, pos_v)  # (B, T, D)

    def decode(self, z_pred: Tensor, hidden: Tensor) -> Tensor:
        """Pixels of the hidden patches from their predicted latents (self-attention over the hidden tokens only).

        Args:
            z_pred: (B, T, D) regressed latents.
            hidden: (B, T) int64 their token indices.

        Returns:
            (B, T, P).
        """
        _, blocks, norm, head = self._parts()
        pos = gather_tokens(self.pos_embed.to(z_pred.dtype).expand(z_pred.shape[0], -1, -1), hidden)  # (B, T, D)
        return head(norm(blocks(z_pred + pos)))  # (B, T, P)

    @torch.no_grad()
    def alignment_targets(self, batch: Batch, hidden: Tensor, encoder: MaskedEncoder) -> Tensor:
        """The encoder's own latents of the hidden tokens: same weights, current mode, no gradient.

        Args:
            batch: the normalised batch.
            hidden: (B, T) int64 hidden token indices.
            encoder: the (student) encoder.

        Returns:
            (B, T, D), prefix rows dropped.
        """
        saved: dict[str, Any] = {k: encoder.__dict__[k] for k in _CAPTURE_STATE if k in encoder.__dict__}
        try:
            z = encoder(encoder.inputs(batch), hidden)  # (B, prefix+T, D)
        finally:
            encoder.__dict__.update(saved)  # the visible pass's captured blocks stay readable
        return z[:, encoder.num_prefix_tokens :]  # (B, T, D)

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        hidden = masks.targets.flatten(1)  # (B, T)
        z_pred = self.regress(latent, masks, encoder.num_prefix_tokens)  # (B, T, D)
        pred = self.decode(z_pred, hidden).float()  # (B, T, P)
        patches = gather_tokens(encoder.patchify(encoder.inputs(batch)).float(), hidden)  # (B, T, P)
        if self.norm_pix:
            patches = norm_pix(patches, self.norm_pix_eps)
        z_tgt = self.alignment_targets(batch, hidden, encoder)  # (B, T, D)
        reconstruction = F.mse_loss(pred, patches)
        alignment = F.mse_loss(z_pred.float(), z_tgt.float())
        loss = reconstruction + self.align_weight * alignment
        return {"loss": loss, "reconstruction": reconstruction.detach(), "alignment": alignment.detach()}

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}
