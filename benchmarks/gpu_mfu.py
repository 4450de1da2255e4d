"""GPU performance of one device (issue 13): GEMM ceiling, FLOPs per image, plain loop vs mim's module vs ``mim fit``.

Sections (``--only`` picks a subset; each has its own time cap and the whole run a budget, ``--budget``, default
470 s, so it fits 8 minutes on one H200; a row that would not fit is skipped with a printed reason):

``gemm``
    The bf16 GEMM ceiling: ``torch.mm`` of 8192 x 8192 matrices timed with CUDA events (TFLOP/s, % of the spec
    peak). MFU is reported both against the spec peak (989.4 TFLOP/s dense bf16, H100/H200 SXM) and this ceiling.
``flops``
    FLOPs per image *counted*, not assumed: one real training step (forward + backward, fp32) of mim's
    ``PretrainModule`` and of the reference MAE under mim's own counter (``mim.callbacks.run_metrics._flop_counter``:
    PyTorch's ``FlopCounterMode`` with fused attention mapped to model FLOPs), printed next to the analytic MAE values
    (ViT-B/16 58.7, ViT-L/16 124.5 GFLOP per image, BENCHMARKS.md). The same step is a parity check: both models hold
    the same weights (the reference loads mim's, except the sin-cos tables, which it builds itself) and see the same
    masking noise, so their losses and gradient norms must agree to float rounding.
``plain``
    The reference MAE (:class:`ReferenceMAE`, written here from He et al. 2022, "Masked Autoencoders Are Scalable
    Vision Learners": patchify, random masking by argsort of per-token noise keeping 25 %, a ViT encoder on the
    visible tokens with a cls token and fixed 2-D sin-cos positions, a decoder of 8 blocks x 512 with mask tokens,
    norm-pix MSE on the hidden patches; attention through ``scaled_dot_product_attention``) and mim's
    ``PretrainModule`` (built as recipes/mae/vit_b16_in1k.yaml builds it) in the same hand-written loop: bf16 autocast
    forward, backward, AdamW step, ``zero_grad``; synthetic images on the device; masks drawn from the same seeded
    generator per step, outside the model, so both start from the same loss. ViT-B/16 and ViT-L/16, eager. The AdamW
    is the one ``mim fit`` uses by default (fused when ``PretrainModule.fused_optimizer`` defaults to True, else
    torch's foreach); with that switch, one more mim ViT-B row runs the other AdamW.
``fit``
    ``mim fit`` through the user's own path, in fresh processes (as benchmarks/gpu_smoke.py): MAE ViT-B/16 and
    ViT-L/16 under the strategy pieces ``ddp``, ``deepspeed_stage_2``, ``deepspeed_stage_3`` and ``fsdp`` (FSDP2) of
    recipes/_base/, I-JEPA ViT-H/14 (recipes/ijepa/vit_h14_in1k.yaml, batch 64) and HPM ViT-B/16
    (recipes/hpm/vit_b16_in1k.yaml), data swapped for :class:`gpu_smoke.SyntheticImages`; :class:`FitTimer` times
    the steps after the warm-up and reads the FLOPs per image that :class:`mim.callbacks.RunMetrics` counted on the
    first step. Module switches that exist (``PretrainModule`` or ``MaskedEncoder`` parameters named
    ``fused_optimizer``, ``compile``, ``activation_checkpointing``, found with ``inspect.signature``) get MAE ViT-B ddp rows
    with their other value (a boolean's default is the row without a switch); absent ones are named in a note.
``compiled``
    The plain loop again with ``torch.compile``: the reference model, and mim's ``compute_losses`` (masks drawn
    outside the graph). The first step, compilation included, is reported as ``compile_s``.

The framework tax is ``mim fit`` (ddp) images/s over the same module's plain-loop images/s (eager), per model.

Records (one JSON object per row, with torch / CUDA / device versions) go to ``$OUT/gpu_mfu.jsonl`` (or ``--out``)
as each row finishes; ``mim fit`` logs next to them. The end is one markdown table per section, under the command
line, ready for BENCHMARKS.md. An out-of-memory row, a failed or timed-out ``mim fit`` or a missing DeepSpeed is
recorded as skipped with its reason, and the run goes on.

``--cpu-dry-run`` runs the same code on the CPU in well under a minute: tiny models (width 64, 2 blocks, patch 8,
32 px), a 256 GEMM, 3 steps, ``mim fit`` with ddp only, compiled rows only with ``--compile-on-cpu``
(tests/test_gpu_mfu.py runs it).

    benchmarks/gpu_mfu.sh                                   # the full run on one GPU (about 7-8 minutes)
    benchmarks/gpu_mfu.sh --only gemm,flops,plain           # a subset
    benchmarks/gpu_mfu.sh --cpu-dry-run                     # the CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import PEAK_BF16_TFLOPS, SmokeTimer  # noqa: E402  (a sibling script, not a package)

from mim.callbacks.run_metrics import RunMetrics, _flop_counter  # noqa: E402
from mim.masking.random import RandomMasking  # noqa: E402
from mim.models.encoder import MaskedEncoder  # noqa: E402
from mim.module import PretrainModule  # noqa: E402
from mim.targets.pixels import PixelTarget  # noqa: E402
from mim.types import Masks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("gemm", "flops", "plain", "fit", "compiled")
SECTION_CAP_S = {"gemm": 20.0, "flops": 40.0, "plain": 70.0, "fit": 250.0, "compiled": 120.0}  # GPU run
ANALYTIC_GFLOP = {"vit_b16": 58.7, "vit_l16": 124.5}  # MAE training step per image, 224 px (BENCHMARKS.md)
STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp")  # recipes/_base pieces (fsdp = FSDP2)
SWITCHES = ("fused_optimizer", "compile", "activation_checkpointing")
G = 1e9


# ------------------------------------------------------------------------------------------ reference MAE
def sincos_table(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position table with a zero row for the cls token.

    Half the channels encode the column, half the row; each half is ``[sin(t w_i), cos(t w_i)]`` with
    ``w_i = 1 / 10000^(i / (dim/4))``.

    Returns:
        (1 + gh*gw, dim) float32.
    """
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")

    def embed(t: Tensor) -> Tensor:
        angles = t.reshape(-1, 1) * omega  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim/2)

    table = torch.cat([embed(xs), embed(ys)], dim=1)  # (N, dim): columns first, then rows
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()  # (1+N, dim)


class RefAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)  # (B, n, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, n, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, n, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, n, D)


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceMAE(nn.Module):
    """A plain-PyTorch MAE written from the paper (He et al., CVPR 2022), independent of mim.

    Args:
        img_size: square input side.
        patch_size: square patch side.
        in_chans: channels C.
        dim, depth, num_heads: encoder width, blocks and heads.
        dec_dim, dec_depth, dec_heads: decoder width, blocks and heads (paper: 512, 8, 16).
        mask_ratio: fraction of patches removed (paper: 0.75).
        norm_pix_eps: added to each target patch's (unbiased) variance.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int = 3,
        dim: int,
        depth: int,
        num_heads: int,
        dec_dim: int = 512,
        dec_depth: int = 8,
        dec_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_keep = int(self.num_patches * (1 - mask_ratio))
        self.norm_pix_eps = norm_pix_eps
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_table(dim, self.grid).unsqueeze(0), persistent=False)  # (1, 1+N, D)
        self.blocks = nn.ModuleList(RefBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("dec_pos", sincos_table(dec_dim, self.grid).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.ModuleList(RefBlock(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch_size * patch_size * in_chans)
        for m in self.modules():  # Xavier-uniform linears, unit LayerNorms, small tokens (the paper's recipe)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), raster order, channel fastest."""
        b, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, p, gw, p)
        return torch.einsum("bcypxq->byxpqc", x).reshape(b, self.num_patches, p * p * c)  # (B, N, P)

    def forward(self, images: Tensor, noise: Tensor) -> Tensor:
        """The norm-pix MSE over the removed patches.

        Args:
            images: (B, C, H, W) normalised.
            noise: (B, N) per-patch noise; the ``num_keep`` lowest stay visible.

        Returns:
            The scalar loss (float32).
        """
        b, n, k = images.shape[0], self.num_patches, self.num_keep
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos[:, 1:]  # (B, N, D)
        shuffle = noise.argsort(dim=1)  # (B, N): kept patches first
        restore = shuffle.argsort(dim=1)  # (B, N): inverse permutation
        keep = shuffle[:, :k]  # (B, K)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.pos[:, :1]).expand(b, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+K, D)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))  # (B, 1+K, Dd)
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n - k, -1)], dim=1)  # (B, N, Dd) shuffled
        tokens = tokens.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, Dd) raster order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.dec_pos  # (B, 1+N, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:].float()  # (B, N, P)
        target = self.patchify(images).float()  # (B, N, P)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + self.norm_pix_eps).sqrt()
        removed = torch.ones(b, n, device=images.device)  # (B, N), 1 = removed, in shuffled order
        removed[:, :k] = 0
        removed = removed.gather(1, restore)  # (B, N) raster order
        per_patch = (pred - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * removed).sum() / removed.sum()


def load_mim_weights(ref: ReferenceMAE, module: PretrainModule) -> None:
    """Copy a mim MAE's learnable weights into ``ref`` (its sin-cos tables stay its own).

    Raises:
        RuntimeError: a parameter of either model is left unmatched, or shapes differ.
    """
    renames = (("encoder.vit.patch_embed.proj.", "patch_embed."), ("encoder.vit.", ""), ("targets.0.decoder.", ""))
    mapped: dict[str, Tensor] = {}
    for name, value in module.named_parameters():
        if not value.requires_grad:  # the fixed sin-cos tables
            continue
        for old, new in renames:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        mapped[name] = value.detach()
    own = dict(ref.named_parameters())
    if set(own) != set(mapped):
        raise RuntimeError(
            f"unmatched parameters: reference {sorted(set(own) - set(mapped))}, mim {sorted(set(mapped) - set(own))}"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(mapped[name])


# ------------------------------------------------------------------------------------------ configurations
@dataclass(frozen=True)
class Arch:
    """One encoder size for the in-process sections: the timm name, or a tiny override on the CPU."""

    key: str  # "vit_b16"
    arch: str
    img_size: int
    patch_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm model_kwargs (tiny models)
    dec: tuple[int, int, int] = (512, 8, 16)  # decoder width, depth, heads

    def build_mim(self, seed: int) -> PretrainModule:
        """mim's MAE as recipes/mae/vit_b16_in1k.yaml builds it (norm-pix, mask 0.75), seeded."""
        torch.manual_seed(seed)
        encoder = MaskedEncoder(
            arch=self.arch,
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=3,
            init="mae",
            model_kwargs=dict(self.kwargs),
        )
        dim, depth, heads = self.dec
        target = PixelTarget(
            decoder_dim=dim, decoder_depth=depth, decoder_num_heads=heads, norm_pix=True, norm_pix_eps=1e-6
        )
        return PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target], seed=seed)

    def build_reference(self, module: PretrainModule) -> ReferenceMAE:
        """The reference MAE with the same shape, holding ``module``'s weights."""
        enc = module.encoder
        assert isinstance(enc, MaskedEncoder)
        dim, depth, heads = self.dec
        ref = ReferenceMAE(
            img_size=self.img_size,
            patch_size=self.patch_size,
            dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            dec_dim=dim,
            dec_depth=depth,
            dec_heads=heads,
        )
        load_mim_weights(ref, module)
        return ref


