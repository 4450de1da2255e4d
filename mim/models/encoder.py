"""An encoder over visible tokens, wrapping any timm ``VisionTransformer``.

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022) encodes only the
visible patches: patch-embed every patch, add the fixed 2-D sin-cos position embedding, keep the
visible tokens, prepend the prefix tokens (cls, registers) and run the transformer blocks.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterable
from typing import Any, Literal

import timm
import torch
import torch.utils.checkpoint
from timm.models import VisionTransformer
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range, invalid
from mim.models.base import Encoder
from mim.models.crate import CrateBlock
from mim.models.embed import (
    TubeletEmbed,
    patchify,
    patchify_3d,
    sincos_for_grid,
    unpatchify,
    unpatchify_3d,
    xavier_uniform_flat_,
)
from mim.tokens import gather_tokens
from mim.types import Batch, TokenGrid

__all__ = ["MaskedEncoder", "check_timm_name", "init_mae_weights_", "timm_name_suggestions"]

# timm modules whose models are VisionTransformer s (what MaskedEncoder wraps): the first place to look for a typo
_VIT_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid")
_VIT_PATTERNS = ("vit_*", "deit*", "eva*", "beit*")  # further ViT-like names, suggested after those


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so a config equals its JSON round trip (checkpoints and exports store JSON)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def timm_name_suggestions(name: str, *, n: int = 3, pretrained: bool = False) -> list[str]:
    """Up to ``n`` timm names close to ``name`` (:func:`difflib.get_close_matches`), ViTs first.

    Args:
        name: the unknown name (a ``.tag`` suffix is matched against pretrained tags when ``pretrained``).
        n: how many suggestions at most.
        pretrained: suggest names with pretrained weights (``vit_base_patch16_224.mae``) instead of architectures.

    Returns:
        Close names from the ViT family (timm's ``vision_transformer``, ``deit`` and hybrid modules, then
        ``vit_*``, ``deit*``, ``eva*``, ``beit*``), else from every timm model; possibly empty.
    """
    if pretrained:
        arch = name.split(".")[0]
        tagged = timm.list_pretrained(f"{arch}.*") if timm.is_model(arch) else []
        if tagged:  # the architecture exists: suggest its tags
            return difflib.get_close_matches(name, tagged, n=n, cutoff=0.0)
        families = [timm.list_pretrained(list(_VIT_PATTERNS)), timm.list_pretrained()]
    else:
        name = name.split(".")[0]
        families = [
            timm.list_models(module=list(_VIT_MODULES)),
            timm.list_models(list(_VIT_PATTERNS)),
            timm.list_models(),
        ]
    found: list[str] = []
    for names in families:
        for match in difflib.get_close_matches(name, names, n=n, cutoff=0.75 if not found else 0.8):
            if match not in found:
                found.append(match)
        if len(found) >= n:
            break
    if not found:  # nothing close: the best of every model, at a lower bar
        found = difflib.get_close_matches(name, families[-1], n=n, cutoff=0.5)
    return found[:n]


def check_timm_name(owner: str, field: str, name: Any, *, pretrained: bool = False) -> str:
    """``name`` when timm knows it, else ``ValueError`` naming ``owner.field`` with close ViT names.

    Args:
        owner: the class (or command) that takes the name, for the message.
        field: the argument, e.g. ``"arch"``.
        name: a timm model name, e.g. ``vit_base_patch16_224``; with ``pretrained``, also ``name.tag`` (checked
            against timm's pretrained tags) or a ``hf-hub:`` / ``local-dir:`` source (not checked: timm reads it).
        pretrained: the name is loaded with pretrained weights (``mim finetune --checkpoint timm:NAME``).

    Returns:
        ``name``.

    Raises:
        ValueError: e.g. ``MaskedEncoder.arch must be a timm model name (did you mean 'vit_tiny_patch16_224'?),
            got 'vit_tinyy_patch16_224'; list them with timm.list_models('vit_*')``.
    """
    if not isinstance(name, str) or not name:
        raise invalid(owner, field, "a timm model name such as 'vit_base_patch16_224'", name)
    if pretrained and name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return name
    arch, _, tag = name.partition(".")
    known = timm.is_model(arch)
    if known and not (pretrained and tag and name not in timm.list_pretrained(f"{arch}.*")):
        return name
    kind = "a timm model name with pretrained weights" if pretrained and known else "a timm model name"
    close = timm_name_suggestions(name, pretrained=pretrained)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no similar name in timm"
    listing = f"timm.list_pretrained('{arch}.*')" if pretrained and known else "timm.list_models('vit_*')"
    raise ValueError(f"{owner}.{field} must be {kind} ({hint}), got {name!r}; list them with {listing}")


def create_token_vit(owner: str, arch: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """``timm.create_model(arch, num_classes=0, ...)`` whose final norm normalises every token.

    A timm ViT with global average pooling (``global_pool='avg'``, e.g. ``vit_base_patch16_gap_224``) normalises the
    *pooled* feature (``fc_norm``) and leaves ``norm`` the identity, so an encoder that returns tokens would return
    them unnormalised and ``fc_norm`` would never get a gradient (DDP refuses such unused parameters). Unless
    ``model_kwargs`` sets ``fc_norm``, such a model is built with ``fc_norm=False`` (the norm on every token; recorded
    in ``kwargs``, so exports rebuild the same timm model); an explicit ``fc_norm=True`` is refused.

    Args:
        owner: the encoder class, for messages.
        arch: the timm name.
        kwargs: ``model_kwargs`` (updated in place with ``fc_norm=False`` when that is applied).
        **extra: further ``create_model`` arguments (``in_chans``, ``drop_path_rate``).
    """
    try:
        vit = timm.create_model(arch, pretrained=False, num_classes=0, **extra, **kwargs)
    except ValueError as e:
        raise ValueError(f"{owner}: timm could not build {arch!r} with {kwargs}: {e}") from e
    pooled_norm = not isinstance(getattr(vit, "fc_norm", nn.Identity()), nn.Identity)
    if pooled_norm and isinstance(getattr(vit, "norm", None), nn.Identity):
        if kwargs.get("fc_norm") is not None:
            raise ValueError(
                f"{owner}.model_kwargs: fc_norm={kwargs['fc_norm']!r} puts {arch!r}'s final norm after the pooling, "
                "which an encoder of tokens never applies (it would get no gradient); leave fc_norm unset or false"
            )
        kwargs["fc_norm"] = False
        vit = timm.create_model(arch, pretrained=False, num_classes=0, **extra, **kwargs)
    return vit


def init_mae_weights_(module: nn.Module) -> None:
    """MAE initialisation of Linear and LayerNorm layers (facebookresearch/mae models_mae.py ``_init_weights``).

    Every ``nn.Linear`` (the fused qkv included, as one (3D, D) matrix) gets Xavier-uniform weights and
    zero bias; every LayerNorm weight 1, bias 0. Applied recursively.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskedEncoder(Encoder):
    """A timm ViT that encodes only the visible tokens.

    The wrapped model lives in ``self.vit`` with timm's own parameter names, so its state dict (minus the
    ``vit.`` prefix) loads strictly into ``timm.create_model(arch, num_classes=0, ...)``.

    Args:
        arch: any timm VisionTransformer name, e.g. ``vit_base_patch16_224``.
        img_size: input size (int or (H, W)); default: the architecture's.
        patch_size: patch size (int or (ph, pw)); default: the architecture's.
        in_chans: input channels.
        drop_path_rate: stochastic depth (0 in MAE pretraining).
        init: ``mae`` (Xavier-uniform linears, normal(0.02) tokens, as MAE) or ``timm`` (timm's default).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``depth``, ``embed_dim``).
        num_frames: frames per clip; > 1 makes this a video encoder (input ``batch["video"]`` (B, C, T, H, W),
            3-D tubelet embedding, fixed 3-D sin-cos position embedding, grid (T/tubelet, H/p, W/p)).
        tubelet_size: frames per tubelet (VideoMAE: 2); ``num_frames`` must be a multiple.
        positions: ``sincos`` adds the fixed sin-cos table to every patch token (MAE); ``none`` adds nothing, so the
            patch tokens carry no position at all (MP3's position prediction, :class:`~mim.targets.PositionTarget`).
            The frozen table stays in the state dict either way, so exports and fine-tuning load as before (a
            fine-tuning recipe that wants positions back gives its own ``encoder`` with ``positions: sincos``).
        block: ``vit`` (timm's blocks) or ``crate``: white-box CRATE layers (MSSA + one ISTA step,
            :class:`~mim.models.crate.CrateBlock`, released step size 0.1 and lambda 0.5) of the same width and heads,
            built by timm through ``block_fn`` (CRATE-MAE, Pai et al., ICLR 2024). Such an encoder has no plain timm
            equivalent (``timm_state_dict`` refuses it).
    """

    embedding_prefixes = ("vit.cls_token", "vit.reg_token", "vit.pos_embed", "vit.patch_embed", "vit.norm_pre")

    def __init__(
        self,
        *,
        arch: str = "vit_base_patch16_224",
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        init: Literal["mae", "timm"] = "mae",
        model_kwargs: dict[str, Any] | None = None,
        num_frames: int = 1,
        tubelet_size: int = 1,
        positions: Literal["sincos", "none"] = "sincos",
        block: Literal["vit", "crate"] = "vit",
    ) -> None:
        super().__init__()
        owner = "MaskedEncoder"
        check_choice(owner, "positions", positions, ("sincos", "none"))
        check_choice(owner, "block", block, ("vit", "crate"))
        check_int(owner, "num_frames", num_frames)
        check_int(owner, "tubelet_size", tubelet_size)
        if num_frames % tubelet_size:
            raise invalid(owner, "num_frames", f"a multiple of tubelet_size={tubelet_size}", num_frames)
        if num_frames == 1 and tubelet_size != 1:
            raise invalid(owner, "tubelet_size", "1 for images (num_frames=1)", tubelet_size)
        check_timm_name(owner, "arch", arch)
        check_int(owner, "in_chans", in_chans)
        check_range(owner, "drop_path_rate", drop_path_rate, 0, 1, high_open=True)
        check_choice(owner, "init", init, ("mae", "timm"))
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        pretrained_cfg = timm.get_pretrained_cfg(arch)
        default_size = pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 224
        cfg_img = _pair(kwargs.get("img_size", default_size))
        if patch_size is not None:
            ph, pw = _pair(patch_size)
            if cfg_img[0] % ph or cfg_img[1] % pw:
                raise ValueError(
                    f"MaskedEncoder.img_size {cfg_img} is not divisible by MaskedEncoder.patch_size {(ph, pw)}; "
                    "choose an image size that is a multiple of the patch size"
                )
        try:
            block_fn = {"block_fn": CrateBlock} if block == "crate" else {}
            vit = create_token_vit(
                "MaskedEncoder", arch, kwargs, in_chans=in_chans, drop_path_rate=drop_path_rate, **block_fn
            )
        except (TypeError, AssertionError) as e:
            raise ValueError(f"MaskedEncoder: timm could not build {arch!r} with {kwargs}: {e}") from e
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"MaskedEncoder.arch: {arch!r} is a {type(vit).__name__}, not a timm VisionTransformer")
        if vit.pos_embed is None:
            raise ValueError(f"MaskedEncoder.arch: {arch!r} has no absolute position embedding (pos_embed=None)")
        if vit.dynamic_img_size:
            raise ValueError("MaskedEncoder: dynamic_img_size is not supported; set a fixed img_size")
        gh, gw = vit.patch_embed.grid_size
        ph, pw = vit.patch_embed.patch_size
        ih, iw = vit.patch_embed.img_size
        if ih % ph or iw % pw:
            raise ValueError(
                f"MaskedEncoder.img_size {(ih, iw)} is not divisible by MaskedEncoder.patch_size {(ph, pw)}"
            )

        self.vit = vit
        self.arch = arch
        self.in_chans = in_chans
        self.img_size: tuple[int, int] = (ih, iw)
        self.patch_size: tuple[int, int] = (ph, pw)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.is_video = num_frames > 1
        self.modality: Literal["image", "video", "table"] = "video" if self.is_video else "image"
        self.input_key = self.modality  # the batch entry it reads
        self.grid = TokenGrid(num_frames // tubelet_size, gh, gw)
        self.embed_dim: int = vit.embed_dim
        self.patch_dim = tubelet_size * ph * pw * in_chans  # P: values per patch / tubelet
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_heads: int = int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 1  # type: ignore[union-attr, arg-type]
        self.depth: int = len(vit.blocks)
        self.has_class_token: bool = vit.cls_token is not None
        self._config = {
            "arch": arch,
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "in_chans": in_chans,
            "drop_path_rate": drop_path_rate,
            "init": init,
            "model_kwargs": _plain(kwargs),
            "num_frames": num_frames,
            "tubelet_size": tubelet_size,
        }
        self.positions: Literal["sincos", "none"] = positions
        if positions != "sincos":  # recorded only when set, so every existing config stays as it was
            self._config["positions"] = positions
        self.block: Literal["vit", "crate"] = block
        if block != "vit":  # likewise
            self._config["block"] = block
        # Rows of pos_embed for prefix tokens (timm's default ViT has one for cls; "no_embed_class" has none).
        self._pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        if self.is_video:
            # Replace timm's 2-D patch embedding and its (1, prefix + H*W, D) table with 3-D versions.
            vit.patch_embed = TubeletEmbed(in_chans=in_chans, dim=self.embed_dim, tubelet=(tubelet_size, ph, pw))
            rows = self._pos_prefix + self.grid.num_tokens
            vit.pos_embed = nn.Parameter(torch.zeros(1, rows, self.embed_dim), requires_grad=False)
        self._init_weights(init)
        # Block outputs requested by targets (capture_blocks); empty: the plain forward below.
        self._capture: tuple[int, ...] = ()
        self.block_outputs: dict[int, Tensor] = {}
        self._captured_for: weakref.ref[Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and deep copies (EMA teachers) drop the kept block outputs: activations are not state."""
        state = self.__dict__.copy()
        state["block_outputs"], state["_captured_for"] = {}, None
        return state

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this encoder (stored in checkpoints and exports)."""
        return self._config

    @torch.no_grad()
    def _init_weights(self, init: str) -> None:
        vit = self.vit
        # Fixed 2-D sin-cos table, zero rows for prefix tokens; kept as a frozen parameter so it is in
        # the state dict under timm's name (as MAE's ``requires_grad=False`` pos_embed in models_mae.py).
        table = sincos_for_grid(self.embed_dim, self.grid, self._pos_prefix)  # (prefix+N, D)
        self.pos_embed.copy_(table.unsqueeze(0))
        self.pos_embed.requires_grad_(False)
        if init == "mae":
            init_mae_weights_(vit)
            xavier_uniform_flat_(vit.patch_embed.proj.weight)  # as a (D, C*p*p) (or (D, C*pt*p*p)) matrix
            for token in (vit.cls_token, vit.reg_token):
                if token is not None:
                    nn.init.normal_(token, std=0.02)

    @property
    def pos_embed(self) -> nn.Parameter:
        """The wrapped ViT's (frozen, sin-cos) position table, (1, prefix rows + N, D)."""
        pos = self.vit.pos_embed
        assert pos is not None  # checked at construction
        return pos

    def inputs(self, batch: Batch) -> Tensor:
        """This encoder's input from a batch: ``image`` (B, C, H, W), or ``video`` (B, C, T, H, W)."""
        if self.input_key not in batch:
            raise KeyError(f"the encoder reads batch[{self.input_key!r}] but the batch has keys {sorted(batch)}")
        return batch[self.input_key]  # type: ignore[literal-required]

    # ------------------------------------------------------------------ tokens
    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) or (B, C, T, H, W) -> (B, N, P) in the MAE patch (or tubelet) layout."""
        if self.is_video:
            return patchify_3d(images, (self.tubelet_size, *self.patch_size))
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, P) -> (B, C, H, W) or (B, C, T, H, W)."""
        if self.is_video:
            return unpatchify_3d(patches, (self.tubelet_size, *self.patch_size), self.grid, self.in_chans)
        return unpatchify(patches, self.patch_size, (self.grid.h, self.grid.w), self.in_chans)

    def tokenize(self, images: Tensor) -> Tensor:
        """Patch-embed every patch and add its position embedding (none with ``positions="none"``).

        Args:
            images: (B, C, H, W) normalised, or (B, C, T, H, W) clips for a video encoder.

        Returns:
            (B, N, D).
        """
        expected = (self.num_frames, *self.img_size) if self.is_video else self.img_size
        if tuple(images.shape[2:]) != expected:
            kind = "clips of (T, H, W)" if self.is_video else "images of size"
            raise ValueError(f"MaskedEncoder expects {kind} {expected}, got {tuple(images.shape[2:])}")
        weight = self.vit.patch_embed.proj.weight
        if weight.dtype in (torch.bfloat16, torch.float16) and images.dtype != weight.dtype:
            # A model cast to half precision (DeepSpeed bf16, Lightning's "bf16-true") gets images normalised in fp32
            # on the device: cast them like the weights. Under autocast the weights stay fp32 and nothing changes.
            images = images.to(weight.dtype)
        x = self.vit.patch_embed(images)  # (B, N, D)
        if self.positions == "none":
            return x  # (B, N, D): content only
        return x + self.pos_embed[:, self._pos_prefix :]  # (B, N, D)

    def prefix_tokens(self, batch_size: int) -> Tensor:
        """(B, num_prefix_tokens, D): cls and register tokens with their position rows."""
        vit = self.vit
        parts: list[Tensor] = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
        if not parts:
            return self.pos_embed.new_zeros(batch_size, 0, self.embed_dim)
        prefix = torch.cat(parts, dim=1)  # (1, prefix, D)
        if self._pos_prefix:
            prefix = prefix + self.pos_embed[:, : self._pos_prefix]
        return prefix.expand(batch_size, -1, -1)  # (B, prefix, D)

    # ------------------------------------------------------------------ forward
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Run prefix + blocks + final norm over already-embedded tokens.

        Args:
            tokens: (B, K, D) patch tokens with position embedding.

        Returns:
            (B, prefix + K, D).
        """
        vit = self.vit
        x = torch.cat([self.prefix_tokens(tokens.shape[0]), tokens], dim=1)  # (B, prefix+K, D)
        x = vit.norm_pre(x)
        if self._capture:
            return self._encode_capturing(x)
        if vit.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)  # (B, prefix+K, D)

    def _encode_capturing(self, x: Tensor) -> Tensor:
        """Blocks one by one, keeping the requested block outputs (with autograd) in ``block_outputs``."""
        vit = self.vit
        checkpointing = vit.grad_checkpointing and torch.is_grad_enabled()
        outputs: dict[int, Tensor] = {}
        for i, block in enumerate(vit.blocks):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in self._capture:
                outputs[i] = x  # (B, prefix+K, D) before the final norm
        out = vit.norm(x)  # (B, prefix+K, D)
        self.block_outputs = outputs
        self._captured_for = weakref.ref(out)
        return out

    def capture_blocks(self, indices: Iterable[int]) -> None:
        """From now on, keep the outputs of these blocks (before the final norm) of every forward pass.

        MaskAlign aligns every student block's output (OpenDriveLab/maskalign models_pretrain.py); the module runs
        one encoder pass per step and hands targets only the final latent, so a target requests the blocks it
        needs here (in its ``bind``) and reads them with :meth:`captured_blocks`. Requests from several targets
        are merged. Without any request the forward pass is unchanged.

        Args:
            indices: block indices, 0-based; negative ones count from the last block.
        """
        depth = len(self.vit.blocks)
        wanted = set(self._capture)
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"MaskedEncoder.capture_blocks: block index {i} is out of range for {depth} blocks")
            wanted.add(i % depth)
        self._capture = tuple(sorted(wanted))

    def captured_blocks(self, latent: Tensor) -> dict[int, Tensor]:
        """The block outputs kept by the forward pass that returned ``latent``.

        Args:
            latent: (B, prefix + K, D), the output of that forward pass (checked by identity, so outputs of another
                pass are never mistaken for this one's).

        Returns:
            block index -> (B, prefix + K, D) output before the final norm, for every index passed to
            :meth:`capture_blocks`.
        """
        if not self._capture:
            raise RuntimeError(
                "MaskedEncoder.captured_blocks: no blocks requested; call encoder.capture_blocks(...) first"
            )
        if self._captured_for is None or self._captured_for() is not latent:
            raise RuntimeError(
                "MaskedEncoder.captured_blocks: the kept block outputs belong to another forward pass than this latent "
                "(pass the latent the encoder returned in this step)"
            )
        return self.block_outputs

    def forward(self, images: Tensor, visible: Tensor | None = None) -> Tensor:
        """Encode the visible tokens.

        Args:
            images: (B, C, H, W) normalised.
            visible: (B, K) int64 token indices, or None for all N tokens (raster order).

        Returns:
            (B, prefix + K, D), final-normed; the first ``num_prefix_tokens`` rows are cls/registers.
        """
        tokens = self.tokenize(images)  # (B, N, D)
        if visible is not None:
            tokens = gather_tokens(tokens, visible)  # (B, K, D)
        return self.encode_tokens(tokens)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of position embeddings and special tokens."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()} | {"vit.reg_token"}

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under timm's names (loads strictly into ``num_classes=0``; images only)."""
        if self.is_video:
            raise ValueError("a video encoder (3-D tubelet embedding) has no timm image-model equivalent")
        if self.block != "vit":
            raise ValueError(f"an encoder of {self.block!r} blocks has no plain timm equivalent")
        return {k.removeprefix("vit."): v for k, v in self.state_dict().items()}
