"""The encoder interface: what :class:`~mim.module.PretrainModule`, the targets, export and fine-tuning rely on.

An encoder turns a batch into tokens on a :class:`~mim.types.TokenGrid` and encodes only the visible ones (MAE's
asymmetric encoder: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, §3). Every encoder
returns ``(B, prefix + K, D)``: ``num_prefix_tokens`` rows (cls, registers) followed by the K visible tokens in the
order of ``visible``. Tokens are numbered in raster order over ``grid`` (see :mod:`mim.types`).

Implementations: :class:`~mim.models.encoder.MaskedEncoder` (images and video, any timm ViT) and
:class:`~mim.models.table_encoder.MaskedTableEncoder` (one token per table feature). ``tests/contracts.py`` holds the
``EncoderContract`` every implementation passes.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from mim.types import Batch, TokenGrid

__all__ = ["Encoder", "PoolMode"]

PoolMode = Literal["cls", "avg"]
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


class Encoder(nn.Module, ABC):
    """An encoder over visible tokens.

    Attributes every implementation sets in ``__init__`` (or, for data-dependent encoders, in
    :meth:`configure_data`):
        modality: what the encoder reads: ``image``, ``video`` or ``table`` (downstream code checks it).
        grid: the token grid; N = ``grid.num_tokens``.
        embed_dim: D, the width of the returned tokens.
        num_prefix_tokens: rows before the patch tokens in the output (cls and register tokens).
        num_heads: attention heads of the blocks (predictors default to it).
        depth: number of transformer blocks.
        has_class_token: whether the first prefix row is a class token (``pool(..., "cls")`` needs one).
    """

    modality: Literal["image", "video", "table"]
    grid: TokenGrid
    embed_dim: int
    num_prefix_tokens: int
    num_heads: int
    depth: int
    has_class_token: bool
    embedding_prefixes: ClassVar[tuple[str, ...]] = ()
    """Names (prefixes, relative to the encoder) of the parameters before the first block: layer 0 of :meth:`layer_id`."""
    final_norm_name: ClassVar[str] = "vit.norm"
    """The submodule that normalises the output (replaced by :meth:`drop_final_norm`)."""

    @property
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments that rebuild this encoder (stored in checkpoints and exports)."""

    @property
    def is_configured(self) -> bool:
        """False while the encoder still waits for :meth:`configure_data` (e.g. a table schema)."""
        return True

    def configure_data(self, datamodule: Any) -> None:  # noqa: B027 - optional hook
        """Finish data-dependent construction from the datamodule (called once, before any optimizer exists)."""

    @abstractmethod
    def inputs(self, batch: Batch) -> Tensor:
        """This encoder's input from a batch (images (B, C, H, W), clips (B, C, T, H, W) or table tokens (B, N, D))."""

    @abstractmethod
    def forward(self, inputs: Tensor, visible: Tensor | None = None) -> Tensor:
        """Encode the visible tokens.

        Args:
            inputs: what :meth:`inputs` returned.
            visible: (B, K) int64 token indices, sorted ascending, or None for all N tokens.

        Returns:
            (B, prefix + K, D), final-normed.
        """

    def pool(self, latent: Tensor, mode: PoolMode = "avg") -> Tensor:
        """(B, prefix + K, D) -> (B, D): the cls token (``cls``) or the mean of the patch tokens (``avg``)."""
        if mode == "cls":
            if not self.has_class_token:
                raise ValueError(f"{type(self).__name__}.pool: mode 'cls' needs a model with a class token")
            return latent[:, 0]
        if mode != "avg":
            raise ValueError(f"{type(self).__name__}.pool: mode must be 'cls' or 'avg', got {mode!r}")
        return latent[:, self.num_prefix_tokens :].mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of position embeddings and special tokens."""
        return set()

    def layer_id(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay (facebookresearch/mae util/lr_decay.py).

        0 for the embeddings and prefix tokens, ``i + 1`` for block ``i``, ``depth + 1`` for what follows the blocks.

        Args:
            name: a parameter name relative to this encoder.
        """
        block = _BLOCK.search(name)
        if block is not None:
            return int(block.group(1)) + 1
        return 0 if name.startswith(self.embedding_prefixes) else self.depth + 1

    def drop_final_norm(self) -> nn.Module:
        """Replace the final norm by the identity and return it.

        MAE's fine-tuning with global average pooling deletes the pretrained final norm and normalises the pooled
        features with a new ``fc_norm`` instead (facebookresearch/mae models_vit.py).
        """
        parent_name, _, attr = self.final_norm_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        norm = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        return norm
