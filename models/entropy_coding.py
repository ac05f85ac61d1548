"""Entropy coding of integer latents with ``constriction``'s range coder.

The only module that imports ``constriction`` (lazily, inside the functions), so
the codec's torch code imports on a machine that has nothing but torch.

Each latent channel has its own integer frequency table (from
:meth:`models.codec.FactorizedPrior.build_tables`). Symbols are coded channel by
channel in raster order with a fixed categorical model per channel; the
frequencies are integers, so the float probabilities handed to constriction are
exact ratios and constriction's own quantisation of them is identical at both
ends.
"""

from __future__ import annotations

import numpy as np


class EntropyCodingError(ValueError):
    """The payload does not decode with these tables (corrupted, truncated or foreign)."""


def _models(freqs: np.ndarray, lengths: np.ndarray) -> list[object]:
    import constriction

    Categorical = constriction.stream.model.Categorical
    out = []
    for ch in range(len(lengths)):
        f = freqs[ch, : int(lengths[ch])].astype(np.float64)
        out.append(Categorical(f / f.sum(), perfect=False))
    return out


def encode_latent(y: np.ndarray, freqs: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    """Range-code an integer latent (C, h, w); values must lie in each channel's support."""
    import constriction

    y = np.asarray(y, dtype=np.int64)
    enc = constriction.stream.queue.RangeEncoder()
    for ch, model in enumerate(_models(freqs, lengths)):
        sym = (y[ch].reshape(-1) - int(offsets[ch])).astype(np.int32)
        if sym.size and (sym.min() < 0 or sym.max() >= int(lengths[ch])):
            raise ValueError(f"latent channel {ch} has values outside its table support")
        enc.encode(sym, model)
    return enc.get_compressed().astype("<u4").tobytes()


def decode_latent(
    payload: bytes, shape: tuple[int, int, int], freqs: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Inverse of :func:`encode_latent`: the integer latent (C, h, w) as int32."""
    import constriction

    if len(payload) % 4:
        raise EntropyCodingError(f"payload of {len(payload)} bytes is not a whole number of 32-bit words")
    c, h, w = shape
    if c != len(lengths):
        raise EntropyCodingError(f"payload has {c} channels, the tables {len(lengths)}")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        out = np.empty((c, h * w), dtype=np.int32)
        for ch, model in enumerate(_models(freqs, lengths)):
            out[ch] = np.asarray(dec.decode(model, h * w), dtype=np.int32) + int(offsets[ch])
    except Exception as e:  # constriction raises on inconsistent streams
        raise EntropyCodingError(f"payload does not decode: {e}") from e
    return out.reshape(c, h, w)
