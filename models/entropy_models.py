"""Entropy models of the learned codecs (CompressAI's ``entropy_models``), with integer tables.

- :class:`FactorizedPrior` — a learned, non-parametric density per channel, independent over
  space (Ballé et al. 2018, appendix 6.1; CompressAI's ``EntropyBottleneck``): the factorized
  codec's latent, and the hyperprior codec's hyper-latent ``z``.
- :class:`GaussianConditional` — a Gaussian per element whose mean and scale come from the
  hyper-synthesis, convolved with a unit uniform (Ballé et al. 2018; Minnen et al. 2018).

Both quantise their distributions to integer frequency tables (:func:`quantize_pmf`,
``2**TABLE_PRECISION`` per table, every symbol at least 1) that are saved with the weights;
the range coder (:mod:`models.entropy_coding`) reads only those tables, so the encoder and
the decoder agree bit for bit. The Gaussian's tables are one per scale of a fixed
log-spaced grid; an element is coded with the table of the grid scale nearest (in log) to
its predicted scale, after subtracting its mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.codec_layers import LowerBound

# Probability tables: each pmf over its integer support, quantised to integer frequencies
# summing to 2**TABLE_PRECISION, with every symbol at least 1 (always codable).
TABLE_PRECISION = 16
TAIL_MASS = 1e-9
SEARCH_RANGE = 512
LIKELIHOOD_BOUND = 1e-9
# Every Gaussian table covers at least ±MIN_HALF_WIDTH (values beyond a table are escaped,
# see models.entropy_coding, so this only trades a little probability mass against escapes).
MIN_HALF_WIDTH = 2


def quantize_pmf(pmf: np.ndarray, precision: int = TABLE_PRECISION) -> np.ndarray:
    """Integer frequencies ``>= 1`` summing to ``2**precision``, close to ``pmf`` (deterministic)."""
    total = 1 << precision
    n = len(pmf)
    if n > total // 2:
        raise ValueError(f"support of {n} symbols is too wide for {precision}-bit tables")
    pmf = np.asarray(pmf, dtype=np.float64)
    s = pmf.sum()
    pmf = pmf / s if s > 0 else np.full(n, 1.0 / n)
    freqs = np.maximum(1, np.floor(pmf * (total - n)).astype(np.int64) + 1)
    diff = total - int(freqs.sum())
    # Hand the remainder to (or take it from) the most probable symbols, a stable order.
    order = np.argsort(-pmf, kind="stable")
    i = 0
    while diff != 0:
        j = order[i % n]
        if diff > 0:
            freqs[j] += 1
            diff -= 1
        elif freqs[j] > 1:
            freqs[j] -= 1
            diff += 1
        i += 1
    return freqs.astype(np.int32)


class FactorizedPrior(nn.Module):
    """A learned density per channel, independent over space (Ballé et al. 2018, appendix 6.1).

    Each channel's cumulative distribution is a small monotone network ``c(x)``
    (positive matrices, tanh-gated biases); the likelihood of an integer ``k`` is
    ``c(k + ½) − c(k − ½)``. After training, :meth:`build_tables` turns the
    densities into integer frequency tables for the entropy coder, over at most
    ``-search_range..search_range`` (values beyond are clamped by the encoder).
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0,
                 search_range: int = SEARCH_RANGE) -> None:
        super().__init__()
        self.channels = channels
        self.search_range = int(search_range)
        widths = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / widths[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[i + 1], widths[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, widths[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))
        # Integer tables, filled by build_tables(): frequencies (C, K), first symbol value and length.
        self.register_buffer("table_freqs", torch.zeros(channels, 1, dtype=torch.int32))
        self.register_buffer("table_offset", torch.zeros(channels, dtype=torch.int32))
        self.register_buffer("table_length", torch.zeros(channels, dtype=torch.int32))

    def _logits_cumulative(self, x: Tensor) -> Tensor:
        """x: (C, 1, n) -> logits of the CDF at x, (C, 1, n)."""
        h = x
        for i, m in enumerate(self.matrices):
            h = torch.matmul(F.softplus(m), h) + self.biases[i]
            if i < len(self.factors):
                h = h + torch.tanh(self.factors[i]) * torch.tanh(h)
        return h

    def likelihood(self, y: Tensor) -> Tensor:
        """Likelihood of each element of ``y`` (B, C, H, W) under its channel's density."""
        b, c, hh, ww = y.shape
        v = y.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self._logits_cumulative(v - 0.5)
        upper = self._logits_cumulative(v + 0.5)
        # Evaluate in the tail where the sigmoids are far from 1 (numerical stability).
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        lik = LowerBound.apply(lik, LIKELIHOOD_BOUND)
        return lik.reshape(c, b, hh, ww).permute(1, 0, 2, 3)

    @staticmethod
    def likelihood_per_sample(priors: nn.ModuleList | list[FactorizedPrior], y: Tensor, prior_index: Tensor) -> Tensor:
        """Likelihood of each element of ``y`` (B, C, H, W) under ``priors[prior_index[i]]`` for sample ``i``.

        The same densities as :meth:`likelihood`, with each sample's parameters gathered from the
        priors stacked on a level axis: one pass over the batch whatever the levels, and nothing that
        depends on the values of ``prior_index`` (on a GPU the host never waits for the device; a loop
        over the levels present needs ``unique`` and boolean masks, each a synchronisation).
        """
        first = priors[0]
        b, c, hh, ww = y.shape
        h = y.reshape(b, c, 1, hh * ww)

        def gathered(params: list[Tensor], fn=None) -> Tensor:
            stacked = torch.stack(params)
            return (fn(stacked) if fn is not None else stacked)[prior_index]  # (B, C, ...)

        layers = []
        for i in range(len(first.matrices)):
            m = gathered([p.matrices[i] for p in priors], F.softplus)
            bias = gathered([p.biases[i] for p in priors])
            factor = gathered([p.factors[i] for p in priors], torch.tanh) if i < len(first.factors) else None
            layers.append((m, bias, factor))

        def logits(x: Tensor) -> Tensor:
            for m, bias, factor in layers:
                x = torch.matmul(m, x) + bias
                if factor is not None:
                    x = x + factor * torch.tanh(x)
            return x

        lower = logits(h - 0.5)
        upper = logits(h + 0.5)
        sign = -torch.sign(lower + upper).detach()
        lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        lik = LowerBound.apply(lik, LIKELIHOOD_BOUND)
        return lik.reshape(b, c, hh, ww)

    @torch.no_grad()
    def build_tables(self) -> None:
        """Quantise each channel's pmf over its support to integer frequencies (sum 2**16)."""
        grid = torch.arange(-self.search_range, self.search_range + 1, dtype=torch.float64)
        c = self.channels
        v = grid.to(self.matrices[0].device, torch.float32).view(1, 1, -1).expand(c, 1, -1)
        cdf = torch.sigmoid(self._logits_cumulative(v + 0.5)).double().squeeze(1).cpu().numpy()  # P(Y <= k)
        tables, offsets, lengths = [], [], []
        for ch in range(c):
            lo = int(np.searchsorted(cdf[ch], TAIL_MASS))  # first k with P(Y<=k) >= tail
            hi = int(np.searchsorted(cdf[ch], 1 - TAIL_MASS))
            lo, hi = max(lo, 0), min(max(hi, lo), len(grid) - 1)
            if hi == lo:  # a one-symbol table is not a distribution a coder accepts: widen by one
                hi, lo = (hi + 1, lo) if hi + 1 < len(grid) else (hi, lo - 1)
            upper = cdf[ch, lo : hi + 1].copy()
            lower = np.concatenate([[0.0], upper[:-1]])
            upper[-1] = 1.0  # the end symbols absorb the tails (values beyond are clamped)
            pmf = np.clip(upper - lower, 0.0, None)
            tables.append(quantize_pmf(pmf, TABLE_PRECISION))
            offsets.append(int(grid[lo]))
            lengths.append(len(pmf))
        width = max(lengths)
        freqs = np.zeros((c, width), dtype=np.int32)
        for ch, t in enumerate(tables):
            freqs[ch, : len(t)] = t
        dev = self.table_freqs.device
        self.table_freqs = torch.from_numpy(freqs).to(dev)
        self.table_offset = torch.tensor(offsets, dtype=torch.int32, device=dev)
        self.table_length = torch.tensor(lengths, dtype=torch.int32, device=dev)

    @property
    def has_tables(self) -> bool:
        return bool(self.table_length.numel()) and int(self.table_length.min()) > 0

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frequencies (C, K) int32, offsets (C,), lengths (C,)) as numpy."""
        return (self.table_freqs.cpu().numpy(), self.table_offset.cpu().numpy(), self.table_length.cpu().numpy())

    def clamp_to_tables(self, y: Tensor) -> Tensor:
        """Integer-valued (C, h, w) clamped to each channel's table support, as int32."""
        lo = self.table_offset.to(y.device).view(-1, 1, 1).to(y.dtype)
        hi = lo + self.table_length.to(y.device).view(-1, 1, 1).to(y.dtype) - 1
        return torch.maximum(torch.minimum(y, hi), lo).to(torch.int32)


