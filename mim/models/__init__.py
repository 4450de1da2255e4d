"""Architecture only: encoders over visible tokens, decoders, embeddings."""

from mim.models.decoder import MAEDecoder
from mim.models.embed import patchify, sincos_2d, unpatchify
from mim.models.encoder import MaskedEncoder

__all__ = ["MAEDecoder", "MaskedEncoder", "patchify", "sincos_2d", "unpatchify"]
