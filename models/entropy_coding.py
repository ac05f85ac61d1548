"""Entropy coding of integer latents with ``constriction``'s range coder.

The only module that imports ``constriction`` (lazily, inside the functions), so
the codecs' torch code imports on a machine that has nothing but torch.

One payload is one range-coder stream (a queue: decoded in the order it was encoded)
holding one or more parts:

- :meth:`StreamEncoder.encode_channels` — a latent (C, h, w) with one integer table per
  channel (:class:`models.entropy_models.FactorizedPrior`), channel by channel in raster order;
- :meth:`StreamEncoder.encode_indexed` — symbols each with its own table index
  (:class:`models.entropy_models.GaussianConditional`): grouped by table, in increasing
  table order, each group in raster order. The decoder knows the indices (it computes them
  from what it decoded before), so it decodes the same groups and scatters them back.
  A table's end symbols stand for "this far or further" (they absorb the tails): a value
  beyond them is coded as the end symbol plus an escape, its excess in Exp-Golomb code
  (the bit count, then the bits, with uniform models), after all the groups. Nothing is
  clamped, however badly a value was predicted (up to ±2**30 beyond its table).

The tables are integer frequencies, so the float probabilities handed to constriction
are exact ratios and constriction's own quantisation of them is identical at both ends.
"""

from __future__ import annotations

import numpy as np


class EntropyCodingError(ValueError):
    """The payload does not decode with these tables (corrupted, truncated or foreign)."""


def _categorical(freqs: np.ndarray) -> object:
    import constriction

    f = np.asarray(freqs, dtype=np.float64)
    return constriction.stream.model.Categorical(f / f.sum(), perfect=False)


def _channel_models(freqs: np.ndarray, lengths: np.ndarray) -> list[object]:
    return [_categorical(freqs[ch, : int(lengths[ch])]) for ch in range(len(lengths))]


ESCAPE_BITS = 31  # bit counts 0..30 of an escape's excess + 1


def _uniform(size: int) -> object:
    import constriction

    return constriction.stream.model.Uniform(size)