class GaussianConditional(nn.Module):
    """A Gaussian ``N(μ, σ²)`` per element convolved with a unit uniform; integer tables per grid scale.

    Training and rate estimates use the continuous likelihood
    ``Φ((|y−μ|+½)/σ) − Φ((|y−μ|−½)/σ)`` (σ bounded below by ``scale_min``). For coding,
    the element ``round(y − μ)`` is coded with the table of the grid scale nearest to σ in
    log: ``scale_levels`` scales log-spaced over ``[scale_min, scale_max]``. The grid, its
    log-midpoints and the tables are buffers saved with the weights, and the table index
    is chosen by comparisons only (:meth:`index`), so encoder and decoder agree whenever
    they compute the same log-scale (the hyperprior codec computes it in exact integers).

    Args:
        scale_min: Smallest scale (also the likelihood's lower bound on σ).
        scale_max: Largest grid scale (larger predicted scales use its table).
        scale_levels: Number of grid scales (tables).
    """

    def __init__(self, scale_min: float = 0.11, scale_max: float = 256.0, scale_levels: int = 128) -> None:
        super().__init__()
        if not 0 < scale_min < scale_max:
            raise ValueError(f"need 0 < scale_min < scale_max, got {scale_min}, {scale_max}")
        if scale_levels < 2:
            raise ValueError(f"scale_levels must be >= 2, got {scale_levels}")
        self.scale_min, self.scale_max, self.scale_levels = float(scale_min), float(scale_max), int(scale_levels)
        # Filled by build_tables(): log grid scales, log-midpoints, and the flat integer tables.
        self.register_buffer("log_scales", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("table_freqs", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("table_start", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("table_length", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("table_offset", torch.zeros(0, dtype=torch.int32))

    def likelihood(self, y: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
        """Likelihood of each element of ``y`` given its mean and scale (same shapes)."""
        values = torch.abs(y - mean)
        s = LowerBound.apply(scale, self.scale_min)
        # Both terms in the lower tail, where Φ is accurate.
        upper = torch.special.ndtr((0.5 - values) / s)
        lower = torch.special.ndtr((-0.5 - values) / s)
        return LowerBound.apply(upper - lower, LIKELIHOOD_BOUND)

    def scale_from_log(self, log_scale: Tensor) -> Tensor:
        """σ from a predicted log-scale, bounded to ``[scale_min, 4·scale_max]`` (no overflow)."""
        return LowerBound.apply(torch.exp(log_scale.clamp(max=math.log(4 * self.scale_max))), self.scale_min)

    @torch.no_grad()
    def build_tables(self) -> None:
        """The log-spaced scale grid and one quantised pmf over ``-K..K`` per grid scale.

        ``K = max(ceil(t·σ), MIN_HALF_WIDTH)`` with ``t`` the two-sided ``TAIL_MASS`` quantile; the
        end symbols absorb the tails (values beyond are escaped by the entropy coder).
        """
        log_s = torch.linspace(math.log(self.scale_min), math.log(self.scale_max), self.scale_levels,
                               dtype=torch.float64)
        tail = -float(torch.special.ndtri(torch.tensor(TAIL_MASS / 2, dtype=torch.float64)))
        freqs, starts, lengths, offsets = [], [], [], []
        pos = 0
        for s in torch.exp(log_s).tolist():
            k = max(math.ceil(tail * s), MIN_HALF_WIDTH)
            edges = (torch.arange(-k, k, dtype=torch.float64) + 0.5) / s  # between symbols -k..k
            cdf = torch.special.ndtr(edges).numpy()
            pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
            t = quantize_pmf(np.clip(pmf, 0.0, None), TABLE_PRECISION)
            freqs.append(t)
            starts.append(pos)
            lengths.append(len(t))
            offsets.append(-k)
            pos += len(t)
        self.log_scales = log_s
        self.thresholds = (log_s[1:] + log_s[:-1]) / 2
        self.table_freqs = torch.from_numpy(np.concatenate(freqs))
        self.table_start = torch.tensor(starts, dtype=torch.int32)
        self.table_length = torch.tensor(lengths, dtype=torch.int32)
        self.table_offset = torch.tensor(offsets, dtype=torch.int32)

    @property
    def has_tables(self) -> bool:
        return self.table_length.numel() == self.scale_levels and int(self.table_length.min()) > 0

    def index(self, log_scale: Tensor) -> Tensor:
        """Table index (int64) of each float64 log-scale: the nearest grid scale in log (comparisons only)."""
        return torch.searchsorted(self.thresholds.to(log_scale.device), log_scale.contiguous())

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(flat frequencies, start of each table, lengths, offsets = first symbol value) as numpy."""
        return tuple(t.cpu().numpy() for t in (self.table_freqs, self.table_start, self.table_length,  # type: ignore[return-value]
                                               self.table_offset))
