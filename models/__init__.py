"""Pure PyTorch models and loops. Imports torch and numpy only (no Prefect, fsspec, pandas)."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.codec import CodecConfig, ImageCodec, build_codec
from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig, build_hyperprior
from models.conv import ConvAEConfig, ConvAutoencoder, build_conv
from models.dense import (
    DenseAEConfig,
    DenseAutoencoder,
    ImputerConfig,
    MaskedDenseAutoencoder,
    MaskedImputer,
    build_dense,
    build_masked_dense,
    build_masked_imputer,
)
from models.detector import DetectorConfig, KnnAutoencoderDetector, build_detector

MODEL_BUILDERS = {
    "dense": build_dense,
    "masked_dense": build_masked_dense,
    "dense_detector": build_detector,
    "masked_imputer": build_masked_imputer,
    "conv": build_conv,
    "codec": build_codec,
    "hyperprior": build_hyperprior,
}


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its saved ``kind`` and JSON config (never from a pickle)."""
    try:
        builder = MODEL_BUILDERS[kind]
    except KeyError as e:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODEL_BUILDERS)}") from e
    return builder(config)


__all__ = [
    "MODEL_BUILDERS",
    "CodecConfig",
    "ConvAEConfig",
    "ConvAutoencoder",
    "DenseAEConfig",
    "DenseAutoencoder",
    "DetectorConfig",
    "HyperpriorCodec",
    "HyperpriorConfig",
    "ImageCodec",
    "ImputerConfig",
    "KnnAutoencoderDetector",
    "MaskedDenseAutoencoder",
    "MaskedImputer",
    "build_model",
]