def archs(cpu: bool) -> list[Arch]:
    if cpu:
        tiny = {"embed_dim": 64, "depth": 2, "num_heads": 2}
        return [
            Arch("vit_b16", "vit_base_patch16_224", 32, 8, tiny, (32, 1, 2)),
            Arch("vit_l16", "vit_large_patch16_224", 32, 8, {**tiny, "embed_dim": 96, "num_heads": 3}, (32, 1, 2)),
        ]
    return [Arch("vit_b16", "vit_base_patch16_224", 224, 16), Arch("vit_l16", "vit_large_patch16_224", 224, 16)]


@dataclass(frozen=True)
class FitModel:
    """One ``mim fit`` model: a recipe plus overrides (the full encoder on the GPU, tiny parts on the CPU)."""

    key: str
    recipe: str
    batch_size: int
    gpu: dict[str, Any]  # --model.init_args.<key> JSON overrides on the GPU
    cpu: dict[str, Any]  # the same on the CPU (tiny)
    analytic: float | None = None


def _encoder(arch: str, size: int, patch: int, **kwargs: Any) -> dict[str, Any]:
    init_args = {"arch": arch, "img_size": size, "patch_size": patch, "in_chans": 3, **kwargs}
    return {"class_path": "mim.models.MaskedEncoder", "init_args": init_args}


def _target(class_path: str, **init_args: Any) -> list[dict[str, Any]]:
    return [{"class_path": f"mim.targets.{class_path}", "init_args": init_args}]


_TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
_TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
_NO_CLS = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # I-JEPA's encoder (see its recipe)
FIT_MODELS = {
    model.key: model
    for model in (
        FitModel(
            "mae_vit_b16",
            "recipes/mae/vit_b16_in1k.yaml",
            128,
            {},
            {
                "encoder": _encoder("vit_base_patch16_224", 32, 8, model_kwargs=_TINY),
                "targets": _target("PixelTarget", **_TINY_DECODER),
            },
            ANALYTIC_GFLOP["vit_b16"],
        ),
        FitModel(
            "mae_vit_l16",
            "recipes/mae/vit_b16_in1k.yaml",  # with the ViT-L/16 encoder (no recipe of its own)
            128,
            {"encoder": _encoder("vit_large_patch16_224", 224, 16, init="mae")},
            {
                "encoder": _encoder(
                    "vit_large_patch16_224", 32, 8, model_kwargs={**_TINY, "embed_dim": 96, "num_heads": 3}
                ),
                "targets": _target("PixelTarget", **_TINY_DECODER),
            },
            ANALYTIC_GFLOP["vit_l16"],
        ),
        FitModel(
            "ijepa_vit_h14",
            "recipes/ijepa/vit_h14_in1k.yaml",
            64,
            {},
            {
                "encoder": _encoder("vit_huge_patch14_224", 32, 4, init="timm", model_kwargs={**_TINY, **_NO_CLS}),
                "targets": _target("LatentTarget", predictor_dim=32, predictor_depth=1, predictor_num_heads=2),
            },
        ),
        FitModel(
            "hpm_vit_b16",
            "recipes/hpm/vit_b16_in1k.yaml",
            128,
            {},
            {
                "encoder": _encoder("vit_base_patch16_224", 32, 8, model_kwargs=_TINY),
                "targets": _target("HardPatchTarget", **_TINY_DECODER),
            },
        ),
    )
}
# Rows in order of importance: the budget may cut the tail.
FIT_ROWS = [
    ("mae_vit_b16", "ddp"),
    ("mae_vit_l16", "ddp"),
    ("mae_vit_b16", "deepspeed_stage_2"),
    ("mae_vit_b16", "deepspeed_stage_3"),
    ("mae_vit_b16", "fsdp"),
    ("ijepa_vit_h14", "ddp"),
    ("hpm_vit_b16", "ddp"),
    ("mae_vit_l16", "deepspeed_stage_2"),
    ("mae_vit_l16", "deepspeed_stage_3"),
    ("mae_vit_l16", "fsdp"),
]


