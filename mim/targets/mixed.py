"""MixedAE: MAE on mixed images with homologous recognition (Chen et al., "Mixed Autoencoder for Self-supervised Visual
Representation Learning", CVPR 2023; /work/shared/methods/MORE.md section 2; no official code).

Compose with :class:`GroupPartitionMasking` (``group_size`` equal to this target's): within each group of
g consecutive samples the visible sets partition the grid. One step of :class:`MixedPixelTarget`:

1. **mix**: the group's visible tokens (with their position embeddings) form one sequence of N tokens, plus g sets of
   prefix tokens (one cls per source), optionally a learned segment embedding per source slot;
2. **encode** with homologous attention in every block: ``attention="homologous"`` lets each token attend only to the
   tokens of its own image (an exact source mask), ``"topk"`` keeps each query's ``L/g`` largest logits (the paper's
   replaceable homologous attention: the model must *recognise* its homologous tokens), ``"full"`` is naive mixing
   (the paper's ablation that hurts);
3. **unmix** into each sample's (prefix + N/g) latent and reconstruct its hidden 75 % with MAE's decoder and norm-pix
   loss (:class:`~mim.targets.PixelTarget`, unchanged);
4. **homologous contrastive**: SupCon over the encoder's output patch tokens of each mixed sequence, positives = same
   source (:func:`homologous_contrastive_loss`). Loss ``L_rec + contrastive_weight * L_HC``.

The target runs the step's encoder pass itself (:meth:`MixedPixelTarget.encode`, the encoder's blocks, weights and
final norm over the mixed sequences) and hands each sample's part to the module as the shared latent, so a step has one
encoder pass, as MAE's. With ``attention="homologous"`` and no segment embedding the mixed pass equals the per-sample
pass exactly (tests/test_mixedae.py).

Mixing, the functional core (pure tensor code): each run of ``g`` consecutive samples is a *group*; its samples get
visible sets that partition the grid (:class:`GroupPartitionMasking`, ``N/g`` each); the mixed sequence of a group
holds at position ``n`` the token of the sample that owns ``n`` (its *source*, slot ``b % g``), with ``n``'s own
position embedding. :func:`mix_tokens` / :func:`unmix_tokens` are a permutation (G = B / g sequences of N tokens
<-> (B, N/g) tokens); :func:`mixing_sources` records each position's source; :func:`homologous_mask` restricts
attention to one source; :func:`topk_mask` keeps each query's k largest logits; :func:`homologous_contrastive_loss`
is SupCon with positives = same source. The masking strategy is
:class:`mim.masking.GroupPartitionMasking`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range, invalid
from mim.masking.group_partition import GroupPartitionMasking, group_partition
from mim.models.base import Encoder
from mim.models.encoder import MaskedEncoder
from mim.targets.pixels import PixelTarget
from mim.tokens import gather_tokens
from mim.types import Batch, Masks

__all__ = [
    "GroupPartitionMasking",
    "MixedPixelTarget",
    "group_partition",
    "homologous_contrastive_loss",
    "homologous_mask",
    "masked_attention_block",
    "mix_tokens",
    "mixing_sources",
    "topk_mask",
    "unmix_tokens",
]

Mixing = Literal["homologous", "topk", "full"]


def _check_groups(visible: Tensor, group_size: int) -> tuple[int, int]:
    b, k = visible.shape
    if b % group_size:
        raise ValueError(f"mixing needs a batch that is a multiple of group_size={group_size}, got {b} samples")
    return b // group_size, k * group_size


def _positions(visible: Tensor, group_size: int) -> Tensor:
    """(B, K) -> (G, N): the positions of each group's tokens, slot by slot (slot 0's K first)."""
    g_count, n = _check_groups(visible, group_size)
    return visible.reshape(g_count, n)  # (G, N)


def mix_tokens(tokens: Tensor, visible: Tensor, group_size: int) -> Tensor:
    """Place every sample's visible tokens at their positions in its group's mixed sequence.

    Args:
        tokens: (B, K, D) the visible tokens (with their position embeddings), in the order of ``visible``.
        visible: (B, K) positions; within each group of ``g`` consecutive samples they partition [0, N), N = g K.
        group_size: g.

    Returns:
        (G, N, D) mixed sequences, G = B / g: row ``n`` is the token of the sample that owns position ``n``.
    """
    pos = _positions(visible, group_size)  # (G, N)
    flat = tokens.reshape(pos.shape[0], pos.shape[1], tokens.shape[-1])  # (G, N, D) slot-major
    order = pos.argsort(dim=1)  # (G, N): order[n] = index in flat of the token placed at position n
    return flat.gather(1, order.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))  # (G, N, D)


def unmix_tokens(mixed: Tensor, visible: Tensor, group_size: int) -> Tensor:
    """The inverse of :func:`mix_tokens`: each sample's tokens back from its group's mixed sequence.

    Args:
        mixed: (G, N, D).
        visible: (B, K), as given to :func:`mix_tokens`.
        group_size: g.

    Returns:
        (B, K, D) in the order of ``visible``.
    """
    pos = _positions(visible, group_size)  # (G, N)
    out = mixed.gather(1, pos.unsqueeze(-1).expand(-1, -1, mixed.shape[-1]))  # (G, N, D) slot-major
    return out.reshape(visible.shape[0], visible.shape[1], mixed.shape[-1])  # (B, K, D)


def mixing_sources(visible: Tensor, group_size: int) -> Tensor:
    """The source slot (0 <= s < g) of every position of every mixed sequence.

    Args:
        visible: (B, K) partitioning positions, as for :func:`mix_tokens`.
        group_size: g.

    Returns:
        (G, N) int64.
    """
    b, k = visible.shape
    slots = torch.arange(b, device=visible.device).remainder(group_size)  # (B,)
    slots = slots.unsqueeze(1).expand(b, k).unsqueeze(-1)  # (B, K, 1)
    return mix_tokens(slots, visible, group_size).squeeze(-1)  # (G, N)


def homologous_mask(sources: Tensor) -> Tensor:
    """Attention restricted to homologous tokens: query ``i`` may attend to key ``j`` iff both have one source.

    Args:
        sources: (G, L) source slot of each token of each sequence.

    Returns:
        (G, L, L) bool, True = may attend (the convention of ``scaled_dot_product_attention``).
    """
    return sources.unsqueeze(2) == sources.unsqueeze(1)  # (G, L, L)


def topk_mask(logits: Tensor, k: int) -> Tensor:
    """Each query keeps its ``k`` largest attention logits (MixedAE's homologous attention).

    Ties at the k-th value are all kept (a rule the paper does not state), so a row may keep more than ``k``.

    Args:
        logits: (..., L_q, L_k).
        k: keys kept per query, 1 <= k <= L_k.

    Returns:
        (..., L_q, L_k) bool, True = kept.
    """
    threshold = logits.topk(k, dim=-1).values[..., -1:]  # (..., L_q, 1)
    return logits >= threshold


def homologous_contrastive_loss(features: Tensor, sources: Tensor, temperature: float) -> Tensor:
    """SupCon (Khosla et al., NeurIPS 2020, L_out) within each sequence, positives = tokens of the same source.

    For anchor ``i`` with positives ``P(i)`` (same source, ``j != i``) and the other tokens ``A(i)`` (all ``j != i``)::

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) ),  s = cosine similarity

    averaged over the anchors that have a positive.

    Args:
        features: (G, L, D) token features.
        sources: (G, L) source slot of each token.
        temperature: t > 0.

    Returns:
        () the mean loss.
    """
    z = F.normalize(features.float(), dim=-1)  # (G, L, D)
    logits = z @ z.transpose(1, 2) / temperature  # (G, L, L)
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)  # (L, L)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)  # (G, L, L), -inf on the diagonal
    positive = homologous_mask(sources) & ~eye  # (G, L, L)
    count = positive.sum(dim=-1)  # (G, L)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=-1) / count.clamp_min(1)  # (G, L)
    has = (count > 0).to(per_anchor.dtype)
    return (per_anchor * has).sum() / has.sum().clamp_min(1.0)


def masked_attention_block(
    block: Block, x: Tensor, *, allowed: Tensor | None = None, topk: int | None = None
) -> tuple[Tensor, Tensor]:
    """One timm ``Block`` with explicit attention logits, restricted by a mask and/or to each query's top-k keys.

    Args:
        block: a plain timm ``Block`` over ``Attention`` (its weights, norms, layer scales, drop path).
        x: (G, L, D) the block's input.
        allowed: (G, L, L) bool, True = query may attend to key; None: every key.
        topk: keep each query's ``topk`` largest logits (after ``allowed``); None: all.

    Returns:
        (G, L, D) the block's output and (G, h, L, L) bool, the keys each query attended to in each head.
    """
    attn: Any = block.attn
    g, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    y = block.norm1(x)
    qkv = attn.qkv(y).reshape(g, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, G, h, L, hd)
    q, k, v = qkv.unbind(0)  # 3 x (G, h, L, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (G, h, L, L)
    keep = torch.ones_like(logits, dtype=torch.bool) if allowed is None else allowed.unsqueeze(1).expand_as(logits)
    if topk is not None:
        keep = keep & topk_mask(logits.masked_fill(~keep, float("-inf")), topk)  # (G, h, L, L)
    weights = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # (G, h, L, L)
    weights = attn.attn_drop(weights)
    out = (weights @ v).transpose(1, 2).reshape(g, length, heads * head_dim)  # (G, L, A)
    out = attn.proj_drop(attn.proj(attn.norm(out)))  # (G, L, D)
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))  # (G, L, D)
    return x, keep


class MixedPixelTarget(PixelTarget):
    """MixedAE: pixel reconstruction of each image from a mixed sequence, with homologous recognition.

    Args:
        group_size: g, images per mixed sequence; must equal ``GroupPartitionMasking.group_size`` (paper: 4).
        attention: ``homologous`` (each token attends to its own image's tokens only), ``topk`` (each query keeps its
            ``L/g`` largest logits, L = g * prefix + N: the paper's homologous attention) or ``full`` (naive mixing).
        segment_embed: add a learned ``Embedding(g, D)`` row per source slot to the mixed tokens (the paper's segment
            embedding; how the paper assigns slots is not verified).
        temperature: of the homologous contrastive loss (not given in the sources; 0.2 here).
        contrastive_weight: lambda in ``L_rec + lambda * L_HC`` (not given in the sources; 1 here); 0 disables it.
        decoder_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio, norm_pix, norm_pix_eps, norm_pix_mode,
            weight: as :class:`~mim.targets.PixelTarget`.

    Returns (forward): ``loss``, ``reconstruction``, ``homologous_contrastive`` and ``homologous_precision`` (share of
    the keys the last block kept, over queries and heads, that are homologous; 1 under ``homologous``, about 1/g for
    an untrained ``topk``).
    """

    def __init__(
        self,
        *,
        group_size: int = 4,
        attention: Mixing = "topk",
        segment_embed: bool = False,
        temperature: float = 0.2,
        contrastive_weight: float = 1.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix: bool = True,
        norm_pix_eps: float = 1e-6,
        norm_pix_mode: Literal["patch", "channel"] = "patch",
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
        owner = "MixedPixelTarget"
        self.group_size = check_int(owner, "group_size", group_size, minimum=2)
        check_choice(owner, "attention", attention, ("homologous", "topk", "full"))
        check_range(owner, "temperature", temperature, 0.0, float("inf"), low_open=True, high_open=True)
        check_range(owner, "contrastive_weight", contrastive_weight, 0.0, float("inf"), high_open=True)
        self.attention: Mixing = attention
        self.use_segment_embed = bool(segment_embed)
        self.temperature, self.contrastive_weight = float(temperature), float(contrastive_weight)
        self.segment_embed: nn.Embedding | None = None
        self._pass: tuple[Tensor, Tensor, Tensor | None, Tensor] | None = None  # encode -> forward, within a step

    def bind(self, encoder: Encoder) -> None:
        super().bind(encoder)
        vit: Any = getattr(encoder, "vit", None)
        blocks = list(vit.blocks) if vit is not None else []
        if not blocks or any(type(b) is not Block or not isinstance(b.attn, Attention) for b in blocks):
            raise ValueError(
                "MixedPixelTarget needs a timm VisionTransformer of plain Block/Attention layers (it runs them with "
                f"homologous attention), got {sorted({type(b).__name__ for b in blocks})}"
            )
        enc: Any = encoder
        if enc.grid.num_tokens % self.group_size:
            raise invalid(
                "MixedPixelTarget",
                "group_size",
                f"a divisor of the encoder's {enc.grid.num_tokens} tokens",
                self.group_size,
            )
        if self.use_segment_embed:
            self.segment_embed = nn.Embedding(self.group_size, enc.embed_dim)
            nn.init.normal_(self.segment_embed.weight, std=0.02)

    def mixed_encode(self, encoder: MaskedEncoder, images: Tensor, masks: Masks) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the mixed sequences of a batch.

        Args:
            encoder: the encoder (its tokenizer, prefix tokens, blocks and final norm).
            images: (B, C, H, W) normalised.
            masks: group-partition masks, ``visible`` (B, N/g).

        Returns:
            ``latent`` (B, prefix + K, D), each sample's part of the mixed output (its own prefix tokens first),
            ``mixed`` (G, g * prefix + N, D) the final-normed mixed output, ``precision`` () the share of homologous
            keys among those the last block attended to.
        """
        g, visible = self.group_size, masks.visible
        b, k = visible.shape
        if b % g or k * g != masks.num_tokens:
            raise ValueError(
                f"MixedPixelTarget(group_size={g}) needs a batch that is a multiple of {g} and {masks.num_tokens // g} "
                f"visible tokens per sample (GroupPartitionMasking(group_size={g})), got B={b}, K={k}"
            )
        vit: Any = encoder.vit
        p = encoder.num_prefix_tokens
        tokens = gather_tokens(encoder.tokenize(images), visible)  # (B, K, D)
        sources = mixing_sources(visible, g)  # (G, N)
        mixed = mix_tokens(tokens, visible, g)  # (G, N, D)
        slots = torch.arange(g, device=visible.device)
        prefix = encoder.prefix_tokens(b).reshape(b // g, g * p, -1)  # (G, g*p, D): slot s's prefix at s*p
        prefix_sources = slots.repeat_interleave(p).expand(b // g, -1)  # (G, g*p)
        if self.segment_embed is not None:
            mixed = mixed + self.segment_embed(sources)  # (G, N, D)
            prefix = prefix + self.segment_embed(prefix_sources)  # (G, g*p, D)
        x = vit.norm_pre(torch.cat([prefix, mixed], dim=1))  # (G, L, D), L = g*p + N
        all_sources = torch.cat([prefix_sources, sources], dim=1)  # (G, L)
        same = homologous_mask(all_sources)  # (G, L, L)
        allowed = same if self.attention == "homologous" else None
        topk = x.shape[1] // g if self.attention == "topk" else None
        kept = same.unsqueeze(1)  # (G, 1, L, L)
        for block in vit.blocks:
            x, kept = masked_attention_block(block, x, allowed=allowed, topk=topk)  # (G, L, D)
        x = vit.norm(x)  # (G, L, D)
        with torch.no_grad():
            precision = (kept & same.unsqueeze(1)).sum() / kept.sum().clamp_min(1)  # over queries and heads
        own_prefix = x[:, : g * p].reshape(b, p, -1)  # (B, p, D)
        own_tokens = unmix_tokens(x[:, g * p :], visible, g)  # (B, K, D)
        return torch.cat([own_prefix, own_tokens], dim=1), x, precision.float()

    def mixed_latent(
        self,
        batch: Batch,
        masks: Masks,
        latent: Tensor | None,
        encoder: MaskedEncoder,
        inputs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Each sample's latent from the mixed pass; a trailing incomplete group (``B % g`` samples, e.g. the last
        validation batch) is encoded unmixed (``latent``'s rows when given), so such a batch is scored instead of
        refused.

        Returns:
            ``own`` (B, prefix + K, D), ``mixed`` (G, g * prefix + N, D) or None when B < g, ``precision`` ().
        """
        b, g = masks.visible.shape[0], self.group_size
        full = b - b % g
        images = encoder.inputs(batch) if inputs is None else inputs
        if full == b:
            return self.mixed_encode(encoder, images, masks)
        tail = latent[full:] if latent is not None else encoder(images[full:], masks.visible[full:])
        if full == 0:
            return tail, None, tail.new_ones(())
        head = Masks(visible=masks.visible[:full], targets=masks.targets[:full], num_tokens=masks.num_tokens)
        own, mixed, precision = self.mixed_encode(encoder, images[:full], head)
        return torch.cat([own, tail], dim=0), mixed, precision

    def encode(self, batch: Batch, masks: Masks, inputs: Tensor, encoder: Encoder) -> Tensor | None:
        """The step's encoder pass: the mixed sequences, unmixed into each sample's (B, prefix + K, D) latent (a
        trailing incomplete group encoded unmixed); kept for :meth:`forward`."""
        if masks.visible.shape[0] < self.group_size:
            return None  # no full group: the module's unmixed pass
        own, mixed, precision = self.mixed_latent(batch, masks, None, cast(MaskedEncoder, encoder), inputs)
        self._pass = (masks.visible, own, mixed, precision)
        return own

    def forward(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> dict[str, Tensor]:  # type: ignore[override]
        """The reconstruction and homologous contrastive losses, from the pass :meth:`encode` ran for this step (or,
        called without it, a mixed pass of its own; ``latent`` then serves a trailing incomplete group)."""
        if masks.decoder is not None:
            raise ValueError("MixedPixelTarget does not support decoder masks (dual masking)")
        step, self._pass = self._pass, None
        if step is not None and step[0] is masks.visible and step[1] is latent:
            own, mixed, precision = step[1:]
        else:
            own, mixed, precision = self.mixed_latent(batch, masks, latent, encoder)
        reconstruction = self.hidden_token_losses(batch, masks, own, encoder)[2].mean()
        if mixed is None:
            contrastive = reconstruction.new_zeros(())
        else:
            p = encoder.num_prefix_tokens * self.group_size
            full = mixed.shape[0] * self.group_size
            sources = mixing_sources(masks.visible[:full], self.group_size)  # (G, N)
            contrastive = homologous_contrastive_loss(mixed[:, p:], sources, self.temperature)
        loss = reconstruction + self.contrastive_weight * contrastive if self.contrastive_weight else reconstruction
        return {
            "loss": loss,
            "reconstruction": reconstruction.detach(),
            "homologous_contrastive": contrastive.detach(),
            "homologous_precision": precision,
        }

    @torch.no_grad()
    def reconstruct(self, batch: Batch, masks: Masks, latent: Tensor, encoder: MaskedEncoder) -> Tensor:
        """:meth:`PixelTarget.reconstruct` from the mixed pass (``latent`` is replaced by each sample's part)."""
        own, _, _ = self.mixed_latent(batch, masks, latent, encoder)
        return super().reconstruct(batch, masks, own, encoder)
