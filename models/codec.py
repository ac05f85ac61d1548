"""The factorized-prior learned image codec (Ballé et al. 2017) with variable-rate gains, and what codecs share.

Pure PyTorch (no Prefect, fsspec or Pillow). The pieces, as in CompressAI:

- :mod:`models.codec_layers` — GDN and the stride-2 convolutions of the transforms;
- :mod:`models.entropy_models` — the entropy models with their integer tables;
- here: :class:`CodecConfig`, :class:`CodecOutput`, :class:`CodecBase` (the analysis
  transform ``g_a`` (image -> latent ``y``, stride 16), the synthesis ``g_s`` and the
  per-level gains) and :class:`ImageCodec`, whose latent has a
  :class:`~models.entropy_models.FactorizedPrior` per quality level;
- :mod:`models.codec_hyperprior` — the mean-scale hyperprior codec;
- :mod:`models.codec_train` — the ``R + λ·D`` loss and training helpers.

Quantisation: additive uniform noise for the rate term and straight-through rounding
for the distortion term while training, plain rounding at inference. Several quality
levels live in one model through per-level channel gains (Cui et al., "Asymmetric gained
deep image compression"): the latent is multiplied by ``gain[q]`` before rounding and by
``inv_gain[q]`` after, so one training run serves every rate point.

After training, :meth:`CodecBase.update_tables` quantises the entropy models to integer
frequency tables (buffers in the state dict, saved with the weights). The entropy coder
(:mod:`models.entropy_coding`, ``constriction``) reads only those integer tables, so
encoder and decoder agree bit for bit.

Coding and decoding run the transforms over large images in tiles with a halo
(:func:`models.image_ops.map_tiles`, sizes :attr:`CodecBase.analysis_tile` and
:attr:`CodecBase.synthesis_tile`): memory is bounded by a tile's, the output is the untiled one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.codec_layers import (
    GDN,
    analysis_transform,
    conv_specs,
    receptive_halo,
    synthesis_transform,
)
from models.entropy_models import FactorizedPrior, quantize_pmf
from models.image_ops import as_rgb, map_tiles, pad_to_multiple

__all__ = [
    "GDN",
    "CodecBase",
    "CodecConfig",
    "CodecOutput",
    "FactorizedPrior",
    "ImageCodec",
    "as_rgb",
    "build_codec",
    "codec_identity",
    "load_codec_state",
    "pad_to_multiple",
    "quantize_pmf",
]

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


def level_likelihoods(priors: nn.ModuleList, values: Tensor, quality: Tensor) -> Tensor:
    """Likelihoods of each sample's ``values`` under the prior of its own level (``priors[quality[i]]``).

    Gathered per sample (:meth:`~models.entropy_models.FactorizedPrior.likelihood_per_sample`): no
    host synchronisation in a training step.
    """
    if len(priors) == 1:
        return priors[0].likelihood(values)
    return FactorizedPrior.likelihood_per_sample(priors, values, quality)


class CodecBase(nn.Module):
    """What the learned codecs share: ``g_a``/``g_s`` with GDN, per-level gains, quality checks, identity.

    Subclasses add their entropy models and implement ``forward`` (a :class:`CodecOutput`),
    ``compress``/``decompress``, ``estimate_bits``, ``update_tables`` and ``has_tables``.
    Input images are float tensors (B, 3, H, W) in [0, 1]; any H, W work (padded to a
    multiple of :attr:`stride` and cropped back).
    """

    kind: ClassVar[str] = ""
    stride: ClassVar[int] = 16
    # The image's total downsampling to its deepest latent (the hyperprior's side latent: 16 x 4): an image
    # smaller than this still codes (padded), but is mostly padding.
    factor: ClassVar[int] = 16
    # Whether ``compress(..., refine_steps > 0)`` (encoder-side latent refinement) is implemented.
    supports_refinement: ClassVar[bool] = False
    # The automatic GPU batch keeps the given lr (no sqrt scaling): on an H200 the hyperprior's
    # rate-distortion loss went NaN at epoch 3 with lr x sqrt(64 / 8) (benchmarks/RESULTS.md, GPU training).
    scale_lr_with_batch: ClassVar[bool] = False

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        n, m, c = config.channels, config.latent_channels, config.in_channels
        self.g_a = analysis_transform(c, n, m)
        self.g_s = synthesis_transform(m, n, c)
        q = config.levels
        # Log-gains: level q scales the latent by exp(gain[q]); higher quality, finer steps.
        init = torch.linspace(-0.5, 0.5, q).view(q, 1).expand(q, m) if q > 1 else torch.zeros(1, m)
        self.log_gain = nn.Parameter(init.clone())
        self.log_inv_gain = nn.Parameter(-init.clone())

    # Coding and decoding run the transforms over a large image in tiles (each read with the halo
    # its receptive field needs, models.image_ops.map_tiles), so memory is a tile's, not the
    # image's: analysis in blocks of ANALYSIS_TILE pixels, synthesis in blocks of SYNTHESIS_TILE
    # latent pixels (16 x as many pixels). Images up to the tile are one call, as before tiling.
    analysis_tile: ClassVar[int] = 1024
    synthesis_tile: ClassVar[int] = 48

    def _analysis(self, xp: Tensor) -> Tensor:
        """``g_a`` of an image padded to the stride (inference; tiled when large)."""
        halo = receptive_halo(conv_specs(self.g_a), multiple=self.stride)
        return map_tiles(self.g_a, xp, self.analysis_tile, halo, down=self.stride)

    def _synthesis(self, fn: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
        """``fn`` (``g_s`` or its exact integer twin) of a latent (inference; tiled when large)."""
        return map_tiles(fn, y, self.synthesis_tile, receptive_halo(conv_specs(self.g_s)), up=self.stride)

    def _gains(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.exp(self.log_gain[quality])[:, :, None, None]
        ig = torch.exp(self.log_inv_gain[quality])[:, :, None, None]
        return g, ig

    def _check_quality(self, quality: int) -> int:
        if not 0 <= int(quality) < self.config.levels:
            raise ValueError(f"quality must be in 0..{self.config.levels - 1}, got {quality}")
        return int(quality)

    def _quality_tensor(self, quality: Tensor | int, batch: int, device: torch.device) -> Tensor:
        if isinstance(quality, int):
            return torch.full((batch,), self._check_quality(quality), dtype=torch.long, device=device)
        return quality

    @property
    def has_tables(self) -> bool:
        raise NotImplementedError

    def update_tables(self) -> None:
        raise NotImplementedError

    def identity(self) -> bytes:
        """8 bytes that identify this codec: SHA-256 of its config and every tensor (tables included)."""
        return codec_identity(self.config.to_dict(), self.state_dict())


class ImageCodec(CodecBase):
    """Variable-rate learned image codec (factorized prior, GDN, per-level gains).

    Input images are float tensors (B, 3, H, W) in [0, 1]; any H, W work (padded
    to a multiple of 16 and cropped back).
    """

    kind: ClassVar[str] = "codec"
    supports_refinement: ClassVar[bool] = True

    def __init__(self, config: CodecConfig) -> None:
        super().__init__(config)
        self.priors = nn.ModuleList(FactorizedPrior(config.latent_channels, config.filters)
                                    for _ in range(config.levels))

    # -- training / evaluation forward ------------------------------------------------------
    def forward(self, x: Tensor, quality: Tensor | int) -> CodecOutput:
        """Noisy-quantised (training) or rounded (eval) pass with likelihoods.

        Args:
            x: (B, 3, H, W) in [0, 1].
            quality: One level for the batch, or a (B,) tensor of levels.
        """
        quality = self._quality_tensor(quality, x.shape[0], x.device)
        xp, (h, w) = pad_to_multiple(x, self.stride)
        g, ig = self._gains(quality)
        y = self.g_a(xp) * g
        if self.training:
            noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
            y_hat = y + (torch.round(y) - y).detach()  # straight-through for the decoder
        else:
            noisy = y_hat = torch.round(y)
        lik = level_likelihoods(self.priors, noisy, quality)
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
            y = self._analysis(xp) * g
        if refine_steps > 0:
            y = self.refine_latent(x, y, q, refine_steps, on_step=on_step)
        with torch.inference_mode():
            return self._round_to_tables(y, q)

    def _round_to_tables(self, y: Tensor, q: int) -> Tensor:
        return self.priors[q].clamp_to_tables(torch.round(y)[0])

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
        x_hat = self._synthesis(self.g_s, y_int.float().unsqueeze(0) * ig)
        return x_hat[..., : size[0], : size[1]].clamp(0, 1)

    @torch.inference_mode()
    def estimate_bits(self, y_int: Tensor, quality: int) -> float:
        """Bits the continuous entropy model assigns to an integer latent (M, h, w)."""
        lik = self.priors[self._check_quality(quality)].likelihood(y_int.float().unsqueeze(0))
        return float(-torch.log2(lik).sum())

    def compress(self, x: Tensor, quality: int, refine_steps: int = 0,
                 on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Image (1, 3, H, W) in [0, 1] -> ``{"strings": [payload bytes], "shape": (h, w), "y": latent, "latents": latent}``.

        ``y`` (and ``latents``, the name every codec uses) is the integer latent that was coded
        (for :meth:`estimate_bits` without a second analysis).
        ``refine_steps``, ``on_step``: see :meth:`analyse` and :meth:`refine_latent`.
        """
        from models.entropy_coding import encode_latent

        y = self.analyse(x, quality, refine_steps, on_step)
        freqs, offsets, lengths = self.priors[quality].tables()
        payload = encode_latent(y.cpu().numpy(), freqs, offsets, lengths)
        return {"strings": [payload], "shape": tuple(y.shape[1:]), "y": y, "latents": y}

    def decompress(self, strings: list[bytes], shape: tuple[int, int], quality: int, size: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`compress`: returns (1, 3, H, W) in [0, 1]."""
        from models.entropy_coding import decode_latent

        q = self._check_quality(quality)
        freqs, offsets, lengths = self.priors[q].tables()
        y = decode_latent(strings[0], (self.config.latent_channels, *shape), freqs, offsets, lengths)
        dev = next(self.parameters()).device
        return self.synthesise(torch.from_numpy(y).to(dev), q, size)

    # -- tables ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_tables(self) -> None:
        """(Re)build every level's integer probability tables; call after training."""
        for p in self.priors:
            p.build_tables()

    @property
    def has_tables(self) -> bool:
        return all(p.has_tables for p in self.priors)


def codec_identity(config: dict[str, Any], state_dict: dict[str, Tensor]) -> bytes:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:8]


def make_loss_fn(model: CodecBase):
    """:func:`models.codec_train.make_loss_fn` (here too, so each codec module offers its training loss)."""
    from models.codec_train import make_loss_fn as loss_fn

    return loss_fn(model)


def build_codec(config: dict[str, Any]) -> ImageCodec:
    return ImageCodec(CodecConfig.from_dict(config))


def load_codec_state(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load weights into a codec whose table buffers may differ in size from a fresh model's.

    Integer tables are built after training, so their shapes depend on the trained model:
    every buffer whose saved shape differs is replaced by one of the saved shape and dtype
    first. Floating tensors saved in another precision (e.g. float16 weights) are cast to
    the model's.
    """
    for key, buf in list(model.named_buffers()):
        saved = state_dict.get(key)
        if saved is not None and (saved.shape != buf.shape or (saved.dtype != buf.dtype and not saved.is_floating_point())):
            owner_name, _, name = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, name, torch.empty_like(saved, device=buf.device))
    model.load_state_dict(state_dict)