@dataclass(frozen=True)
class Switch:
    """A module switch that exists: its name, where it is (``model``: PretrainModule, ``encoder``: MaskedEncoder,
    ``target``: PixelTarget) and its default."""

    name: str
    where: str
    default: Any

    def values(self) -> list[bool]:
        """The values to add rows for: the other one of a boolean (its default is the row without a switch)."""
        return [not self.default] if isinstance(self.default, bool) else [True, False]

    def flag(self, value: bool, cpu: bool) -> str:
        """The ``mim fit`` argument setting it on MAE ViT-B (a target's: the recipe's, or the tiny, PixelTarget)."""
        if self.where == "target":
            sizes = _TINY_DECODER if cpu else {"decoder_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
            init_args = {**sizes, "norm_pix": True, "norm_pix_eps": 1e-6, self.name: value}
            targets = _target("PixelTarget", **init_args)
            return f"--model.init_args.targets={json.dumps(targets)}"
        prefix = "--model.init_args." if self.where == "model" else "--model.init_args.encoder.init_args."
        return f"{prefix}{self.name}={str(value).lower()}"


def available_switches() -> dict[str, Switch]:
    """The switches of :data:`SWITCHES` that ``PretrainModule``, ``MaskedEncoder`` or ``PixelTarget`` take now."""
    found: dict[str, Switch] = {}
    for where, cls in (("model", PretrainModule), ("encoder", MaskedEncoder), ("target", PixelTarget)):
        params = inspect.signature(cls.__init__).parameters
        for name in SWITCHES:
            if name in params and name not in found:
                found[name] = Switch(name, where, params[name].default)
    return found


def plain_adamw() -> str:
    """The AdamW of the plain loop: what ``mim fit`` uses by default (fused when ``fused_optimizer`` defaults on)."""
    switch = available_switches().get("fused_optimizer")
    return "fused" if switch is not None and switch.default is True else "foreach"


# ------------------------------------------------------------------------------------------ bookkeeping
class Budget:
    """The whole run's deadline, and each section's (its cap, cut to what is left of the run)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.section_end = self.end

    def start_section(self, cap: float) -> None:
        self.section_end = min(self.end, time.perf_counter() + cap)

    def left(self) -> float:
        return self.section_end - time.perf_counter()


class Recorder:
    """Appends each row to ``gpu_mfu.jsonl`` and prints it at once."""

    def __init__(self, out: Path, env: dict[str, Any]) -> None:
        self.path, self.env = out / "gpu_mfu.jsonl", env
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, **fields: Any) -> dict[str, Any]:
        record = {"section": section, "status": "ok", **fields, **self.env}
        self.rows.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        print(f"  [{section}] " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return record

    def skip(self, section: str, reason: str, **fields: Any) -> dict[str, Any]:
        return self.add(section, **fields, status="skipped", reason=reason)

    def section(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["section"] == name]


def environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": L.__version__,
        "cpu_dry_run": not cuda,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class RowTimeout(Exception):
    """An in-process row ran past its time limit (raised by ``SIGALRM`` in the main thread)."""


def _alarm(signum: int, frame: Any) -> None:
    raise RowTimeout


@contextmanager
def row_guard(recorder: Recorder, section: str, device: torch.device, limit: float, **fields: Any) -> Iterator[None]:
    """Run one in-process row: out of memory or past ``limit`` seconds, record it as skipped and go on."""
    timer = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    timer = timer and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # leave SIGALRM to an outer timer (pytest-timeout)
    if timer:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(limit, 1.0))
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        recorder.skip(section, f"out of memory: {str(e).splitlines()[0][:160]}", **fields)
    except RowTimeout:
        recorder.skip(section, f"stopped after its time limit of {limit:.0f} s", **fields)
        torch._dynamo.reset()  # an interrupted compilation leaves no half-built state behind
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        free_memory(device)


def rates(images_per_s: float, gflop: float | None, gemm_tflops: float | None) -> dict[str, float | None]:
    """Achieved TFLOP/s and MFU against the spec peak and the measured GEMM ceiling."""
    if gflop is None:
        return {"tflops": None, "mfu_spec": None, "mfu_gemm": None}
    tflops = images_per_s * gflop / 1e3
    return {
        "tflops": tflops,
        "mfu_spec": tflops / PEAK_BF16_TFLOPS,
        "mfu_gemm": tflops / gemm_tflops if gemm_tflops else None,
    }


# ------------------------------------------------------------------------------------------ sections
def gemm_ceiling(size: int, device: torch.device, iters: int) -> float:
    """bf16 ``torch.mm`` TFLOP/s on (size, size) x (size, size), timed with CUDA events (the host clock on CPU)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b)
        stop.record()
        stop.synchronize()
        seconds = start.elapsed_time(stop) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        seconds = time.perf_counter() - t0
    return 2 * size**3 * iters / seconds / 1e12


def synthetic_images(batch: int, size: int, device: torch.device, pool: int, seed: int) -> Tensor:
    """(pool, B, 3, H, W) smooth normalised images on ``device`` (upsampled low-resolution noise)."""
    low = torch.randn(pool * batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))  # (P*B, 3, 8, 8)
    images = F.interpolate(low.to(device), size=(size, size), mode="bilinear", align_corners=False)
    return images.view(pool, batch, 3, size, size)  # (P, B, 3, H, W)


def make_loss_fns(
    impl: str, arch: Arch, seed: int, device: torch.device, compiled: bool
) -> tuple[nn.Module, Callable[[Tensor, torch.Generator], Tensor]]:
    """The model and ``loss(images, generator)`` of one plain-loop row; the masking noise comes from ``generator``.

    Compiled with static shapes, from scratch for each row (a second model through the same code would otherwise be
    recompiled with dynamic sizes).
    """
    if compiled:
        torch._dynamo.reset()
    with torch.device(device):  # built on the device: no host-side init of large models
        module = arch.build_mim(seed)
        ref = arch.build_reference(module) if impl == "reference" else None
    if ref is not None:
        del module
        model_fn: Callable[..., Tensor] = torch.compile(ref, dynamic=False) if compiled else ref
        n = ref.num_patches

        def ref_loss(images: Tensor, gen: torch.Generator) -> Tensor:
            noise = torch.rand(images.shape[0], n, generator=gen, device=images.device)  # (B, N), outside the graph
            return model_fn(images, noise)

        return ref, ref_loss

    def losses(images: Tensor, visible: Tensor, targets: Tensor) -> Tensor:
        masks = Masks(visible=visible, targets=targets, num_tokens=module.encoder.grid.num_tokens)
        return module.compute_losses({"image": images}, masks)["loss"]

    loss_fn = torch.compile(losses, dynamic=False) if compiled else losses

    def mim_loss(images: Tensor, gen: torch.Generator) -> Tensor:
        masks = module.draw_masks({"image": images}, gen, images)  # same torch.rand draw as the reference
        return loss_fn(images, masks.visible, masks.targets)

    return module, mim_loss


