"""FLOPs per image of one MAE pretraining step, counted with PyTorch's FLOP counter (deterministic, no timings).

For each architecture (default: MAE ViT-B/16, ViT-L/16 and ViT-H/14 at 224 px, decoder 8 blocks x 512 wide,
16 heads, mask ratio 0.75) this prints the forward GFLOPs per image of

  (a) ``MaskedEncoder`` on the visible tokens (K = int(N * (1 - r)) patch tokens + the cls token),
  (b) the same encoder on all N tokens (+ cls),
  (c) the MAE decoder of ``PixelTarget`` (decoder_embed, mask tokens, blocks, norm, prediction head),
  (d) one ``PretrainModule.compute_losses`` call (encoder + every target + loss),

the ratio (b)/(a), the training FLOPs as 3 x forward, and the forward + backward actually counted
(``loss.backward()`` under the counter). Every count is checked against an analytic formula computed here,
and the totals are compared with reference figures for the official ``models_mae.py`` (facebookresearch/mae): an
analytic count and FlopCounterMode run on that file (see BENCHMARKS.md).

Counting rules (those of ``torch.utils.flop_counter.FlopCounterMode``): one multiply-add = 2 FLOPs; only
matrix products and convolutions count (no softmax, LayerNorm, GELU, bias adds or the loss). On CPU the
counter does not see fused ``scaled_dot_product_attention``, so timm's fused attention is switched off with
``timm.layers.set_fused_attn(False)`` *before* any model is built, and the script checks that it is off.

Analytic model, per image (N patches, K visible, prefix tokens c, width D, decoder width Dd, patch values P,
MLP hidden width H = mlp_ratio * D):

  ViT block on n tokens   2*n*(4*D^2 + 2*D*H) + 2*2*n^2*D   (qkv + proj + MLP; QK^T and AV)
                          = 24*n*D^2 + 4*n^2*D for mlp_ratio 4
  patch embedding         2*N*P*D                          (computed for all N patches, then gathered)
  decoder embedding       2*(K + c)*D*Dd
  prediction head         2*T*Dd*P                         (T = N - K hidden tokens here; N + 1 in models_mae.py)
  backward                2 x forward, less the input gradient of the patch embedding (images need no grad)

Video section (VideoMAE V2 dual masking: Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual
Masking", CVPR 2023, OpenGVLab/VideoMAEv2; compared with an earlier back-of-envelope estimate of -33 % forward FLOPs,
70.5 -> 47.2 GFLOP per clip, which dual masking should not exceed): ViT-B/16 on 16 frames at 224 px, tubelet 2 (grid
8 x 14 x 14, N = 1568, P = 1536), no cls token (VideoMAE has none), tube masking 0.9 (K = 8 * (196 - int(196 * 0.9)) = 160,
VideoMAE's count and mim's default), decoder 4 blocks x 384 (6 heads), per-channel norm-pix. The decoder of ``PixelTarget`` is counted on the V1
masks (every hidden token decoded, N + prefix decoder tokens) and on ``DualMasking`` masks with the same encoder mask
plus running cell 0.5 (K + prefix + Kd decoder tokens, Kd = 784); both are checked against the analytic form

  decoder V1   2*(K + c)*D*Dd + dec_depth * block(N + c) + 2*(N - K)*Dd*P
  decoder V2   2*(K + c)*D*Dd + dec_depth * block(K + c + Kd) + 2*Kd*Dd*P

and the encoder + decoder totals (forward, and forward + backward counted) give the saving in %.

Run:  .venv/bin/python benchmarks/flops.py [--arch vit_base_patch16_224 ...] [--mask-ratio 0.75] [--no-video]
      .venv/bin/python benchmarks/flops.py --video-only
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import set_fused_attn
from torch.utils.flop_counter import FlopCounterMode

G = 1e9

ALIASES = {
    "b16": "vit_base_patch16_224",
    "l16": "vit_large_patch16_224",
    "h14": "vit_huge_patch14_224",
}
DEFAULT_ARCHS = ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]

# Reference figures for the official facebookresearch/mae models_mae.py (224 px, mask 0.75, decoder 8 x 512, 16
# heads). "enc"/"dec" are the transformer blocks only; "fwd"/"train" the analytic totals (train = 3 x fwd);
# "fc_fwd"/"fc_train" FlopCounterMode on the official models_mae.py (train = forward + backward counted); "full" the
# full-sequence encoder forward (patch embedding included: e.g. ViT-B 34.90 blocks + 0.23 patch embedding = 35.1).
PERF_2A: dict[str, dict[str, float]] = {
    "vit_base_patch16_224": {
        "enc": 8.59,
        "dec": 10.55,
        "fwd": 19.56,
        "train": 58.7,
        "fc_fwd": 19.56,
        "fc_train": 58.46,
        "full": 35.1,
    },
    "vit_large_patch16_224": {
        "enc": 30.44,
        "dec": 10.55,
        "fwd": 41.51,
        "train": 124.5,
        "fc_fwd": 41.51,
        "fc_train": 124.23,
        "full": 123.1,
    },
    "vit_huge_patch14_224": {
        "enc": 82.48,
        "dec": 14.02,
        "fwd": 97.12,
        "train": 291.4,
        "fc_fwd": 97.12,
        "fc_train": 290.99,
        "full": 334.6,
    },
}
PERF_2A_CONFIG = (0.75, 512, 8, 16)  # mask ratio, decoder dim, depth, heads the reference figures assume


@dataclass
class Result:
    """Per-image FLOP counts of one architecture (FLOPs, not GFLOPs)."""

    arch: str
    n: int  # patch tokens N
    k: int  # visible patch tokens K
    prefix: int  # cls / register tokens
    measured: dict[str, float]
    analytic: dict[str, float]


def block_flops(n: int, dim: int, hidden: int) -> int:
    """Forward FLOPs of one pre-norm ViT block on ``n`` tokens: qkv, proj, MLP, QK^T and AV."""
    return 2 * n * (4 * dim * dim + 2 * dim * hidden) + 2 * 2 * n * n * dim


def analytic_flops(
    *,
    n: int,
    k: int,
    prefix: int,
    patch_values: int,
    dim: int,
    depth: int,
    hidden: int,
    dec_dim: int,
    dec_depth: int,
    dec_hidden: int,
) -> dict[str, float]:
    """The analytic counts (per image) for the quantities the script measures."""
    t = n - k  # hidden tokens the decoder predicts
    patch = 2 * n * patch_values * dim
    enc_blocks_vis = depth * block_flops(k + prefix, dim, hidden)
    enc_blocks_all = depth * block_flops(n + prefix, dim, hidden)
    dec_embed = 2 * (k + prefix) * dim * dec_dim
    dec_blocks = dec_depth * block_flops(n + prefix, dec_dim, dec_hidden)
    dec_pred = 2 * t * dec_dim * patch_values
    enc_vis = patch + enc_blocks_vis
    dec = dec_embed + dec_blocks + dec_pred
    step = enc_vis + dec
    official_pred = 2 * (n + 1) * dec_dim * patch_values  # models_mae.py predicts every token, cls included
    return {
        "patch_embed": patch,
        "enc_vis": enc_vis,
        "enc_all": patch + enc_blocks_all,
        "enc_blocks_vis": enc_blocks_vis,
        "enc_blocks_all": enc_blocks_all,
        "dec": dec,
        "dec_blocks": dec_blocks,
        "step": step,
        "train_3x": 3 * step,
        "train": 3 * step - patch,  # no input gradient for the patch embedding
        "official_step": enc_vis + dec_embed + dec_blocks + official_pred,
    }


def _module_flops(counts: dict[str, dict], suffix: str) -> int:
    """Total FLOPs of the one module whose tracked name ends with ``suffix``."""
    names = [name for name in counts if name.endswith(suffix)]
    if len(names) != 1:
        raise RuntimeError(f"expected one module named *{suffix} in the FLOP counts, found {names}")
    return sum(counts[names[0]].values())


def _count(fn) -> tuple[int, dict[str, dict], object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), counter.get_flop_counts(), out


def measure(
    arch: str,
    *,
    mask_ratio: float,
    batch_size: int,
    dec_dim: int,
    dec_depth: int,
    dec_heads: int,
    backward: bool,
) -> Result:
    from mim.masking.random import RandomMasking
    from mim.models.encoder import MaskedEncoder
    from mim.module import PretrainModule
    from mim.targets.pixels import PixelTarget

    encoder = MaskedEncoder(arch=arch)
    target = PixelTarget(decoder_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads)
    module = PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=mask_ratio), targets=[target])
    fused = [name for name, m in module.named_modules() if getattr(m, "fused_attn", False)]
    if fused:
        raise RuntimeError(f"fused attention is still on in {fused[:3]}...: the counter would miss attention")

    device = torch.device("cpu")
    images = torch.randn(batch_size, encoder.in_chans, *encoder.img_size, generator=torch.Generator().manual_seed(0))
    batch = {"image": images}
    masks = module.draw_masks(batch, module.generator(device, 0, 0, 0))
    b, n, k, prefix = batch_size, encoder.grid.num_tokens, masks.visible.shape[1], encoder.num_prefix_tokens

    with torch.no_grad():
        enc_vis, counts_vis, latent = _count(lambda: encoder(images, masks.visible))
        enc_all, counts_all, _ = _count(lambda: encoder(images))
        dec, counts_dec, _ = _count(lambda: target(batch, masks, latent, encoder))
    step, counts_step, out = _count(lambda: module.compute_losses(batch, masks))
    measured = {
        "enc_vis": enc_vis / b,
        "enc_all": enc_all / b,
        "enc_blocks_vis": _module_flops(counts_vis, "vit.blocks") / b,
        "enc_blocks_all": _module_flops(counts_all, "vit.blocks") / b,
        "patch_embed": _module_flops(counts_vis, "vit.patch_embed") / b,
        "dec": dec / b,
        "dec_blocks": sum(_module_flops(counts_dec, f"decoder_blocks.{i}") for i in range(dec_depth)) / b,
        "step": step / b,
        "train_3x": 3 * step / b,
    }
    if backward:
        bwd, _, _ = _count(lambda: out["loss"].backward())
        measured["train"] = (step + bwd) / b

    vit, decoder = encoder.vit, target.decoder
    analytic = analytic_flops(
        n=n,
        k=k,
        prefix=prefix,
        patch_values=encoder.patch_size[0] * encoder.patch_size[1] * encoder.in_chans,
        dim=encoder.embed_dim,
        depth=len(vit.blocks),
        hidden=vit.blocks[0].mlp.fc1.out_features,
        dec_dim=dec_dim,
        dec_depth=dec_depth,
        dec_hidden=decoder.decoder_blocks[0].mlp.fc1.out_features,
    )
    return Result(arch=arch, n=n, k=k, prefix=prefix, measured=measured, analytic=analytic)


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown table; the first ``text_columns`` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    just = lambda i, c, w: c.ljust(w) if i < text_columns else c.rjust(w)
    fmt = lambda r: "| " + " | ".join(just(i, c, w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i < text_columns else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def _g(x: float, digits: int = 2) -> str:
    return f"{x / G:.{digits}f}"


def _rel(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.2f} %"


def report(results: list[Result], args: argparse.Namespace) -> bool:
    """Print the tables; return False when a measured count disagrees with the analytic formula."""
    print(
        f"mim FLOPs per image (torch.utils.flop_counter.FlopCounterMode, fused attention off; "
        f"1 multiply-add = 2 FLOPs; GFLOP = 1e9)\n"
        f"torch {torch.__version__}, timm {timm.__version__}; mask ratio {args.mask_ratio}, "
        f"decoder {args.decoder_depth} blocks x {args.decoder_dim} ({args.decoder_heads} heads), "
        f"batch {args.batch_size} (counts divided by it)\n"
    )
    rows = []
    for r in results:
        m = r.measured
        rows.append(
            [
                r.arch,
                f"{r.n}",
                f"{r.k}+{r.prefix}",
                _g(m["enc_vis"]),
                _g(m["enc_all"]),
                f"{m['enc_all'] / m['enc_vis']:.2f}x",
                _g(m["dec"]),
                _g(m["step"]),
                f"{m['dec'] / m['step'] * 100:.0f} %",
                _g(m["train_3x"], 1),
                _g(m["train"], 1) if "train" in m else "-",
                f"{m['train'] / m['step']:.3f}" if "train" in m else "-",
            ]
        )
    print("Forward GFLOPs per image (measured)")
    print(
        _table(
            [
                "arch",
                "N",
                "K+cls",
                "(a) enc visible",
                "(b) enc all",
                "(b)/(a)",
                "(c) decoder",
                "(d) step fwd",
                "(c)/(d)",
                "train = 3x(d)",
                "fwd+bwd counted",
                "(fwd+bwd)/fwd",
            ],
            rows,
        )
    )

    ok = True
    rows = []
    names = [
        ("enc_vis", "(a) enc visible"),
        ("enc_all", "(b) enc all"),
        ("dec", "(c) decoder"),
        ("step", "(d) step fwd"),
        ("train", "fwd+bwd"),
    ]
    for r in results:
        for key, label in names:
            if key not in r.measured:
                continue
            meas, ana = r.measured[key], r.analytic[key]
            exact = meas == ana
            ok &= exact
            rows.append([r.arch, label, f"{meas:,.0f}", f"{ana:,.0f}", "exact" if exact else _rel(meas, ana)])
        sum_ok = r.measured["step"] == r.measured["enc_vis"] + r.measured["dec"]
        ok &= sum_ok
        rows.append([r.arch, "(d) = (a) + (c)", "", "", "yes" if sum_ok else "NO"])
    print("\nMeasured vs analytic FLOPs per image (formula in the module docstring)")
    print(_table(["arch", "quantity", "FlopCounterMode", "analytic", "agreement"], rows, text_columns=2))

    config = (args.mask_ratio, args.decoder_dim, args.decoder_depth, args.decoder_heads)
    rows = []
    for r in results:
        ref = PERF_2A.get(r.arch)
        if ref is None or config != PERF_2A_CONFIG:
            continue
        m, a = r.measured, r.analytic
        pairs = [
            ("enc blocks, visible", m["enc_blocks_vis"], ref["enc"]),
            ("enc all tokens (b)", m["enc_all"], ref["full"]),
            ("dec blocks", m["dec_blocks"], ref["dec"]),
            ("step fwd", m["step"], ref["fc_fwd"]),
            ("train = 3 x fwd", m["train_3x"], ref["train"]),
        ]
        if "train" in m:
            pairs.append(("fwd+bwd counted", m["train"], ref["fc_train"]))
        for label, ours, theirs in pairs:
            rows.append([r.arch, label, _g(ours, 3), f"{theirs:.2f}", _rel(ours, theirs * G)])
        rows.append([r.arch, "step fwd, analytic models_mae.py", _g(a["official_step"], 3), f"{ref['fwd']:.2f}", ""])
    if rows:
        print(
            "\nComparison with the official models_mae.py (facebookresearch/mae; reference figures rounded to 0.01 GF)"
        )
        print(_table(["arch", "quantity", "mim GF", "official GF", "mim vs official"], rows, text_columns=2))
        print(
            "Note: mim's decoder applies decoder_norm and decoder_pred to the N - K hidden tokens only; "
            "models_mae.py applies them to all N + 1 tokens, so mim's step is 2*(K+1)*Dd*P FLOPs smaller."
        )
    elif config != PERF_2A_CONFIG:
        print(
            "\n(no comparison with the official models_mae.py: the reference figures assume mask 0.75 and a decoder "
            "of 8 x 512 with 16 heads)"
        )
    return ok


# ---------------------------------------------------------------------------------------------- video: dual masking
# An earlier back-of-envelope estimate of dual masking (ViT-B, VideoMAE geometry: 160 visible, no cls): forward
# GFLOP per clip (-33 %).
PERF_DUAL_B = {"v1": 70.5, "v2": 47.2}


@dataclass
class VideoResult:
    """FLOP counts per clip (FLOPs) of the video section; keys ``v1`` / ``v2`` for the two decoder masks."""

    n: int  # N tokens
    k: int  # K visible
    kd: int  # decoder-kept tokens (V2)
    prefix: int
    loss_tokens: dict[str, int]  # hidden (and decoder-kept) tokens per clip
    measured: dict[str, float]
    analytic: dict[str, float]


def video_analytic(
    *,
    n: int,
    k: int,
    kd: int,
    prefix: int,
    patch_values: int,
    dim: int,
    depth: int,
    hidden: int,
    dec_dim: int,
    dec_depth: int,
    dec_hidden: int,
) -> dict[str, float]:
    """Analytic forward FLOPs per clip of the encoder and of the V1 / V2 (dual-masking) decoders."""
    patch = 2 * n * patch_values * dim
    enc = patch + depth * block_flops(k + prefix, dim, hidden)
    dec_embed = 2 * (k + prefix) * dim * dec_dim
    dec_v1 = dec_embed + dec_depth * block_flops(n + prefix, dec_dim, dec_hidden) + 2 * (n - k) * dec_dim * patch_values
    dec_v2 = dec_embed + dec_depth * block_flops(k + prefix + kd, dec_dim, dec_hidden) + 2 * kd * dec_dim * patch_values
    out: dict[str, float] = {"enc": enc, "patch_embed": patch, "dec_v1": dec_v1, "dec_v2": dec_v2}
    for v in ("v1", "v2"):
        out[f"step_{v}"] = enc + out[f"dec_{v}"]
        out[f"train_{v}"] = 3 * out[f"step_{v}"] - patch  # no input gradient for the tubelet embedding
        out[f"dec_blocks_{v}"] = dec_depth * block_flops((n if v == "v1" else k + kd) + prefix, dec_dim, dec_hidden)
    out["enc_blocks"] = enc - patch
    return out


def measure_video(*, backward: bool) -> VideoResult:
    """Count encoder and decoder FLOPs of VideoMAE ViT-B/16 (16 x 224, tubelet 2) with and without dual masking."""
    from mim.masking.dual import DualMasking
    from mim.masking.tube import TubeMasking
    from mim.models.encoder import MaskedEncoder
    from mim.targets.pixels import PixelTarget

    encoder = MaskedEncoder(
        arch="vit_base_patch16_224",
        img_size=224,
        patch_size=16,
        num_frames=16,
        tubelet_size=2,
        model_kwargs={"class_token": False, "global_pool": "avg"},  # VideoMAE has no cls token
    )
    target = PixelTarget(decoder_dim=384, decoder_depth=4, decoder_num_heads=6, norm_pix_mode="channel")
    target.bind(encoder)
    grid, cpu = encoder.grid, torch.device("cpu")
    clips = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0))
    batch = {"video": clips}
    gen = lambda: torch.Generator().manual_seed(0)
    masks = {
        "v1": TubeMasking(mask_ratio=0.9)(1, grid, generator=gen(), device=cpu),
        "v2": DualMasking(encoder=TubeMasking(mask_ratio=0.9), decoder_mask_ratio=0.5)(
            1, grid, generator=gen(), device=cpu
        ),
    }
    if not torch.equal(masks["v1"].visible, masks["v2"].visible):
        raise RuntimeError("the dual masks do not share the tube masks' encoder mask")
    v2 = masks["v2"]
    assert v2.decoder is not None
    loss_tokens = {
        "v1": int(masks["v1"].hidden.sum()),
        "v2": int(v2.hidden.gather(1, v2.decoder).sum()),
    }
    n, k, kd, prefix = grid.num_tokens, v2.visible.shape[1], v2.decoder.shape[1], encoder.num_prefix_tokens
    measured: dict[str, float] = {}
    with torch.no_grad():
        enc, counts_enc, latent = _count(lambda: encoder(clips, masks["v1"].visible))
        measured["enc"] = enc
        measured["enc_blocks"] = _module_flops(counts_enc, "vit.blocks")
        for v, m in masks.items():
            dec, counts_dec, _ = _count(lambda m=m: target(batch, m, latent, encoder))
            measured[f"dec_{v}"] = dec
            measured[f"dec_blocks_{v}"] = sum(_module_flops(counts_dec, f"decoder_blocks.{i}") for i in range(4))
    for v, m in masks.items():
        step, _, out = _count(lambda m=m: target(batch, m, encoder(clips, m.visible), encoder)["loss"])
        measured[f"step_{v}"] = step
        if backward:
            bwd, _, _ = _count(lambda out=out: out.backward())
            measured[f"train_{v}"] = step + bwd
    vit, decoder = encoder.vit, target.decoder
    assert decoder is not None
    analytic = video_analytic(
        n=n,
        k=k,
        kd=kd,
        prefix=prefix,
        patch_values=encoder.patch_dim,
        dim=encoder.embed_dim,
        depth=len(vit.blocks),
        hidden=_mlp_hidden(vit.blocks[0]),
        dec_dim=384,
        dec_depth=4,
        dec_hidden=_mlp_hidden(decoder.decoder_blocks[0]),
    )
    return VideoResult(n=n, k=k, kd=kd, prefix=prefix, loss_tokens=loss_tokens, measured=measured, analytic=analytic)


def _mlp_hidden(block: Any) -> int:
    """MLP hidden width of a timm ViT block."""
    return int(block.mlp.fc1.out_features)


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.1f} %"


def report_video(r: VideoResult) -> bool:
    """Print the dual-masking tables; return False when a measured count disagrees with the analytic formula."""
    m, a = r.measured, r.analytic
    print(
        "Video: VideoMAE ViT-B/16, 16 frames x 224 px, tubelet 2x16x16 (grid 8x14x14), no cls token, tube mask 0.9, "
        "decoder 4 blocks x 384 (6 heads), per-channel norm-pix; GFLOPs per clip\n"
        f"N = {r.n}, K = {r.k} visible, {r.prefix} prefix tokens; V1 decodes N = {r.n} tokens and predicts "
        f"{r.n - r.k}; V2 (running cell 0.5) decodes K + Kd = {r.k} + {r.kd} = {r.k + r.kd} tokens and predicts "
        f"Kd = {r.kd}; loss tokens per clip: V1 {r.loss_tokens['v1']}, V2 {r.loss_tokens['v2']} "
        f"(= 4 x {r.loss_tokens['v2'] // 4} hidden positions; VideoMAE's 160-visible mask gives 4 x 176 = 704)\n"
    )
    rows = []
    quantities = [
        ("encoder (visible tokens)", "enc", "enc"),
        ("decoder blocks", "dec_blocks_v1", "dec_blocks_v2"),
        ("decoder (PixelTarget)", "dec_v1", "dec_v2"),
        ("encoder + decoder fwd", "step_v1", "step_v2"),
        ("fwd + bwd counted", "train_v1", "train_v2"),
    ]
    for label, k1, k2 in quantities:
        if k1 not in m:
            continue
        rows.append([label, _g(m[k1]), _g(m[k2]), _g(m[k2] - m[k1]), _pct(m[k2], m[k1])])
    print("Forward GFLOPs per clip (measured): V1 = tube only, V2 = tube + running-cell decoder mask 0.5")
    print(_table(["quantity", "V1", "V2 (dual)", "V2 - V1", "change"], rows))

    ok, rows = True, []
    checks = [
        ("enc", "encoder"),
        ("dec_v1", "decoder V1"),
        ("dec_v2", "decoder V2"),
        ("step_v1", "fwd V1"),
        ("step_v2", "fwd V2"),
        ("train_v1", "fwd+bwd V1"),
        ("train_v2", "fwd+bwd V2"),
    ]
    for key, label in checks:
        if key not in m:
            continue
        exact = m[key] == a[key]
        ok &= exact
        rows.append([label, f"{m[key]:,.0f}", f"{a[key]:,.0f}", "exact" if exact else _rel(m[key], a[key])])
    print("\nMeasured vs analytic FLOPs per clip (formula in the module docstring)")
    print(_table(["quantity", "FlopCounterMode", "analytic", "agreement"], rows))

    # The same formula at VideoMAE's own geometry (160 visible tokens), to compare with that estimate (PERF_DUAL_B).
    geometry = dict(patch_values=1536, dim=768, depth=12, hidden=3072, dec_dim=384, dec_depth=4, dec_hidden=1536)
    ref = video_analytic(n=1568, k=160, kd=784, prefix=0, **geometry)
    blocks = {v: ref["enc_blocks"] + ref[f"dec_blocks_{v}"] for v in ("v1", "v2")}
    pairs: list[tuple[str, float, float]] = [
        (f"mim, measured (K = {r.k})", m["step_v1"], m["step_v2"]),
        ("analytic, K = 160, all matmuls", ref["step_v1"], ref["step_v2"]),
        ("analytic, K = 160, blocks only", blocks["v1"], blocks["v2"]),
        ("earlier estimate (analytic)", PERF_DUAL_B["v1"] * G, PERF_DUAL_B["v2"] * G),
    ]
    rows = [[label, _g(v1, 1), _g(v2, 1), _pct(v2, v1)] for label, v1, v2 in pairs]
    print("\nEncoder + decoder forward GFLOPs per clip, V1 -> V2, against the earlier estimate")
    print(_table(["count", "V1", "V2", "change"], rows))
    print(
        "Note: the estimate's V1 figure (70.5) is close to the all-matmul total (tubelet embedding and prediction head "
        "included) while its V2 figure (47.2) is close to the blocks-only total: mixing the two overstates the "
        "saving (47.2 / 70.5 = -33 %). Counted consistently, dual masking saves 27-28 % of the forward FLOPs (28 % "
        "of the blocks, as a back-of-envelope count of the blocks gives: encoder 28 GF, decoder 37 -> 19 GF) and "
        "of the fwd+bwd FLOPs; the decoder's own FLOPs halve."
    )
    return ok


def measure_hpm(*, batch_size: int = 1) -> dict[str, float]:
    """Training FLOPs per image of one MAE step and one HPM step (ViT-B/16, decoder 8 x 512), forward + backward.

    HPM = the student (encoder on visible tokens, reconstructor + loss-predictor decoder stacks) trained on both
    losses, plus the EMA teacher's scoring pass on the full image (``HardPatchTarget.token_scores``: encoder on all
    tokens, decoder embedding and loss predictor; no reconstructor). The EMA update itself has no matrix products.
    """
    from mim.masking.hard_patch import HardPatchMasking
    from mim.masking.random import RandomMasking
    from mim.models.encoder import MaskedEncoder
    from mim.module import PretrainModule
    from mim.targets.hard_patch import HardPatchTarget
    from mim.targets.pixels import PixelTarget

    out: dict[str, float] = {}
    images = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batch = {"image": images}
    for name, masking, target in (
        ("mae", RandomMasking(mask_ratio=0.75), PixelTarget()),
        ("hpm", HardPatchMasking(mask_ratio=0.75), HardPatchTarget(norm_pix=False)),
    ):
        torch.manual_seed(0)
        module = PretrainModule(encoder=MaskedEncoder(arch="vit_base_patch16_224"), masking=masking, targets=[target])
        gen = module.generator(torch.device("cpu"), 0, 0, 0)
        with torch.no_grad():
            scores, _, _ = _count(lambda m=module: m.target_list[0].token_scores(batch, m.encoder))
        masks = module.draw_masks(batch, gen)
        fwd, _, result = _count(lambda m=module, k=masks: m.compute_losses(batch, k))
        bwd, _, _ = _count(lambda r=result: r["loss"].backward())
        out[f"{name}_scores"] = scores / batch_size
        out[f"{name}_train"] = (fwd + bwd) / batch_size
        out[f"{name}_step"] = (fwd + bwd + scores) / batch_size
    return out


def report_hpm(r: dict[str, float]) -> None:
    print("HPM vs MAE, ViT-B/16 224 px, mask 0.75, decoder 8 x 512 (16 heads); GFLOPs per image, forward + backward")
    rows = [
        ["MAE step", _g(r["mae_step"]), "1.00x"],
        ["HPM student (both decoders, both losses)", _g(r["hpm_train"]), f"{r['hpm_train'] / r['mae_step']:.2f}x"],
        ["HPM EMA scoring pass (full image)", _g(r["hpm_scores"]), f"{r['hpm_scores'] / r['mae_step']:.2f}x"],
        ["HPM step (student + scoring)", _g(r["hpm_step"]), f"{r['hpm_step'] / r['mae_step']:.2f}x"],
        ["official Haochen-Wang409/HPM (analytic)", "147.5", f"{147.5e9 / r['mae_step']:.2f}x"],
    ]
    print(_table(["quantity", "GFLOPs", "vs MAE"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        action="append",
        help="timm ViT name, or b16 / l16 / h14 (repeatable; default: ViT-B/16, ViT-L/16, ViT-H/14)",
    )
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of tokens hidden (default 0.75)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per counted call (default 1)")
    parser.add_argument("--decoder-dim", type=int, default=512)
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--decoder-heads", type=int, default=16)
    parser.add_argument("--no-backward", action="store_true", help="skip counting the backward pass")
    parser.add_argument("--no-video", action="store_true", help="skip the video (VideoMAE V2 dual masking) section")
    parser.add_argument("--video-only", action="store_true", help="only the video (dual masking) section")
    parser.add_argument("--hpm", action="store_true", help="only the HPM vs MAE step comparison (ViT-B/16)")
    args = parser.parse_args(argv)
    archs = [ALIASES.get(a.lower(), a) for a in (args.arch or DEFAULT_ARCHS)]
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.no_video and args.video_only:
        parser.error("--no-video and --video-only exclude each other")

    set_fused_attn(False)  # before any model is built: timm's Attention reads the flag in __init__
    torch.manual_seed(0)
    if args.hpm:
        report_hpm(measure_hpm())
        return 0
    ok = True
    if not args.video_only:
        results = [
            measure(
                arch,
                mask_ratio=args.mask_ratio,
                batch_size=args.batch_size,
                dec_dim=args.decoder_dim,
                dec_depth=args.decoder_depth,
                dec_heads=args.decoder_heads,
                backward=not args.no_backward,
            )
            for arch in archs
        ]
        ok = report(results, args)
    if not args.no_video:
        if not args.video_only:
            print()
        ok &= report_video(measure_video(backward=not args.no_backward))
    if not ok:
        print("\nWARNING: a measured count differs from the analytic formula (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
