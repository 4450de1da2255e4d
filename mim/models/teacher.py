"""A frozen timm teacher built from a local weights file, and the features MaskAlign / MR-MAE read from it.

MaskAlign (Xue et al., "Stare at What You See: Masked Image Modeling without Reconstruction", CVPR 2023; official
OpenDriveLab/maskalign models_pretrain.py) and MR-MAE (Gao et al., "Mimic before Reconstruct", IJCV 2023, arXiv
2303.05475) give a frozen teacher the **full** image and read its per-block token features: the outputs of
transformer blocks ``1 .. L`` *before* the final norm (``hidden_states[1:]``), plus, for attention-guided masking,
the last block's CLS-to-patch attention averaged over heads.

Weights come only from a local file, never from a download at run time: a timm / torch state dict (``.pt``,
``.pth``, ``.bin``), a ``.safetensors`` state dict, an encoder written by ``mim export`` (mim/export.py) or a mim
Lightning checkpoint. The architecture's own timm conversion is applied, the classifier is dropped and the rest
loads **strictly**. The recorded hash does not depend on the container format. Accepted layouts, the conversion
and the hash: docs/design.md, "Teacher targets".
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from mim.models.encoder import check_timm_name

__all__ = ["FrozenTeacher", "TeacherOutput", "encoder_timm_kwargs", "read_weights", "weights_sha256"]

MIM_EXPORT_FORMAT = "mim-encoder/1"
"""``format`` field of files written by :func:`mim.export.export_encoder`."""


def encoder_timm_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments (besides ``num_classes=0``) that rebuild a MaskedEncoder's ViT.

    Args:
        config: ``MaskedEncoder.config`` (as a checkpoint's ``checkpoint["mim"]["encoder"]`` records it).
    """
    kwargs = dict(config.get("model_kwargs") or {})
    kwargs.update(
        img_size=list(config["img_size"]), patch_size=list(config["patch_size"]), in_chans=int(config["in_chans"])
    )
    return kwargs


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a loaded torch checkpoint (bare, ``state_dict`` or ``model``)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"teacher weights {path}: expected a state dict (a dict of tensors, bare or under 'state_dict' / "
            f"'model'), got {type(obj).__name__}"
        )
    return obj


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a weights file (on CPU) into a flat state dict.

    Args:
        path: ``.safetensors``, or a torch file (``.pt``/``.pth``/``.bin``/``.ckpt``): a state dict, a dict holding
            one under ``state_dict`` or ``model``, a ``mim export`` file, or a mim Lightning checkpoint.

    Returns:
        (state dict with DDP / ``encoder.vit.`` prefixes removed, metadata or None). The metadata of a ``mim export``
        file or a mim checkpoint is ``{"arch", "timm_kwargs", "encoder", ...}``: the timm name and
        ``create_model`` arguments that rebuild the model, and the ``MaskedEncoder`` config.

    Raises:
        FileNotFoundError: the file does not exist (the message says how teachers are provided).
        ValueError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher weights file not found: {path}. mim never downloads teachers: write the weights to a local "
            "file first (a timm/torch state dict, .safetensors, or `mim export CKPT OUT` of a mim run) and point "
            "teacher_checkpoint at it"
        )
    meta: dict[str, Any] | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "mim" in header:
            meta = json.loads(header["mim"])
        state = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"teacher weights {path}: torch.load(weights_only=True) failed: {e}") from e
        mim = obj.get("mim") if isinstance(obj, dict) else None
        if isinstance(mim, dict) and "arch" in mim:  # a mim export
            meta = mim
        elif isinstance(mim, dict) and isinstance(mim.get("encoder"), dict) and "arch" in mim["encoder"]:
            config = mim["encoder"]  # a mim Lightning checkpoint
            meta = {"arch": config["arch"], "timm_kwargs": encoder_timm_kwargs(config), "encoder": config}
        state = _unwrap(obj, path)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.vit.") for k in state):  # a mim Lightning checkpoint: the student encoder
        state = {k.removeprefix("encoder.vit."): v for k, v in state.items() if k.startswith("encoder.vit.")}
    return state, meta


