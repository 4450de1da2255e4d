"""Every Encoder passes the EncoderContract: images, clips, a ViT with registers and no class token, tables."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mim.models import MaskedEncoder, MaskedTableEncoder
from mim.models.base import Encoder
from tests.contracts import EncoderContract
from tests.factories import TINY_VIT, tiny_encoder, tiny_table_encoder, tiny_video_encoder

SCHEMA = {"num_numeric": 3, "category_cardinalities": [5, 4]}


def _noise_at(batch: dict[str, Tensor], key: str, encoder: MaskedEncoder, tokens: Tensor) -> dict[str, Tensor]:
    """Add noise to the pixels of the patches (or tubelets) ``tokens`` (B, H) only."""
    patches = encoder.patchify(batch[key])  # (B, N, P)
    noise = torch.randn(patches.shape, generator=torch.Generator().manual_seed(9))
    at = torch.zeros(patches.shape[:2], dtype=torch.bool).scatter_(1, tokens, True)  # (B, N)
    changed = patches + noise * at.unsqueeze(-1)  # (B, N, P)
    return {**batch, key: encoder.unpatchify(changed)}


class _PixelEncoderContract(EncoderContract):
    def make_batch(self, encoder: Encoder) -> dict[str, Tensor]:
        assert isinstance(encoder, MaskedEncoder)
        shape = (self.batch_size, encoder.in_chans, *((encoder.num_frames,) if encoder.is_video else ()))
        return {encoder.input_key: torch.randn(*shape, *encoder.img_size, generator=torch.Generator().manual_seed(1))}

    def perturb(self, batch: dict[str, Tensor], encoder: Encoder, tokens: Tensor) -> dict[str, Tensor]:
        assert isinstance(encoder, MaskedEncoder)
        return _noise_at(batch, encoder.input_key, encoder, tokens)


class TestMaskedEncoderContract(_PixelEncoderContract):
    encoder_cls = MaskedEncoder

    def make_encoder(self) -> MaskedEncoder:
        return tiny_encoder()


class TestMaskedVideoEncoderContract(_PixelEncoderContract):
    encoder_cls = MaskedEncoder

    def make_encoder(self) -> MaskedEncoder:
        return tiny_video_encoder()


class TestMaskedEncoderRegistersContract(_PixelEncoderContract):
    """Register tokens without a class token, on 2-channel 8 x 12 images: prefix rows that are not a cls token."""

    encoder_cls = MaskedEncoder

    def make_encoder(self) -> MaskedEncoder:
        vit = {**TINY_VIT, "class_token": False, "reg_tokens": 2, "global_pool": "", "no_embed_class": True}
        return tiny_encoder(img_size=(8, 12), in_chans=2, model_kwargs=vit)


class TestMaskedTableEncoderContract(EncoderContract):
    encoder_cls = MaskedTableEncoder

    def make_encoder(self) -> MaskedTableEncoder:
        return tiny_table_encoder(**SCHEMA)

    def make_batch(self, encoder: Encoder) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(1)
        cards = SCHEMA["category_cardinalities"]
        return {
            "numeric": torch.randn(self.batch_size, SCHEMA["num_numeric"], generator=g),
            "numeric_missing": torch.zeros(self.batch_size, SCHEMA["num_numeric"], dtype=torch.bool),
            "categorical": torch.stack([torch.randint(1, c, (self.batch_size,), generator=g) for c in cards], dim=1),
        }

    def perturb(self, batch: dict[str, Tensor], encoder: Encoder, tokens: Tensor) -> dict[str, Tensor]:
        numeric, categorical = batch["numeric"].clone(), batch["categorical"].clone()
        fn, cards = SCHEMA["num_numeric"], SCHEMA["category_cardinalities"]
        for b, row in enumerate(tokens.tolist()):
            for t in row:
                if t < fn:
                    numeric[b, t] += 1.5
                else:
                    j = t - fn
                    categorical[b, j] = categorical[b, j] % (cards[j] - 1) + 1  # another non-missing category
        return {**batch, "numeric": numeric, "categorical": categorical}

    def rebuild(self, config: dict) -> Encoder:
        assert config["class"] == "MaskedTableEncoder"
        return MaskedTableEncoder(**{k: v for k, v in config.items() if k != "class"})


class TestMaskedEncoderGlobalPoolContract(_PixelEncoderContract):
    """A global-average-pooling ViT (timm puts its final norm after the pooling, fc_norm): built with the norm on every
    token, so no parameter is dead (the gradient check of the contract) and the output is normalised."""

    encoder_cls = MaskedEncoder

    def make_encoder(self) -> MaskedEncoder:
        return tiny_encoder(model_kwargs={**TINY_VIT, "global_pool": "avg", "class_token": False})


def test_global_pool_encoders_normalise_tokens_and_export_to_timm(tmp_path):
    import timm

    encoder = tiny_encoder(model_kwargs={**TINY_VIT, "global_pool": "avg", "class_token": False})
    assert isinstance(encoder.vit.norm, torch.nn.LayerNorm) and encoder.config["model_kwargs"]["fc_norm"] is False
    kwargs = {k: v for k, v in encoder.config["model_kwargs"].items() if k not in ("img_size", "patch_size")}
    twin = timm.create_model(encoder.arch, num_classes=0, img_size=16, patch_size=4, in_chans=3, **kwargs)
    twin.load_state_dict(encoder.timm_state_dict(), strict=True)
    with pytest.raises(ValueError, match="MaskedEncoder.model_kwargs: fc_norm=True puts .* after the pooling"):
        tiny_encoder(model_kwargs={**TINY_VIT, "global_pool": "avg", "fc_norm": True})
