"""FLOPs per image of one MAE pretraining step, counted with PyTorch's FLOP counter (deterministic, no timings).

For each architecture (default: MAE ViT-B/16, ViT-L/16 and ViT-H/14 at 224 px, decoder 8 blocks x 512 wide,
16 heads, mask ratio 0.75) this prints the forward GFLOPs per image of

  (a) ``MaskedEncoder`` on the visible tokens (K = int(N * (1 - r)) patch tokens + the cls token),
  (b) the same encoder on all N tokens (+ cls),
  (c) the MAE decoder of ``PixelTarget`` (decoder_embed, mask tokens, blocks, norm, prediction head),
  (d) one ``PretrainModule.compute_losses`` call (encoder + every target + loss),

the ratio (b)/(a), the training FLOPs as 3 x forward, and the forward + backward actually counted
(``loss.backward()`` under the counter). Every count is checked against an analytic formula computed here,
and the totals are compared with the figures of PERF.md section 2a (the official ``models_mae.py``).

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

Run:  .venv/bin/python benchmarks/flops.py [--arch vit_base_patch16_224 ...] [--mask-ratio 0.75]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

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

# PERF.md section 2a (224 px, mask 0.75, decoder 8 x 512, 16 heads). "enc"/"dec" are the transformer blocks
# only; "fwd"/"train" the analytic totals (train = 3 x fwd); "fc_fwd"/"fc_train" FlopCounterMode on the
# official models_mae.py (train = forward + backward counted); "full" the full-sequence encoder forward
# (patch embedding included: e.g. ViT-B 34.90 blocks + 0.23 patch embedding = 35.1).
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
PERF_2A_CONFIG = (0.75, 512, 8, 16)  # mask ratio, decoder dim, depth, heads the PERF.md figures assume


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
        print("\nComparison with PERF.md section 2a (official models_mae.py; PERF.md rounds to 0.01 GF)")
        print(_table(["arch", "quantity", "mim GF", "PERF.md GF", "mim vs PERF.md"], rows, text_columns=2))
        print(
            "Note: mim's decoder applies decoder_norm and decoder_pred to the N - K hidden tokens only; "
            "models_mae.py applies them to all N + 1 tokens, so mim's step is 2*(K+1)*Dd*P FLOPs smaller."
        )
    elif config != PERF_2A_CONFIG:
        print("\n(no PERF.md comparison: its figures assume mask 0.75 and a decoder of 8 x 512 with 16 heads)")
    return ok


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
    args = parser.parse_args(argv)
    archs = [ALIASES.get(a.lower(), a) for a in (args.arch or DEFAULT_ARCHS)]
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    set_fused_attn(False)  # before any model is built: timm's Attention reads the flag in __init__
    torch.manual_seed(0)
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
    if not ok:
        print("\nWARNING: a measured count differs from the analytic formula (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