def _groups(index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A stable order of the flat positions by table index, and (table, start, stop) of each run."""
    flat = np.asarray(index, dtype=np.int64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_idx = flat[order]
    tables, first = np.unique(sorted_idx, return_index=True)
    bounds = [*first.tolist(), len(flat)]
    return order, [(int(t), bounds[i], bounds[i + 1]) for i, t in enumerate(tables.tolist())]


class StreamEncoder:
    """Appends latents to one range-coder stream; :meth:`payload` gives its bytes."""

    def __init__(self) -> None:
        import constriction

        self._enc = constriction.stream.queue.RangeEncoder()

    def encode_channels(self, y: np.ndarray, freqs: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """An integer latent (C, h, w) with one table per channel; values must lie in each channel's support."""
        y = np.asarray(y, dtype=np.int64)
        for ch, model in enumerate(_channel_models(freqs, lengths)):
            sym = (y[ch].reshape(-1) - int(offsets[ch])).astype(np.int32)
            if sym.size and (sym.min() < 0 or sym.max() >= int(lengths[ch])):
                raise ValueError(f"latent channel {ch} has values outside its table support")
            self._enc.encode(sym, model)

    def encode_indexed(self, values: np.ndarray, index: np.ndarray, freqs: np.ndarray, starts: np.ndarray,
                       lengths: np.ndarray, offsets: np.ndarray) -> None:
        """Integer values, each coded with table ``index`` (same shape) of the flat tables; escapes after."""
        v = np.asarray(values, dtype=np.int64).reshape(-1)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        lo, hi = offsets[idx].astype(np.int64), (offsets[idx] + lengths[idx] - 1).astype(np.int64)
        excess = np.maximum(lo - v, v - hi)  # > 0 beyond the table; the end symbol then says which side
        if excess.size and int(excess.max()) >= 1 << (ESCAPE_BITS - 1):
            raise ValueError(f"a value lies {int(excess.max())} beyond its table: too far to code")
        clipped = np.clip(v, lo, hi)
        order, groups = _groups(idx)
        for t, a, b in groups:
            s = int(starts[t])
            self._enc.encode((clipped[order[a:b]] - int(offsets[t])).astype(np.int32),
                             _categorical(freqs[s : s + int(lengths[t])]))
        # Escapes: at every end symbol (in flat order), the excess e >= 0 as Exp-Golomb of e + 1.
        ends = (v <= lo) | (v >= hi)
        e = np.maximum(excess[ends], 0) + 1
        if e.size:
            nbits = np.frexp(e.astype(np.float64))[1].astype(np.int64) - 1  # floor(log2 e), exact
            self._enc.encode(nbits.astype(np.int32), _uniform(ESCAPE_BITS))
            bits = [(int(x) >> k) & 1 for x, n in zip(e.tolist(), nbits.tolist(), strict=True) for k in range(n - 1, -1, -1)]
            if bits:
                self._enc.encode(np.array(bits, dtype=np.int32), _uniform(2))

    def payload(self) -> bytes:
        return self._enc.get_compressed().astype("<u4").tobytes()


class StreamDecoder:
    """Reads latents back from a payload, in the order they were encoded."""

    def __init__(self, payload: bytes) -> None:
        import constriction

        if len(payload) % 4:
            raise EntropyCodingError(f"payload of {len(payload)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            self._dec = constriction.stream.queue.RangeDecoder(words)
        except Exception as e:
            raise EntropyCodingError(f"payload does not decode: {e}") from e

    def decode_channels(self, shape: tuple[int, int, int], freqs: np.ndarray, offsets: np.ndarray,
                        lengths: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`StreamEncoder.encode_channels`: the integer latent (C, h, w) as int32."""
        c, h, w = shape
        if c != len(lengths):
            raise EntropyCodingError(f"payload has {c} channels, the tables {len(lengths)}")
        out = np.empty((c, h * w), dtype=np.int32)
        try:
            for ch, model in enumerate(_channel_models(freqs, lengths)):
                out[ch] = np.asarray(self._dec.decode(model, h * w), dtype=np.int32) + int(offsets[ch])
        except Exception as e:  # constriction raises on inconsistent streams
            raise EntropyCodingError(f"payload does not decode: {e}") from e
        return out.reshape(c, h, w)

    def decode_indexed(self, index: np.ndarray, freqs: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                       offsets: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`StreamEncoder.encode_indexed`: int64 values shaped like ``index``."""
        index = np.asarray(index)
        idx = index.reshape(-1).astype(np.int64)
        out = np.empty(idx.size, dtype=np.int64)
        order, groups = _groups(idx)
        try:
            for t, a, b in groups:
                s = int(starts[t])
                model = _categorical(freqs[s : s + int(lengths[t])])
                out[order[a:b]] = np.asarray(self._dec.decode(model, b - a), dtype=np.int64) + int(offsets[t])
            lo, hi = offsets[idx].astype(np.int64), (offsets[idx] + lengths[idx] - 1).astype(np.int64)
            ends = np.flatnonzero((out <= lo) | (out >= hi))
            if ends.size:
                nbits = np.asarray(self._dec.decode(_uniform(ESCAPE_BITS), ends.size), dtype=np.int64)
                total = int(nbits.sum())
                bits = np.asarray(self._dec.decode(_uniform(2), total), dtype=np.int64) if total else np.zeros(0, np.int64)
                pos = 0
                for j, n in zip(ends.tolist(), nbits.tolist(), strict=True):
                    e = 1
                    for bit in bits[pos : pos + n].tolist():
                        e = (e << 1) | bit
                    pos += n
                    out[j] += (e - 1) if out[j] >= hi[j] else -(e - 1)
        except Exception as e:
            raise EntropyCodingError(f"payload does not decode: {e}") from e
        return out.reshape(index.shape)


def encode_latent(y: np.ndarray, freqs: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    """Range-code an integer latent (C, h, w) alone (the factorized codec's payload)."""
    enc = StreamEncoder()
    enc.encode_channels(y, freqs, offsets, lengths)
    return enc.payload()


def decode_latent(
    payload: bytes, shape: tuple[int, int, int], freqs: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Inverse of :func:`encode_latent`: the integer latent (C, h, w) as int32."""
    return StreamDecoder(payload).decode_channels(shape, freqs, offsets, lengths)
