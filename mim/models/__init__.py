"""Architecture only: encoders over visible tokens, decoders, embeddings."""

from mim.models.decoder import MAEDecoder
from mim.models.embed import patchify, sincos_2d, unpatchify
from mim.models.encoder import MaskedEncoder
from mim.models.table_encoder import MaskedTableEncoder
from mim.models.tabular import FeatureTokenizer

__all__ = [
    "FeatureTokenizer",
    "MAEDecoder",
    "MaskedEncoder",
    "MaskedTableEncoder",
    "patchify",
    "sincos_2d",
    "unpatchify",
]