def count_and_compare(arch: Arch, seed: int, device: torch.device, batch: int) -> dict[str, Any]:
    """One fp32 training step of mim's module and of the reference under mim's FLOP counter, same weights and noise.

    Returns:
        GFLOP per image of each, both losses and gradient norms, and whether the position tables agree.
    """
    with torch.device(device):
        module = arch.build_mim(seed)
        ref = arch.build_reference(module)
    images = synthetic_images(batch, arch.img_size, device, 1, seed)[0]  # (B, 3, H, W)
    out: dict[str, Any] = {"model": arch.key, "batch": batch}
    for name, model, fn in (
        ("mim", module, lambda g: make_masks_loss(module, images, g)),
        ("reference", ref, lambda g: ref(images, torch.rand(batch, ref.num_patches, generator=g, device=device))),
    ):
        gen = torch.Generator(device=device).manual_seed(seed)
        with _flop_counter() as counter:
            loss = fn(gen)
            loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        out[f"gflop_per_image_{name}"] = counter.get_total_flops() / batch / G
        out[f"loss_{name}"] = float(loss.detach())
        out[f"grad_norm_{name}"] = float(torch.nn.utils.get_total_norm(grads))
    enc_pos = module.encoder.pos_embed.detach()  # type: ignore[union-attr]
    dec_pos = module.target_list[0].decoder.decoder_pos_embed.detach()  # type: ignore[union-attr]
    out["pos_tables_match"] = bool(torch.allclose(enc_pos, ref.pos) and torch.allclose(dec_pos, ref.dec_pos))
    out["loss_abs_diff"] = abs(out["loss_mim"] - out["loss_reference"])
    out["grad_norm_rel_diff"] = abs(out["grad_norm_mim"] / out["grad_norm_reference"] - 1)
    out["analytic_gflop_per_image"] = ANALYTIC_GFLOP.get(arch.key) if not arch.kwargs else None
    return out


def make_masks_loss(module: PretrainModule, images: Tensor, gen: torch.Generator) -> Tensor:
    masks = module.draw_masks({"image": images}, gen, images)
    return module.compute_losses({"image": images}, masks)["loss"]


