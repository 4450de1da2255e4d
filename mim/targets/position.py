"""Position prediction: MP3 (Zhai et al., "Position Prediction as an Effective Pretraining Strategy", ICML 2022).

The encoder sees patch contents **without any position embedding** (``MaskedEncoder(positions="none")``) and
classifies every token's position among all N (cross-entropy, the token's own raster index as the label).
Context masking (the paper's η; here ``RandomMasking(mask_ratio=1 - η)``): in every attention layer the queries
are all tokens and the keys/values are the context (visible) tokens only. That splits into two streams:

* the **context stream** is the plain encoder on the visible tokens: the module's one encoder pass (``latent``);
* every **hidden token** is a query only: at each block it cross-attends to that block's context input and goes
  through the block's MLP, with the same weights; it never reaches another token (it affects only its own
  prediction, the efficiency argument of the paper).

Head: the encoder's final norm, then ``Linear(D, N)``, on every token (``predict="all"``) or on the hidden ones only
(``predict="hidden"``). Nothing carries a position, so permuting token contents permutes the predictions; blank
patches (identical contents) are inherently ambiguous, hence ``accuracy_textured`` on non-constant patches.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from mim.checks import check_choice, check_range
from mim.models.base import Encoder
from mim.models.encoder import init_mae_weights_
from mim.targets.base import Target
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = ["PositionTarget", "cross_attention", "query_block"]


def cross_attention(attn: Attention, queries: Tensor, context: Tensor) -> Tensor:
    """A timm self-attention layer with queries from ``queries`` and keys/values from ``context`` only.

    The fused ``qkv`` weight is split: ``q = W_q x_query``, ``k, v = W_{k,v} x_context``; q/k norms, the scale, the
    output norm, gate and projection are the layer's own.

    Args:
        attn: the block's attention (already-normed inputs are passed, as ``Block`` does).
        queries: (B, H, D) query tokens.
        context: (B, L, D) key/value tokens.

    Returns:
        (B, H, D).
    """
    b, h, _ = queries.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    a = heads * head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias  # (3A, D), (3A,)
    q = F.linear(queries, weight[:a], None if bias is None else bias[:a])  # (B, H, A)
    kv = F.linear(context, weight[a:], None if bias is None else bias[a:])  # (B, L, 2A)
    q = q.view(b, h, heads, head_dim).transpose(1, 2)  # (B, heads, H, hd)
    k, v = kv.view(b, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, L, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=attn.scale)  # (B, heads, H, hd)
    x = attn.norm(x.transpose(1, 2).reshape(b, h, a))  # (B, H, A)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(queries).sigmoid()
    return attn.proj_drop(attn.proj(x))  # (B, H, D)


def query_block(block: Block, queries: Tensor, context: Tensor) -> Tensor:
    """One timm ``Block`` for query-only tokens: cross-attention to ``context`` (the block's input), then the MLP.

    Args:
        block: the encoder block (its weights, layer scales and drop path).
        queries: (B, H, D) the query tokens' input to this block.
        context: (B, L, D) the context tokens' input to this block (prefix included).

    Returns:
        (B, H, D) the query tokens' output.
    """
    attn: Any = block.attn  # a timm Attention (checked in PositionTarget.bind)
    attended = cross_attention(attn, block.norm1(queries), block.norm1(context))  # (B, H, D)
    x = queries + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))  # (B, H, D)


class PositionTarget(Target):
    """MP3: classify each token's position among all N, from content alone.

    Needs a :class:`~mim.models.MaskedEncoder` built with ``positions="none"`` (any position signal makes the task
    trivial) over plain timm ``Block`` s. Compose with ``RandomMasking(mask_ratio=1 - η)``: ``visible`` is the
    context, ``targets`` the query-only tokens.

    Args:
        predict: ``all`` scores every token, context included (the spec's reading of the paper, as the minimal
            unofficial re-implementation does); ``hidden`` scores the query-only tokens.
        label_smoothing: label smoothing of the cross-entropy, in [0, 1) (0: the paper pretrains with it off).
        textured_eps: a patch whose values span at most this (max - min, normalised pixels) is *constant* and left out
            of ``accuracy_textured`` (blank borders cannot be placed).
        weight: loss weight.

    Returns (forward): ``loss`` (mean cross-entropy over the scored tokens), ``accuracy`` (top-1 over them),
    ``accuracy_textured`` (top-1 over the scored non-constant patches) and ``accuracy_hidden`` (top-1 over the
    query-only tokens).
    """

    def __init__(
        self,
        *,
        predict: Literal["all", "hidden"] = "all",
        label_smoothing: float = 0.0,
        textured_eps: float = 1e-6,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        check_choice(self, "predict", predict, ("all", "hidden"))
        check_range(self, "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        check_range(self, "textured_eps", textured_eps, 0.0, float("inf"), high_open=True)
        self.predict = predict
        self.label_smoothing = float(label_smoothing)
        self.textured_eps = float(textured_eps)
        self.head: nn.Linear | None = None

    def bind(self, encoder: Encoder) -> None:
        """Check the encoder carries no position, build ``Linear(D, N)`` and request every block's output."""
        positions = getattr(encoder, "positions", None)
        if positions != "none":
            raise ValueError(
                "PositionTarget needs an encoder without position embeddings (MaskedEncoder(positions='none')), "
                f"got {type(encoder).__name__} with positions={positions!r}: a position signal makes the task trivial"
            )
        vit: Any = getattr(encoder, "vit", None)
        blocks = list(vit.blocks) if vit is not None else []
        if not blocks or any(type(b) is not Block or not isinstance(b.attn, Attention) for b in blocks):
            raise ValueError(
                "PositionTarget needs a timm VisionTransformer of plain Block/Attention layers (the hidden tokens "
                f"cross-attend through them), got {sorted({type(b).__name__ for b in blocks})}"
            )
        self.head = nn.Linear(encoder.embed_dim, encoder.grid.num_tokens)
        init_mae_weights_(self.head)  # Xavier-uniform weight, zero bias
        if len(blocks) > 1:  # block i's context input is block i-1's output
            vit_encoder: Any = encoder
            vit_encoder.capture_blocks(range(len(blocks) - 1))

    def _head(self) -> nn.Linear:
        if self.head is None:
            raise RuntimeError("PositionTarget: call bind(encoder) before forward")
        return self.head

    def logits(self, batch: Batch, masks: Masks, latent: Tensor, encoder: Encoder) -> tuple[Tensor, Tensor]:
        """Position logits of the context tokens and of the query-only tokens.

        Args:
            batch: the normalised batch.
            masks: ``visible`` (B, K) is the context; ``targets`` (B, M, T) the query-only tokens.
            latent: (B, prefix + K, D) the encoder's output on the visible tokens (its captured block outputs are the
                keys and values of the later blocks).
            encoder: the encoder (``positions="none"``).

        Returns:
            (context logits (B, K, N), hidden logits (B, M*T, N)), in the order of ``visible`` and of the flattened
            ``targets``.
        """
        head = self._head()
        enc: Any = encoder  # a MaskedEncoder (checked in bind): tokenize, prefix_tokens, captured_blocks
        vit: Any = enc.vit
        prefix = enc.num_prefix_tokens
        context_logits = head(latent[:, prefix:])  # (B, K, N)
        tokens = enc.tokenize(enc.inputs(batch))  # (B, N, D), no position
        b = tokens.shape[0]
        hidden = masks.targets.flatten(1)  # (B, H)
        # Block 0's context input, exactly as the encoder formed it; block i's is block i-1's output.
        visible_tokens = gather_tokens(tokens, masks.visible)  # (B, K, D)
        context = vit.norm_pre(torch.cat([enc.prefix_tokens(b), visible_tokens], dim=1))
        captured = enc.captured_blocks(latent) if len(vit.blocks) > 1 else {}
        x = vit.norm_pre(gather_tokens(tokens, hidden))  # (B, H, D)
        for i, block in enumerate(vit.blocks):
            x = query_block(block, x, context if i == 0 else captured[i - 1])  # (B, H, D)
        hidden_logits = head(vit.norm(x))  # (B, H, N)
        return context_logits, hidden_logits

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: Encoder) -> dict[str, Tensor]:
        context_logits, hidden_logits = self.logits(batch, masks, latent, encoder)
        hidden = masks.targets.flatten(1)  # (B, H)
        if self.predict == "all":
            logits = torch.cat([context_logits, hidden_logits], dim=1)  # (B, K + H, N)
            labels = torch.cat([masks.visible, hidden], dim=1)  # (B, K + H)
        else:
            logits, labels = hidden_logits, hidden
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), label_smoothing=self.label_smoothing
        )  # mean over B * scored tokens
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == labels).float()  # (B, S)
            enc: Any = encoder
            patches = enc.patchify(enc.inputs(batch))  # (B, N, P)
            spread = patches.amax(dim=-1) - patches.amin(dim=-1)  # (B, N)
            textured = (spread > self.textured_eps).gather(1, labels).float()  # (B, S)
            hidden_correct = (hidden_logits.argmax(dim=-1) == hidden).float()  # (B, H)
        return {
            "loss": loss,
            "accuracy": correct.mean(),
            "accuracy_textured": (correct * textured).sum() / textured.sum().clamp_min(1.0),
            "accuracy_hidden": hidden_correct.mean(),
        }
