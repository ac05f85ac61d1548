"""A learned image codec: Ballé et al. (2017) factorized prior with variable-rate gains.

Pure PyTorch (no Prefect, fsspec or Pillow). The pieces, as in CompressAI:

- :class:`GDN` — generalised divisive normalisation (and its inverse) between convolutions;
- analysis transform ``g_a`` (image -> latent ``y``, stride 16) and synthesis ``g_s``;
- quantisation: additive uniform noise for the rate term and straight-through
  rounding for the distortion term while training, plain rounding at inference;
- :class:`FactorizedPrior` — a learned, non-parametric density per latent channel
  (the "entropy bottleneck"), one per quality level;
- several quality levels in one model through per-level channel gains
  (Cui et al., "Asymmetric gained deep image compression"): the latent is
  multiplied by ``gain[q]`` before rounding and by ``inv_gain[q]`` after, so one
  training run serves every rate point;
- :class:`RateDistortionLoss` — ``R + λ·D`` as its own module.

After training, :meth:`ImageCodec.update_tables` quantises every level's
per-channel probability mass functions to integer frequency tables (buffers in
the state dict, saved with the weights). The entropy coder
(:mod:`models.entropy_coding`, ``constriction``) reads only those integer tables,
so encoder and decoder agree bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Probability tables: each channel's pmf over its integer support, quantised to integer
# frequencies summing to 2**TABLE_PRECISION, with every symbol at least 1 (always codable).
TABLE_PRECISION = 16
TAIL_MASS = 1e-9
SEARCH_RANGE = 512
# Initial Adam step of the encoder-side latent refinement (latent units after the level's gain).
REFINE_LR = 0.01
REFINE_CHECK_EVERY = 10


@dataclass(frozen=True)
class CodecConfig:
    """Shape and rate points of an :class:`ImageCodec`.

    Attributes:
        channels: Width ``N`` of the hidden convolutions.
        latent_channels: Width ``M`` of the latent ``y``.
        lambdas: One rate–distortion trade-off per quality level, lowest rate first.
            The distortion is MSE on 0..255 pixel values (as CompressAI's ``λ·255²·MSE``).
        in_channels: 3 (RGB; grayscale images are coded as three equal channels).
        filters: Hidden widths of each channel's cumulative density network.
    """

    channels: int = 64
    latent_channels: int = 192
    lambdas: tuple[float, ...] = (0.0006, 0.0025, 0.006, 0.015, 0.04, 0.1, 0.35)
    in_channels: int = 3
    filters: tuple[int, ...] = (3, 3, 3)

    def __post_init__(self) -> None:
        if self.channels < 1 or self.latent_channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}, {self.latent_channels}")
        if not self.lambdas or any(not l > 0 for l in self.lambdas):
            raise ValueError(f"lambdas must be positive, got {list(self.lambdas)}")
        if list(self.lambdas) != sorted(self.lambdas):
            raise ValueError(f"lambdas must increase (lowest rate first), got {list(self.lambdas)}")
        if len(self.lambdas) > 255:
            raise ValueError("at most 255 quality levels")
        object.__setattr__(self, "lambdas", tuple(float(l) for l in self.lambdas))
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))

    @property
    def levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        d = dict(d)
        d["lambdas"] = tuple(d.get("lambdas", cls.lambdas))
        d["filters"] = tuple(d.get("filters", cls.filters))
        return cls(**d)


@dataclass
class CodecOutput:
    """What :meth:`ImageCodec.forward` returns.

    Attributes:
        x_hat: The reconstruction, same shape as the input, in [0, 1] after clamping
            at inference (unclamped while training so gradients flow).
        likelihoods: Per-element likelihoods of the quantised latent (``{"y": ...}``).
        y_hat: The quantised latent (rounded with a straight-through gradient).
    """

    x_hat: Tensor
    likelihoods: dict[str, Tensor]
    y_hat: Tensor


class _LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows when it pushes x up (Ballé's trick)."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through, None


class GDN(nn.Module):
    """Generalised divisive normalisation: ``y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)``.

    ``inverse=True`` multiplies instead (IGDN, used in the synthesis transform).
    β and γ are reparametrised to stay positive.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.inverse = inverse
        self._pedestal = 2.0**-18
        self._beta_bound = math.sqrt(beta_min + self._pedestal)
        self._gamma_bound = math.sqrt(self._pedestal)
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self._pedestal))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(channels) + self._pedestal))

    def forward(self, x: Tensor) -> Tensor:
        beta = _LowerBound.apply(self.beta, self._beta_bound) ** 2 - self._pedestal
        gamma = _LowerBound.apply(self.gamma, self._gamma_bound) ** 2 - self._pedestal
        c = x.shape[1]
        norm = F.conv2d(x * x, gamma.view(c, c, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 5, stride=2, padding=2)


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class FactorizedPrior(nn.Module):
    """A learned density per channel, independent over space (Ballé et al. 2018, appendix 6.1).

    Each channel's cumulative distribution is a small monotone network ``c(x)``
    (positive matrices, tanh-gated biases); the likelihood of an integer ``k`` is
    ``c(k + ½) − c(k − ½)``. After training, :meth:`build_tables` turns the
    densities into integer frequency tables for the entropy coder.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        self.channels = channels
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
        lik = _LowerBound.apply(lik, 1e-9)
        return lik.reshape(c, b, hh, ww).permute(1, 0, 2, 3)

    @torch.no_grad()
    def build_tables(self) -> None:
        """Quantise each channel's pmf over its support to integer frequencies (sum 2**16)."""
        grid = torch.arange(-SEARCH_RANGE, SEARCH_RANGE + 1, dtype=torch.float64)
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


def pad_to_multiple(x: Tensor, multiple: int = 16) -> tuple[Tensor, tuple[int, int]]:
    """Replicate-pad H and W up to a multiple of the stride; returns the original (H, W)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class ImageCodec(nn.Module):
    """Variable-rate learned image codec (factorized prior, GDN, per-level gains).

    Input images are float tensors (B, 3, H, W) in [0, 1]; any H, W work (padded
    to a multiple of 16 and cropped back).
    """

    kind = "codec"
    stride = 16

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        n, m, c = config.channels, config.latent_channels, config.in_channels
        self.g_a = nn.Sequential(_conv(c, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n), GDN(n), _conv(n, m))
        self.g_s = nn.Sequential(
            _deconv(m, n), GDN(n, inverse=True), _deconv(n, n), GDN(n, inverse=True),
            _deconv(n, n), GDN(n, inverse=True), _deconv(n, c),
        )
        q = config.levels
        # Log-gains: level q scales the latent by exp(gain[q]); higher quality, finer steps.
        init = torch.linspace(-0.5, 0.5, q).view(q, 1).expand(q, m) if q > 1 else torch.zeros(1, m)
        self.log_gain = nn.Parameter(init.clone())
        self.log_inv_gain = nn.Parameter(-init.clone())
        self.priors = nn.ModuleList(FactorizedPrior(m, config.filters) for _ in range(q))

    # -- levels ---------------------------------------------------------------------------
    def _gains(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.exp(self.log_gain[quality])[:, :, None, None]
        ig = torch.exp(self.log_inv_gain[quality])[:, :, None, None]
        return g, ig

    def _check_quality(self, quality: int) -> int:
        if not 0 <= int(quality) < self.config.levels:
            raise ValueError(f"quality must be in 0..{self.config.levels - 1}, got {quality}")
        return int(quality)

    # -- training / evaluation forward ------------------------------------------------------
    def forward(self, x: Tensor, quality: Tensor | int) -> CodecOutput:
        """Noisy-quantised (training) or rounded (eval) pass with likelihoods.

        Args:
            x: (B, 3, H, W) in [0, 1].
            quality: One level for the batch, or a (B,) tensor of levels.
        """
        b = x.shape[0]
        if isinstance(quality, int):
            quality = torch.full((b,), self._check_quality(quality), dtype=torch.long, device=x.device)
        xp, (h, w) = pad_to_multiple(x, self.stride)
        g, ig = self._gains(quality)
        y = self.g_a(xp) * g
        if self.training:
            noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            y_hat = y + (torch.round(y) - y).detach()  # straight-through for the decoder
        else:
            noisy = y_hat = torch.round(y)
        lik = torch.empty_like(y)
        for level in torch.unique(quality).tolist():
            sel = quality == level
            lik[sel] = self.priors[level].likelihood(noisy[sel])
        x_hat = self.g_s(y_hat * ig)[..., :h, :w]
        if not self.training:
            x_hat = x_hat.clamp(0, 1)
        return CodecOutput(x_hat=x_hat, likelihoods={"y": lik}, y_hat=y_hat)

    # -- inference: latents <-> integers ----------------------------------------------------
    def analyse(self, x: Tensor, quality: int, refine_steps: int = 0,
                on_step: Callable[[int, int], None] | None = None) -> Tensor:
        """Image (1, 3, H, W) in [0, 1] -> integer latent (M, h, w), clamped to the table supports.

        ``refine_steps > 0`` optimises the latent for this image before rounding
        (:meth:`refine_latent`): slower encoding, the same decoder and file format.
        """
        q = self._check_quality(quality)
        prior = self.priors[q]
        if not prior.has_tables:
            raise RuntimeError("the entropy model has no integer tables: call update_tables() after training")
        with torch.inference_mode():
            xp, _ = pad_to_multiple(x, self.stride)
            g, _ = self._gains(torch.tensor([q], device=x.device))
            y = self.g_a(xp) * g
        if refine_steps > 0:
            y = self.refine_latent(x, y, q, refine_steps, on_step=on_step)
        with torch.inference_mode():
            return self._round_to_tables(y, q)

    def _round_to_tables(self, y: Tensor, q: int) -> Tensor:
        prior = self.priors[q]
        y = torch.round(y)[0]
        lo = prior.table_offset.to(y.device).view(-1, 1, 1).float()
        hi = lo + prior.table_length.to(y.device).view(-1, 1, 1).float() - 1
        return torch.maximum(torch.minimum(y, hi), lo).to(torch.int32)

    def refine_latent(self, x: Tensor, y: Tensor, quality: int, steps: int, lr: float = REFINE_LR,
                      seed: int = 0, on_step: Callable[[int, int], None] | None = None) -> Tensor:
        """Optimise one image's latent for its own ``R + λ·D`` before rounding (encoder side only).

        Stochastic Gumbel annealing (Yang, Bamler & Mandt, "Improving inference for
        neural image compression", NeurIPS 2020): starting from the analysis
        transform's ``y``, Adam moves the continuous latent while each element is a
        Gumbel-softmax mix of its floor and ceiling whose temperature anneals towards
        hard rounding; the decoder and the entropy model stay fixed, so the file format
        and decoding are unchanged. Seeded, so encoding stays deterministic.

        Every :data:`REFINE_CHECK_EVERY` steps the hard-rounded latent's true cost
        (the entropy model's bits + λ·D) is measured, and the best latent seen wins,
        the analysis transform's own included: refinement never makes a level's
        ``R + λ·D`` worse than the fast encoder's.

        Args:
            x: (1, 3, H, W) in [0, 1], unpadded.
            y: (1, M, h, w) gain-scaled latent of the padded image (``g_a(x) * gain``).
            quality: The level (its λ and prior).
            steps: Adam steps.
            lr: Initial step size (decays linearly to 0).
            seed: Seed of the Gumbel noise.
            on_step: Called with (steps done, steps) after every step (progress bars).
        Returns:
            The refined continuous latent, same shape as ``y`` (round it to code).
        """
        q = self._check_quality(quality)
        h, w = x.shape[-2:]
        lam = self.config.lambdas[q] * 255.0**2
        gen = torch.Generator(device=y.device).manual_seed(seed)
        with torch.inference_mode(False), torch.enable_grad():
            target = x.detach().clone()
            _, ig = self._gains(torch.tensor([q], device=y.device))
            ig = ig.detach().clone()
            latent = y.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([latent], lr=lr)
            prior = self.priors[q]

            def hard_cost(candidate: Tensor) -> float:
                with torch.no_grad():
                    y_int = self._round_to_tables(candidate, q).float().unsqueeze(0)
                    bits = -torch.log2(prior.likelihood(y_int)).sum()
                    x_int = self.g_s(y_int * ig)[..., :h, :w].clamp(0, 1)
                    return float(bits / (h * w) + lam * torch.mean((x_int - target) ** 2))

            best_cost, best = hard_cost(latent), latent.detach().clone()
            for step in range(steps):
                if step and step % REFINE_CHECK_EVERY == 0 and (cost := hard_cost(latent)) < best_cost:
                    best_cost, best = cost, latent.detach().clone()
                t = step / steps
                tau = 0.5 * math.exp(-3.0 * max(0.0, t - 0.1) / 0.9)
                floor = torch.floor(latent)
                frac = (latent - floor).clamp(1e-5, 1 - 1e-5)
                # Logits of rounding down / up: -atanh(distance) / τ, plus Gumbel noise (seeded).
                u = torch.rand((2, *latent.shape), generator=gen, device=y.device).clamp(1e-10, 1 - 1e-10)
                gumbel = -torch.log(-torch.log(u))
                up = torch.sigmoid((torch.atanh(frac) - torch.atanh(1 - frac)) / tau + gumbel[1] - gumbel[0])
                y_soft = floor + up
                bits = -torch.log2(prior.likelihood(y_soft)).sum()
                x_hat = self.g_s(y_soft * ig)[..., :h, :w]
                loss = bits / (h * w) + lam * torch.mean((x_hat - target) ** 2)
                (grad,) = torch.autograd.grad(loss, latent)
                latent.grad = grad
                for group in opt.param_groups:
                    group["lr"] = lr * (1 - t)
                opt.step()
                if on_step is not None:
                    on_step(step + 1, steps)
            if hard_cost(latent) < best_cost:
                best = latent.detach().clone()
            return best

    @torch.inference_mode()
    def synthesise(self, y_int: Tensor, quality: int, size: tuple[int, int]) -> Tensor:
        """Integer latent (M, h, w) -> image (1, 3, H, W) in [0, 1]."""
        q = self._check_quality(quality)
        _, ig = self._gains(torch.tensor([q], device=y_int.device))
        x_hat = self.g_s(y_int.float().unsqueeze(0) * ig)
        return x_hat[..., : size[0], : size[1]].clamp(0, 1)

    @torch.inference_mode()
    def estimate_bits(self, y_int: Tensor, quality: int) -> float:
        """Bits the continuous entropy model assigns to an integer latent (M, h, w)."""
        lik = self.priors[self._check_quality(quality)].likelihood(y_int.float().unsqueeze(0))
        return float(-torch.log2(lik).sum())

    def compress(self, x: Tensor, quality: int, refine_steps: int = 0,
                 on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Image (1, 3, H, W) in [0, 1] -> ``{"strings": [payload bytes], "shape": (h, w), "y": latent}``.

        ``y`` is the integer latent that was coded (for :meth:`estimate_bits` without a second analysis).
        ``refine_steps``, ``on_step``: see :meth:`analyse` and :meth:`refine_latent`.
        """
        from models.entropy_coding import encode_latent

        y = self.analyse(x, quality, refine_steps, on_step)
        freqs, offsets, lengths = self.priors[quality].tables()
        payload = encode_latent(y.cpu().numpy(), freqs, offsets, lengths)
        return {"strings": [payload], "shape": tuple(y.shape[1:]), "y": y}

    def decompress(self, strings: list[bytes], shape: tuple[int, int], quality: int, size: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`compress`: returns (1, 3, H, W) in [0, 1]."""
        from models.entropy_coding import decode_latent

        q = self._check_quality(quality)
        freqs, offsets, lengths = self.priors[q].tables()
        y = decode_latent(strings[0], (self.config.latent_channels, *shape), freqs, offsets, lengths)
        dev = next(self.parameters()).device
        return self.synthesise(torch.from_numpy(y).to(dev), q, size)

    # -- tables and identity -----------------------------------------------------------------
    @torch.no_grad()
    def update_tables(self) -> None:
        """(Re)build every level's integer probability tables; call after training."""
        for p in self.priors:
            p.build_tables()

    def identity(self) -> bytes:
        """8 bytes that identify this codec: SHA-256 of its config and every tensor (tables included)."""
        return codec_identity(self.config.to_dict(), self.state_dict())


def codec_identity(config: dict[str, Any], state_dict: dict[str, Tensor]) -> bytes:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:8]


class RateDistortionLoss(nn.Module):
    """``R + λ·D`` per sample: bits per pixel plus λ·255²·MSE, λ by each sample's level.

    Returns the mean over the batch; :attr:`last` keeps the parts for logging.
    """

    def __init__(self, lambdas: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("lambdas", torch.tensor(lambdas, dtype=torch.float32), persistent=False)
        self.last: dict[str, float] = {}

    def forward(self, out: CodecOutput, x: Tensor, quality: Tensor) -> Tensor:
        b, _, h, w = x.shape
        bits = sum(-torch.log2(l).reshape(b, -1).sum(1) for l in out.likelihoods.values())
        bpp = bits / (h * w)
        mse = F.mse_loss(out.x_hat.float(), x.float(), reduction="none").reshape(b, -1).mean(1)
        lam = self.lambdas.to(x.device)[quality]
        loss = (bpp + lam * (255.0**2) * mse).mean()
        self.last = {"bpp": float(bpp.mean().detach()), "mse": float(mse.mean().detach())}
        return loss


def build_codec(config: dict[str, Any]) -> ImageCodec:
    return ImageCodec(CodecConfig.from_dict(config))


def load_codec_state(model: ImageCodec, state_dict: dict[str, Tensor]) -> None:
    """Load weights whose table buffers may differ in width from a fresh model's."""
    for i, p in enumerate(model.priors):
        for name in ("table_freqs", "table_offset", "table_length"):
            key = f"priors.{i}.{name}"
            if key in state_dict:
                setattr(p, name, torch.empty_like(state_dict[key]))
    model.load_state_dict(state_dict)


def _grow(old: Tensor, fresh: Tensor, keep_zero: tuple[slice, ...]) -> Tensor:
    """``fresh`` with ``old`` copied into its leading block and ``keep_zero`` set to 0."""
    new = fresh.clone()
    new[tuple(slice(0, n) for n in old.shape)] = old
    new[keep_zero] = 0.0
    return new


@torch.no_grad()
def widen_codec(model: ImageCodec, channels: int, seed: int = 0) -> ImageCodec:
    """A copy of ``model`` with hidden width ``channels`` that computes the same function.

    Net2Net-style growth for continuing training with more capacity: old channels keep
    their weights; new channels get fresh weights from every input, and the weights from
    new channels into old ones start at zero, so the old channels' values (and the
    output) are unchanged until training moves them. GDN's γ couples old and new
    channels with zero (its lower bound) and gives the new ones the usual diagonal 0.1.
    Gains and entropy models are copied. ``seed`` seeds the new weights.
    """
    old_n = model.config.channels
    if channels < old_n:
        raise ValueError(f"cannot widen {old_n} channels to {channels}")
    cfg = CodecConfig.from_dict({**model.config.to_dict(), "channels": channels})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wide = ImageCodec(cfg)
    old_state = model.state_dict()
    new_state = wide.state_dict()
    for name, mod in wide.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            w_old = old_state[f"{name}.weight"]
            w_new = new_state[f"{name}.weight"]
            # Conv2d weight: (out, in, k, k); ConvTranspose2d: (in, out, k, k).
            in_dim = 1 if isinstance(mod, nn.Conv2d) else 0
            out_dim = 1 - in_dim
            zero = [slice(None)] * 4
            zero[in_dim] = slice(w_old.shape[in_dim], None)   # weights from new inputs ...
            zero[out_dim] = slice(0, w_old.shape[out_dim])    # ... into old outputs
            new_state[f"{name}.weight"] = _grow(w_old, w_new, tuple(zero))
            b_new = new_state[f"{name}.bias"].clone()
            b_new[: len(old_state[f"{name}.bias"])] = old_state[f"{name}.bias"]
            b_new[len(old_state[f"{name}.bias"]):] = 0.0
            new_state[f"{name}.bias"] = b_new
        elif isinstance(mod, GDN):
            beta = new_state[f"{name}.beta"].clone()
            beta[:old_n] = old_state[f"{name}.beta"]
            gamma = torch.full_like(new_state[f"{name}.gamma"], mod._gamma_bound)
            gamma[:old_n, :old_n] = old_state[f"{name}.gamma"]
            idx = torch.arange(old_n, channels)
            gamma[idx, idx] = new_state[f"{name}.gamma"][idx, idx]
            new_state[f"{name}.beta"], new_state[f"{name}.gamma"] = beta, gamma
    for k, v in old_state.items():
        if k.startswith(("log_gain", "log_inv_gain", "priors.")):
            new_state[k] = v
    load_codec_state(wide, new_state)
    return wide


# -- training helpers ---------------------------------------------------------------------


def make_loss_fn(model: ImageCodec):
    """A ``loss_fn(model, batch, generator)`` for :func:`models.training.fit`.

    ``batch`` is uint8 patches (B, 3, P, P). Every batch covers the quality levels
    in turn (sample ``i`` gets level ``(i + offset) % Q`` with a random offset), so
    one training run fits all rate points of the variable-rate model.
    """
    criterion = RateDistortionLoss(model.config.lambdas)
    levels = model.config.levels

    def loss_fn(m: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        x = batch.float() / 255.0
        offset = int(torch.randint(levels, (1,), generator=generator))
        quality = (torch.arange(len(x)) + offset) % levels
        quality = quality.to(x.device)
        return criterion(m(x, quality), x, quality)

    return loss_fn


def random_patches(images: list[np.ndarray], count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` random crops (uint8, (count, 3, size, size)) from RGB/gray uint8 images.

    Crops are drawn in proportion to image area, with random flips; grayscale
    images become three equal channels (how the codec sees them). Images smaller
    than ``size`` are padded by reflection.
    """
    rng = np.random.default_rng(seed)
    rgb = [as_rgb(im) for im in images]
    rgb = [im if min(im.shape[:2]) >= size else
           np.pad(im, ((0, max(0, size - im.shape[0])), (0, max(0, size - im.shape[1])), (0, 0)), mode="reflect")
           for im in rgb]
    areas = np.array([im.shape[0] * im.shape[1] for im in rgb], dtype=np.float64)
    which = rng.choice(len(rgb), size=count, p=areas / areas.sum())
    out = np.empty((count, 3, size, size), dtype=np.uint8)
    for i, k in enumerate(which):
        im = rgb[k]
        top = int(rng.integers(0, im.shape[0] - size + 1))
        left = int(rng.integers(0, im.shape[1] - size + 1))
        crop = im[top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        out[i] = crop.transpose(2, 0, 1)
    return out


def as_rgb(im: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3|4) -> (H, W, 3); alpha dropped, gray replicated."""
    a = np.asarray(im)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    return a[:, :, :3]