def time_plain(
    impl: str,
    arch: Arch,
    *,
    compiled: bool,
    adamw: str,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Warm-up then timed steps of one plain-loop row: bf16 autocast forward, backward, AdamW, zero_grad.

    ``adamw`` is ``fused`` (one kernel, ``AdamW(fused=True)``) or ``foreach`` (torch's default).
    """
    free_memory(device)
    model, loss_fn = make_loss_fns(impl, arch, args.seed, device, compiled)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if adamw == "fused" else None
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    pool = synthetic_images(args.batch_size, arch.img_size, device, 4, args.seed)  # (4, B, 3, H, W)
    gen = torch.Generator(device=device)
    losses: list[Tensor] = []
    compile_s = None
    t0 = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        gen.manual_seed(args.seed + step)  # the same masks for both implementations
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(pool[step % pool.shape[0]], gen)
        if step == 0 and loss.grad_fn is None:  # a compiled loss without a graph would time a no-op backward
            raise RuntimeError(f"{impl} ({'compiled' if compiled else 'eager'}): the loss has no autograd graph")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step == 0 and compiled:
            sync(device)
            compile_s = time.perf_counter() - t0
    sync(device)
    seconds = time.perf_counter() - t0
    record = {
        "batch": args.batch_size,
        "timed_steps": args.steps,
        "seconds": seconds,
        "images_per_s": args.steps * args.batch_size / seconds,
        "peak_memory_GiB": peak_gib(device),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }
    if compile_s is not None:
        record["compile_s"] = compile_s
    del model, loss_fn, opt, pool, losses
    return record


class FitTimer(SmokeTimer):
    """:class:`gpu_smoke.SmokeTimer` plus the FLOPs per image that :class:`RunMetrics` counted on the first step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step < trainer.max_steps or not trainer.is_global_zero:
            return
        counted = [c.flops_per_sample for c in trainer.callbacks if isinstance(c, RunMetrics)]
        record = json.loads(Path(self.out).read_text())
        record["gflop_per_image"] = counted[0] / G if counted and counted[0] else None
        record["strategy_class"] = type(trainer.strategy).__name__
        # What RunMetrics logged at its last logging step (issue 11: its MFU and peak memory, checked on a GPU here
        # against this timer's own images/s and torch.cuda.max_memory_allocated)
        logged = trainer.callback_metrics
        for key in ("speed/mfu", "speed/samples_per_s", "speed/tflops_per_s_per_device", "memory/peak_gb"):
            if key in logged:
                record["runmetrics_" + key.split("/")[1]] = float(logged[key])
        Path(self.out).write_text(json.dumps(record))


def fit_command(
    model: FitModel,
    strategy: str,
    result: Path,
    args: argparse.Namespace,
    extra: list[str] | None = None,
) -> list[str]:
    """The ``mim fit`` command line of one run (the production recipe, synthetic data, a strategy piece, bf16)."""
    cpu = args.cpu_dry_run
    batch = min(model.batch_size, 4) if cpu else model.batch_size
    data = {
        "class_path": "gpu_smoke.SyntheticImages",
        "init_args": {"batch_size": batch, "image_size": 32 if cpu else 224},
    }
    callbacks = [
        {  # with the spec peak on a GPU, so its speed/mfu can be checked against this script's
            "class_path": "mim.callbacks.RunMetrics",
            "init_args": {"count_flops": True, **({} if cpu else {"peak_tflops": PEAK_BF16_TFLOPS})},
        },
        {
            "class_path": "gpu_mfu.FitTimer",
            "init_args": {"warmup": args.fit_warmup, "out": str(result), "label": strategy},
        },
    ]
    command = [sys.executable, "-m", "mim", "fit", "-c", str(ROOT / model.recipe)]
    command += ["-c", str(ROOT / "recipes" / "_base" / f"{strategy}.yaml")]
    command += ["-c", str(ROOT / "recipes" / "_base" / "bf16.yaml")]
    if args.deepspeed_class and strategy.startswith("deepspeed"):
        command.append(f"--trainer.strategy.class_path={args.deepspeed_class}")
    command += [
        f"--data={json.dumps(data)}",
        f"--trainer.callbacks={json.dumps(callbacks)}",  # replaces the recipe's checkpoint / lr-monitor callbacks
        f"--trainer.max_steps={args.fit_warmup + args.fit_steps}",
        f"--trainer.accelerator={'cpu' if cpu else 'gpu'}",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        # RunMetrics logs once, at the last step (one host sync in the run): its numbers go into the record
        f"--trainer.log_every_n_steps={args.fit_warmup + args.fit_steps}",
        f"--trainer.default_root_dir={result.parent / result.stem}",
        "--model.init_args.warmup_steps=5",  # the recipes' 40-epoch warmups would keep the lr near 0
    ]
    overrides = model.cpu if cpu else model.gpu
    command += [f"--model.init_args.{key}={json.dumps(value)}" for key, value in overrides.items()]
    return command + (extra or [])


def run_fit(
    model: FitModel,
    strategy: str,
    label: str,
    extra: list[str],
    args: argparse.Namespace,
    out: Path,
    timeout: float,
) -> tuple[dict[str, Any] | None, str]:
    """One ``mim fit`` in a fresh process: (record, "") or (None, why it failed)."""
    result, log = out / f"fit_{label}.json", out / f"fit_{label}.log"
    result.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    try:
        with log.open("w") as handle:
            code: int | str = subprocess.run(
                fit_command(model, strategy, result, args, extra),
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if code != 0 or not result.is_file():
        lines = log.read_text(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        print("    " + "\n    ".join(lines[-12:]), flush=True)
        return None, f"mim fit failed ({code}) after {wall:.0f} s: {last[:200]}; log {log}"
    return {**json.loads(result.read_text()), "wall_s": wall}, ""


# ------------------------------------------------------------------------------------------ tables
def _num(spec: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, spec)


_PCT, _F1, _G4 = _num(".1%"), _num(".1f"), _num(".4g")
_LOSS = ("loss first -> last", lambda r: f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}")
Column = tuple[str, Callable[[dict[str, Any]], str]]


def _col(header: str, key: str, fmt: Callable[[Any], str] = str) -> Column:
    return header, lambda r: "-" if r.get(key) is None else fmt(r[key])


_SPEED = [
    _col("images/s", "images_per_s", _F1),
    _col("GFLOP/img", "gflop_per_image", _G4),
    _col("TFLOP/s", "tflops", _F1),
    _col("MFU spec", "mfu_spec", _PCT),
    _col("MFU gemm", "mfu_gemm", _PCT),
    _col("peak GiB", "peak_memory_GiB", _num(".2f")),
    _LOSS,
]
TABLES: list[tuple[tuple[str, ...], str, list[Column]]] = [
    (
        ("gemm",),
        "bf16 GEMM ceiling",
        [_col("n", "size"), _col("TFLOP/s", "tflops", _F1), _col("% of spec peak", "mfu_spec", _PCT)],
    ),
    (
        ("flops",),
        "FLOPs per image (counted on one fp32 training step) and reference parity",
        [
            _col("model", "model"),
            _col("mim GFLOP", "gflop_per_image_mim", _G4),
            _col("reference GFLOP", "gflop_per_image_reference", _G4),
            _col("analytic GFLOP", "analytic_gflop_per_image", _G4),
            _col("loss mim", "loss_mim", _num(".5f")),
            _col("loss reference", "loss_reference", _num(".5f")),
            _col("loss abs diff", "loss_abs_diff", _num(".1e")),
            _col("grad-norm rel diff", "grad_norm_rel_diff", _num(".1e")),
            _col("sin-cos tables equal", "pos_tables_match"),
        ],
    ),
    (
        ("plain", "compiled"),
        "Plain loop: reference MAE vs mim's module (bf16 autocast, AdamW)",
        [
            _col("model", "model"),
            _col("impl", "impl"),
            _col("mode", "mode"),
            _col("AdamW", "adamw"),
            _col("batch", "batch"),
            *_SPEED,
            _col("compile s", "compile_s", _F1),
        ],
    ),
    (
        ("fit",),
        "`mim fit` (fresh process: recipe + strategy piece + bf16, synthetic data)",
        [
            _col("model", "model"),
            _col("strategy", "strategy"),
            _col("switch", "switch"),
            _col("batch", "batch_per_device"),
            *_SPEED,
            _col("RunMetrics MFU", "runmetrics_mfu", _PCT),
            _col("RunMetrics peak GB", "runmetrics_peak_gb", _num(".2f")),
            _col("wall s", "wall_s", _F1),
        ],
    ),
    (
        ("tax",),
        "Framework tax (`mim fit` ddp images/s / plain-loop images/s, same module, eager)",
        [
            _col("model", "model"),
            _col("plain images/s", "plain_images_per_s", _F1),
            _col("mim fit images/s", "fit_images_per_s", _F1),
            _col("ratio", "ratio", _num(".3f")),
        ],
    ),
]


def tables(recorder: Recorder) -> str:
    """One markdown table per section (rows that ran), then the skipped rows with their reasons."""
    parts: list[str] = []
    for sections, title, columns in TABLES:
        rows = [r for r in recorder.rows if r["section"] in sections and r["status"] == "ok"]
        if rows:
            lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
            parts.append(f"### {title}\n\n" + "\n".join(lines))
    skipped = [r for r in recorder.rows if r["status"] != "ok"]
    if skipped:
        names = ("model", "impl", "mode", "adamw", "strategy", "switch")
        lines = [f"- {r['section']} {' '.join(str(r[k]) for k in names if r.get(k))}: {r['reason']}" for r in skipped]
        parts.append("### Skipped\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ driver
@dataclass
class Run:
    """What the sections share: options, device, output, the records, the budget and earlier results."""

    args: argparse.Namespace
    device: torch.device
    out: Path
    recorder: Recorder
    budget: Budget
    gemm_tflops: float | None = None
    gflop: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, impl) -> counted GFLOP per image

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"


def section_gemm(run: Run) -> None:
    tflops = gemm_ceiling(run.args.gemm_size, run.device, iters=3 if run.cpu else 50)
    run.gemm_tflops = tflops
    run.recorder.add(
        "gemm", size=run.args.gemm_size, dtype="bfloat16", tflops=tflops, mfu_spec=tflops / PEAK_BF16_TFLOPS
    )


def section_flops(run: Run) -> None:
    for arch in archs(run.cpu):
        if run.budget.left() < 5:
            run.recorder.skip("flops", "section time cap reached", model=arch.key)
            continue
        with row_guard(run.recorder, "flops", run.device, run.budget.left(), model=arch.key):
            result = count_and_compare(arch, run.args.seed, run.device, run.args.flops_batch)
            for impl in ("mim", "reference"):
                run.gflop[(arch.key, impl)] = result[f"gflop_per_image_{impl}"]
            run.recorder.add("flops", **result)


def section_loop(run: Run, section: str) -> None:
    """The plain loop, eager (``plain``) or compiled (``compiled``)."""
    compiled, default_adamw = section == "compiled", plain_adamw()
    rows = [(arch, impl, default_adamw) for arch in archs(run.cpu) for impl in ("reference", "mim")]
    if not compiled and "fused_optimizer" in available_switches():  # mim's switch, the other way, in the plain loop
        rows.append((archs(run.cpu)[0], "mim", "foreach" if default_adamw == "fused" else "fused"))
    for arch, impl, adamw in rows:
        fields = {"model": arch.key, "impl": impl, "mode": "compiled" if compiled else "eager", "adamw": adamw}
        if compiled and run.cpu and not run.args.compile_on_cpu:
            run.recorder.skip(section, "compile is slow on CPU: pass --compile-on-cpu", **fields)
            continue
        left = run.budget.left()
        if left < (60 if compiled and not run.cpu else 5):
            run.recorder.skip(section, "section time cap reached", **fields)
            continue
        limit = min(left, run.args.compile_row_limit) if compiled else left
        with row_guard(run.recorder, section, run.device, limit, **fields):
            result = time_plain(impl, arch, compiled=compiled, adamw=adamw, args=run.args, device=run.device)
            g = run.gflop.get((arch.key, impl))
            rate = rates(result["images_per_s"], g, run.gemm_tflops)
            run.recorder.add(section, **fields, **result, gflop_per_image=g, **rate)


def section_fit(run: Run) -> None:
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    switches = available_switches()
    if missing := [s for s in SWITCHES if s not in switches]:
        print(
            f"  note: PretrainModule / MaskedEncoder / PixelTarget have no switch named {', '.join(missing)}: no rows for them"
        )
    if switches:
        defaults = ", ".join(f"{s.name}={s.default}" for s in switches.values())
        print(f"  switches: {defaults} in the rows without a switch; a row per other value after mae_vit_b16 ddp")
    rows: list[tuple[str, str, str | None, list[str]]] = []
    for key, strategy in run.args.fit_rows:
        rows.append((key, strategy, None, []))
        if (key, strategy) == ("mae_vit_b16", "ddp"):  # the switch rows right after their baseline
            for s in switches.values():
                if s.name == "compile" and run.cpu and not run.args.compile_on_cpu:  # minutes of inductor on 2 cores
                    print("  note: the compile=true fit row is skipped on the CPU (--compile-on-cpu runs it)")
                    continue
                rows += [(key, strategy, f"{s.name}={str(v).lower()}", [s.flag(v, run.cpu)]) for v in s.values()]
    for key, strategy, switch, extra in rows:
        model, fields = FIT_MODELS[key], {"model": key, "strategy": strategy, "switch": switch}
        limit = 2 * run.args.fit_timeout if switch and switch.startswith("compile") else run.args.fit_timeout
        timeout = min(limit, run.budget.left())
        if strategy.startswith("deepspeed") and not has_deepspeed:
            run.recorder.skip("fit", "deepspeed is not installed", **fields)
            continue
        if timeout < 20:
            run.recorder.skip("fit", "section time cap reached", **fields)
            continue
        label = f"{key}_{strategy}" + (f"_{switch.replace('=', '_')}" if switch else "")
        record, why = run_fit(model, strategy, label, extra, run.args, run.out, timeout)
        if record is None:
            run.recorder.skip("fit", why, **fields)
            continue
        rate = rates(record["images_per_s"], record.get("gflop_per_image"), run.gemm_tflops)
        measured = {k: v for k, v in record.items() if k not in run.recorder.env and k != "strategy"}
        analytic = model.analytic if not run.cpu else None
        run.recorder.add("fit", **fields, **measured, analytic_gflop_per_image=analytic, **rate)


def framework_tax(run: Run) -> None:
    """``mim fit`` (ddp, no switch) images/s over the same module's eager plain-loop images/s, per MAE model."""
    for arch in archs(run.cpu):
        ok = [r for r in run.recorder.rows if r["status"] == "ok"]
        plain = [r for r in ok if r["section"] == "plain" and r["model"] == arch.key and r["impl"] == "mim"]
        plain = [r for r in plain if r["adamw"] == plain_adamw()]  # the optimizer mim fit uses by default
        fit = [r for r in ok if r["section"] == "fit" and r["model"] == f"mae_{arch.key}"]
        fit = [r for r in fit if r["strategy"] == "ddp" and not r["switch"]]
        if plain and fit:
            p, f = plain[0]["images_per_s"], fit[0]["images_per_s"]
            run.recorder.add("tax", model=arch.key, plain_images_per_s=p, fit_images_per_s=f, ratio=f / p)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument(
        "--budget", type=float, default=470.0, help="seconds for the whole GPU run (rows past it are skipped)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="plain-loop images per step")
    parser.add_argument("--warmup", type=int, default=10, help="plain-loop steps before the timing")
    parser.add_argument("--steps", type=int, default=30, help="plain-loop timed steps")
    parser.add_argument("--compile-row-limit", type=float, default=150.0, help="seconds per compiled row at most")
    parser.add_argument("--fit-warmup", type=int, default=10, help="mim fit steps before the timing")
    parser.add_argument("--fit-steps", type=int, default=30, help="mim fit timed steps")
    parser.add_argument("--fit-timeout", type=float, default=90.0, help="seconds per mim fit before it is stopped")
    parser.add_argument("--fit-rows", default=None, help="model:strategy,... [all on the GPU; mae_vit_b16:ddp on CPU]")
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument("--flops-batch", type=int, default=8, help="images in the counted fp32 step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="records and logs [$OUT, else a temporary folder]")
    parser.add_argument("--deepspeed-class", default=None, help="class_path replacing the DeepSpeed pieces' strategy")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny models, 32 px, 3 steps on the CPU")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run the compiled rows in a CPU dry run too")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(args.sections) - set(SECTIONS):
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.cpu_dry_run:
        args.batch_size, args.warmup, args.steps = min(args.batch_size, 4), min(args.warmup, 1), min(args.steps, 2)
        args.fit_warmup, args.fit_steps = min(args.fit_warmup, 1), min(args.fit_steps, 2)
        args.gemm_size, args.flops_batch = min(args.gemm_size, 256), min(args.flops_batch, 2)
        args.fit_rows = args.fit_rows or "mae_vit_b16:ddp"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
    rows = [tuple(r.split(":")) for r in args.fit_rows.split(",")] if args.fit_rows else FIT_ROWS
    for row in rows:
        if len(row) != 2 or row[0] not in FIT_MODELS or row[1] not in STRATEGIES:
            parser.error(f"--fit-rows: {':'.join(row)} is not model:strategy of {sorted(FIT_MODELS)} x {STRATEGIES}")
    args.fit_rows = rows
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_mfu_"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_mfu.jsonl").unlink(missing_ok=True)
    env = environment(device)
    run = Run(args, device, out, Recorder(out, env), Budget(args.budget if not args.cpu_dry_run else 1e9))
    print(
        f"gpu_mfu: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), lightning {env['lightning']}; "
        f"sections {','.join(args.sections)}; budget {args.budget:.0f} s; records in {out}",
        flush=True,
    )
    for section in (s for s in SECTIONS if s in args.sections):
        run.budget.start_section(SECTION_CAP_S[section] if not run.cpu else 1e9)
        print(f"\n== {section}", flush=True)
        if section == "gemm":
            section_gemm(run)
        elif section == "flops":
            section_flops(run)
        elif section == "fit":
            section_fit(run)
        else:
            section_loop(run, section)
    framework_tax(run)
    command = "benchmarks/gpu_mfu.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = f"```\n{command}\n```\n\n{tables(run.recorder)}\n"
    (out / "gpu_mfu.md").write_text(report)
    print(f"\n## GPU performance ({env['device']}, torch {env['torch']}, CUDA {env['cuda']})\n\n{report}")
    print(f"total {time.perf_counter() - started:.0f} s; records in {run.recorder.path}", flush=True)
    skipped = [r for r in run.recorder.rows if r["status"] != "ok" and "--compile-on-cpu" not in r["reason"]]
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
