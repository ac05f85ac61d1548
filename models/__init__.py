"""Pure PyTorch models and loops. Imports torch and numpy only (no Prefect, fsspec, pandas)."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.codec import CodecConfig, ImageCodec, build_codec
from models.dense import DenseAEConfig, DenseAutoencoder, build_dense

MODEL_BUILDERS = {
    "dense": build_dense,
    "codec": build_codec,
}


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its saved ``kind`` and JSON config (never from a pickle)."""
    try:
        builder = MODEL_BUILDERS[kind]
    except KeyError as e:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODEL_BUILDERS)}") from e
    return builder(config)


__all__ = ["CodecConfig", "ImageCodec", "DenseAEConfig", "DenseAutoencoder", "MODEL_BUILDERS", "build_model"]