def weights_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted key order (a host-side, one-off cost)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _allocate(arch: str, kwargs: dict[str, Any]) -> Any:
    """The architecture on CPU without running timm's weight init (every tensor is overwritten by the file).

    Built on the meta device and allocated with ``to_empty`` (seconds faster for a ViT-B); models with
    non-persistent buffers (computed at construction, absent from the file, e.g. rotary tables) are built normally.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except Exception:  # noqa: BLE001 - a config error, or code that cannot run on meta: build normally (raises again)
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return model.to_empty(device="cpu")


@dataclass
class TeacherOutput:
    """What one teacher pass over the full input yields.

    Attributes:
        features: block index -> (B, prefix_t + N, D_t) block output before the final norm.
        cls_attention: (B, N) last block's CLS-to-patch attention, mean over heads; None unless asked for.
    """

    features: dict[int, Tensor]
    cls_attention: Tensor | None = None


class FrozenTeacher(nn.Module):
    """A frozen timm ViT-family model (``forward_intermediates``) with lazily loaded weights.

    The architecture is allocated at construction (CPU, uninitialised: never used before :meth:`load`); the weights
    are read from ``checkpoint`` on the first :meth:`load` (or first forward), so configs that name a file can be
    built where the file is absent.
    Parameters never require gradients and the model stays in eval mode (``train()`` is a no-op).

    Args:
        arch: timm model name (e.g. ``vit_base_patch16_clip_224``).
        checkpoint: path of the local weights file (see the module docstring).
        model_kwargs: extra ``timm.create_model`` keyword arguments (``img_size``, ``depth``, ...).
    """

    model: Any  # the timm model (typed loosely: any ViT-family class with forward_intermediates)

    def __init__(self, *, arch: str, checkpoint: str | Path, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_timm_name("FrozenTeacher", "arch", arch)
        kwargs = dict(model_kwargs or {})
        try:
            model = _allocate(arch, kwargs)
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"teacher_arch: timm could not build {arch!r} with {kwargs}: {e}") from e
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise ValueError(
                f"teacher_arch: {arch!r} ({type(model).__name__}) has no token-level forward_intermediates / blocks; "
                "use a timm ViT-family model (VisionTransformer, Eva, ...)"
            )
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            raise ValueError(f"teacher_arch: {arch!r} has no fixed patch grid (patch_embed.grid_size)")
        self.model = model.requires_grad_(False).eval()
        self.arch, self.checkpoint, self.model_kwargs = arch, str(checkpoint), kwargs
        self.grid_size: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.img_size: tuple[int, int] = (int(model.patch_embed.img_size[0]), int(model.patch_embed.img_size[1]))
        self.in_chans: int = int(model.patch_embed.proj.in_channels)
        self.depth: int = len(model.blocks)
        self.embed_dim: int = int(model.embed_dim)
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        self.has_class_token: bool = getattr(model, "cls_token", None) is not None
        self.sha256: str | None = None
        self.eval()

    # ------------------------------------------------------------------ weights
    @property
    def loaded(self) -> bool:
        return self.sha256 is not None

    def load(self) -> str:
        """Load the weights file strictly into the (already placed) model once; returns the weights' SHA-256."""
        if self.sha256 is not None:
            return self.sha256
        path = Path(self.checkpoint)
        state, _ = read_weights(path)
        filter_fn = getattr(sys.modules.get(type(self.model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's own format conversion (OpenAI CLIP, pos-embed grid resampling, ...)
            state = filter_fn(state, self.model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # num_classes=0: no classifier
        expected = set(self.model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"teacher weights {path} do not match timm {self.arch!r} with {self.model_kwargs}: "
                f"missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}, unexpected keys "
                f"{unexpected[:12]}{' ...' if len(unexpected) > 12 else ''} (set teacher_kwargs to the "
                "architecture the file was saved from)"
            )
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"teacher weights {path} do not fit timm {self.arch!r} with {self.model_kwargs}: {e}"
            ) from e
        self.sha256 = weights_sha256(state)
        return self.sha256

    def train(self, mode: bool = True) -> FrozenTeacher:
        """A frozen teacher always stays in eval mode (no dropout, no drop-path)."""
        return super().train(False)

    # ------------------------------------------------------------------ forward
    def check_attention(self) -> None:
        """Raise unless the CLS attention of the last block can be recomputed (timm ``Attention`` + a cls token)."""
        attn = getattr(self.model.blocks[-1], "attn", None)
        if not isinstance(attn, Attention) or not hasattr(self.model.blocks[-1], "norm1"):
            raise ValueError(
                f"attention scores need a teacher whose last block uses timm's standard Attention (qkv, no rope); "
                f"{self.arch!r} has {type(attn).__name__}"
            )
        if not self.has_class_token:
            raise ValueError(f"attention scores need a teacher with a class token; {self.arch!r} has none")

    def cls_attention(self, x: Tensor) -> Tensor:
        """The last block's CLS-to-patch attention, mean over heads, recomputed from its input.

        Fused attention (SDPA) returns no weights, so the softmax row of the CLS query is computed from timm's
        ``qkv`` projection (only the CLS query and all keys: about 2/3 of one qkv matmul in one block).

        Args:
            x: (B, prefix_t + N, D_t) input of the last block.

        Returns:
            (B, N) attention weights over patch tokens (rows sum to 1 minus the prefix share).
        """
        block = self.model.blocks[-1]
        attn: Attention = block.attn
        b, length, d = x.shape
        h = block.norm1(x)  # (B, L, D)
        w, bias = attn.qkv.weight, attn.qkv.bias
        a = attn.attn_dim
        q = F.linear(h[:, :1], w[:a], None if bias is None else bias[:a])  # (B, 1, A) the CLS query
        k = F.linear(h, w[a : 2 * a], None if bias is None else bias[a : 2 * a])  # (B, L, A)
        q = attn.q_norm(q.reshape(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2))  # (B, Hd, 1, hd)
        k = attn.k_norm(k.reshape(b, length, attn.num_heads, attn.head_dim).transpose(1, 2))  # (B, Hd, L, hd)
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, Hd, 1, L)
        weights = logits.softmax(dim=-1)[:, :, 0, self.num_prefix_tokens :]  # (B, Hd, N)
        return weights.mean(dim=1)  # (B, N)

    def _prepare(self, images: Tensor) -> Tensor:
        """Load the weights (once), follow the input's device and fit it to the teacher's channels and size.

        Args:
            images: (B, C, H, W) already in the teacher's normalisation.

        Returns:
            (B, C_t, H_t, W_t) in the teacher's dtype.
        """
        self.load()
        param = next(self.model.parameters())
        if param.device != images.device:  # a wrapper moved only registered modules (e.g. FSDP): follow the input
            self.model.to(images.device)
        x = images.to(dtype=param.dtype)
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(f"the teacher expects {self.in_chans} input channels, got {x.shape[1]}")
            x = x.expand(-1, self.in_chans, -1, -1)  # (B, C_t, H, W) grey -> C_t channels
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)  # (B, C_t, H_t, W_t)
        return x

    @torch.no_grad()
    def final_features(self, images: Tensor) -> Tensor:
        """The final-normed output of the full input (timm ``forward_features``: the last block's output after the
        model's final norm, prefix tokens first; Hugging Face ViTMAE's ``last_hidden_state`` without masking), under
        ``no_grad``. Self-distillation reads its CLS row (mim/targets/self_distill.py).

        Args:
            images: (B, C, H, W) as for :meth:`forward`.

        Returns:
            (B, prefix_t + N, D_t).
        """
        return self.model.forward_features(self._prepare(images))  # (B, prefix_t + N, D_t)

    @torch.no_grad()
    def forward(self, images: Tensor, layers: Sequence[int], *, attention: bool = False) -> TeacherOutput:
        """Block outputs of the full input (and the CLS attention), under ``no_grad``.

        Args:
            images: (B, C, H, W) already in the teacher's normalisation; resized (bicubic) to the teacher's input
                size when it differs; a 1-channel input is repeated for a 3-channel teacher.
            layers: block indices (0-based; negative from the end) whose outputs to return.
            attention: also return the last block's CLS-to-patch attention.

        Returns:
            :class:`TeacherOutput` with ``features[i]`` (B, prefix_t + N, D_t) for each requested ``i``.
        """
        x = self._prepare(images)  # (B, C_t, H_t, W_t)
        take = sorted({i % self.depth for i in layers})
        captured: list[Tensor] = []
        hook = None
        if attention:
            hook = self.model.blocks[-1].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            out = self.model.forward_intermediates(
                x,
                indices=take,
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
                stop_early=not attention,
            )
        finally:
            if hook is not None:
                hook.remove()
        feats: dict[int, Tensor] = {}
        for i, y in zip(take, out):
            if isinstance(y, tuple):  # (patch tokens, prefix tokens)
                y = torch.cat([y[1], y[0]], dim=1)  # (B, prefix_t + N, D_t)
            feats[i] = y
        attn = self.cls_attention(captured[-1]) if attention else None  # (B, N)
        return TeacherOutput(features=feats, cls_attention=attn)
