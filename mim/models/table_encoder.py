"""An encoder over visible *features* of a table row, built from a timm ViT's transformer blocks.

Each feature is one token (FT-Transformer tokenizer, :class:`mim.models.tabular.FeatureTokenizer`), so a row of
F features is the token grid (1, 1, F) and every masking strategy and target works on tables unchanged. Feature
identity is carried by each feature's own tokenizer weights, so the encoder adds no position embedding (as
FT-Transformer); decoders and predictors add their own fixed tables over the feature index.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from timm.models import VisionTransformer
from torch import Tensor, nn

from mim.checks import check_choice
from mim.models.base import Encoder
from mim.models.encoder import check_timm_name, create_token_vit, init_mae_weights_
from mim.models.tabular import FeatureTokenizer
from mim.tokens import gather_tokens
from mim.types import Batch, TokenGrid

__all__ = ["MaskedTableEncoder", "TableSchema"]


class TableSchema(Protocol):
    """What the encoder needs to know about a table (``mim.data.TableDataModule`` provides it)."""

    @property
    def num_numeric(self) -> int: ...

    @property
    def category_cardinalities(self) -> list[int]: ...


class MaskedTableEncoder(Encoder):
    """Feature tokenizer + the transformer blocks of any timm ViT, encoding only the visible features.

    The table's schema (numeric count, category table sizes) comes from the constructor or, when those are None,
    from the datamodule at ``configure_data`` (``PretrainModule`` calls it before the optimizer exists), so a
    recipe does not repeat what the data already says.

    Args:
        arch: timm VisionTransformer name whose blocks, prefix token and final norm are used.
        num_numeric: Fn, or None to take it from the datamodule.
        category_cardinalities: table sizes (with the 0 = missing slot), or None to take them from the datamodule.
        init: ``mae`` (Xavier-uniform linears, as MAE) or ``timm``.
        model_kwargs: extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads`` ...).
    """

    modality = "table"
    embedding_prefixes = ("vit.cls_token", "vit.reg_token", "vit.norm_pre", "tokenizer")

    def __init__(
        self,
        *,
        arch: str = "vit_tiny_patch16_224",
        num_numeric: int | None = None,
        category_cardinalities: list[int] | None = None,
        init: Literal["mae", "timm"] = "mae",
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_timm_name("MaskedTableEncoder", "arch", arch)
        check_choice("MaskedTableEncoder", "init", init, ("mae", "timm"))
        kwargs = dict(model_kwargs or {})
        vit = create_token_vit("MaskedTableEncoder", arch, kwargs)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(
                f"MaskedTableEncoder.arch: {arch!r} is a {type(vit).__name__}, not a timm VisionTransformer"
            )
        # Only the blocks, prefix tokens and norms are used: drop the image parts so they hold no parameters.
        vit.patch_embed = nn.Identity()  # type: ignore[assignment]
        vit.pos_embed = None
        self.vit = vit
        self.arch, self.init = arch, init
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_heads: int = int(vit.blocks[0].attn.num_heads) if len(vit.blocks) else 1  # type: ignore[union-attr, arg-type]
        self.depth: int = len(vit.blocks)
        self.has_class_token: bool = vit.cls_token is not None
        self.model_kwargs = kwargs
        self.tokenizer: FeatureTokenizer | None = None
        self.grid = TokenGrid(1, 1, 1)
        if init == "mae":
            init_mae_weights_(vit)
            for token in (vit.cls_token, vit.reg_token):
                if token is not None:
                    nn.init.normal_(token, std=0.02)
        if (num_numeric is None) != (category_cardinalities is None):
            raise ValueError(
                "MaskedTableEncoder.num_numeric and MaskedTableEncoder.category_cardinalities must be given together"
            )
        if num_numeric is not None and category_cardinalities is not None:
            self._build(num_numeric, list(category_cardinalities))

    # ------------------------------------------------------------------ schema
    @property
    def is_configured(self) -> bool:
        return self.tokenizer is not None

    def _build(self, num_numeric: int, category_cardinalities: list[int]) -> None:
        self.tokenizer = FeatureTokenizer(
            num_numeric=num_numeric, category_cardinalities=category_cardinalities, dim=self.embed_dim
        )
        self.num_numeric = num_numeric
        self.category_cardinalities = category_cardinalities
        self.grid = TokenGrid(1, 1, num_numeric + len(category_cardinalities))

    def configure_data(self, datamodule: TableSchema | None) -> None:
        """Build the tokenizer from the datamodule's schema (once)."""
        if self.is_configured:
            return
        if datamodule is None or not hasattr(datamodule, "num_numeric"):
            raise ValueError(
                "MaskedTableEncoder needs the table schema: use a datamodule with num_numeric and "
                "category_cardinalities (mim.data.TableDataModule), or set encoder.num_numeric and "
                "encoder.category_cardinalities"
            )
        self._build(int(datamodule.num_numeric), [int(c) for c in datamodule.category_cardinalities])

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this encoder (stored in checkpoints)."""
        return {
            "class": "MaskedTableEncoder",
            "arch": self.arch,
            "init": self.init,
            "model_kwargs": self.model_kwargs,
            "num_numeric": getattr(self, "num_numeric", None),
            "category_cardinalities": getattr(self, "category_cardinalities", None),
        }

    # ------------------------------------------------------------------ forward
    def inputs(self, batch: Batch | dict[str, Tensor]) -> Tensor:
        """The tokenized row: (B, F, D). (Tokenizing here lets the module treat tables like images.)"""
        if self.tokenizer is None:
            raise RuntimeError("MaskedTableEncoder has no schema yet: call configure_data(datamodule) first")
        return self.tokenizer(batch)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, K, D) feature tokens -> (B, prefix + K, D)."""
        vit = self.vit
        parts = [t.expand(tokens.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        x = torch.cat([*parts, tokens], dim=1)  # (B, prefix+K, D)
        x = vit.norm_pre(x)
        if vit.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, tokens: Tensor, visible: Tensor | None = None) -> Tensor:
        """Encode the visible features.

        Args:
            tokens: (B, F, D) from :meth:`inputs`.
            visible: (B, K) feature indices, or None for all.

        Returns:
            (B, prefix + K, D).
        """
        if visible is not None:
            tokens = gather_tokens(tokens, visible)  # (B, K, D)
        return self.encode_tokens(tokens)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the special tokens."""
        return {f"vit.{n}" for n in ("cls_token", "reg_token")}
