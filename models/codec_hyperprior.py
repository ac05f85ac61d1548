"""The mean-scale hyperprior codec (Ballé et al. 2018; Minnen et al. 2018 without the context model).

Pure PyTorch. On top of the factorized codec's transforms (:class:`models.codec.CodecBase`):

- a hyper-analysis ``h_a`` (latent ``y`` -> hyper-latent ``z``, stride 4) and a
  hyper-synthesis ``h_s`` (``z`` -> a mean and a log-scale per element of ``y``);
- ``z`` coded with a :class:`~models.entropy_models.FactorizedPrior` per quality level,
  ``y`` with a :class:`~models.entropy_models.GaussianConditional`: each element's mean is
  subtracted and the residual coded with the table of its (quantised) scale. With no
  serial context model, decoding stays parallel.
- variable rate as in the factorized codec: per-level gains on ``y`` (and on ``z``); the
  hyper-synthesis predicts the mean and scale of the *un-gained* latent, which the level's
  gain then scales, so ``h_a`` and ``h_s`` are shared by every level.

**Decoding agrees bit for bit across machines.** The decoder must pick exactly the table
the encoder picked for every element, and the tables are chosen from the hyper-synthesis'
output. After training, :meth:`HyperpriorCodec.update_tables` converts ``h_s`` to an
:class:`~models.codec_layers.IntegerConvStack`; encoder and decoder run that, on the CPU,
in exact integer arithmetic (float64 holding integers below 2**53, so no rounding happens
whatever the summation order, thread count or BLAS). From its integer output, only IEEE
operations that are correctly rounded everywhere follow (a multiplication and an addition by
saved float64 gain tables, comparisons with saved table thresholds): the table indices, the
means and so the decoded latent ``ŷ`` are identical on every machine. The synthesis
transform ``g_s`` decodes in the same exact arithmetic too (``g_s_int``, with the inverse GDNs
in integers and an exact integer square root; derived from the float weights on load, not
saved), on the model's device: the pixels are identical on every machine and device.
``forward`` (training, rate-distortion estimates) keeps the float transforms.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from models.codec import CodecBase, CodecConfig, CodecOutput, level_likelihoods
from models.codec_layers import GDN, IntegerConvStack, conv, deconv
from models.entropy_models import FactorizedPrior, GaussianConditional
from models.image_ops import pad_to_multiple

HYPER_STRIDE = 4  # z is at 1/4 of y's resolution
_SYNTHESIS_LOCK = threading.Lock()
# Fractional bits of the integer synthesis transform's activations (its inputs reach ~60, the limit is 2**22 / 2**14 = 256).
G_S_ACT_BITS = 14
# z's tables cover at most ±Z_RANGE (a trained z stays far inside; it bounds the tables' size).
Z_RANGE = 128
# Residuals beyond their scale table are escaped, not clamped; this bound only guards the coder.
MAX_RESIDUAL = 1 << 28


@dataclass(frozen=True)
class HyperpriorConfig(CodecConfig):
    """Shape, rate points and table settings of a :class:`HyperpriorCodec`.

    Attributes (beyond :class:`~models.codec.CodecConfig`'s):
        hyper_channels: Channels of ``z`` and width of ``h_a``/``h_s`` (default: ``channels``).
        scale_min, scale_max, scale_levels: The Gaussian's log-spaced scale grid (one table each).
        act_bits, weight_bits: Fixed point of the integer hyper-synthesis.
    """

    channels: int = 128
    latent_channels: int = 192
    hyper_channels: int | None = None
    scale_min: float = 0.11
    scale_max: float = 256.0
    scale_levels: int = 128
    act_bits: int = 10
    weight_bits: int = 12

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hyper_channels is None:
            object.__setattr__(self, "hyper_channels", self.channels)
        if self.hyper_channels < 1:
            raise ValueError(f"hyper_channels must be >= 1, got {self.hyper_channels}")


@dataclass
class HyperLatents:
    """What a hyperprior codec codes: the hyper-latent ``z`` (C_z, h/4, w/4) and the mean-removed
    residuals ``y`` (M, h, w) of the latent, both int32."""

    z: Tensor
    y: Tensor


class HyperpriorCodec(CodecBase):
    """Variable-rate mean-scale hyperprior codec (GDN transforms, per-level gains, Gaussian conditional)."""

    kind: ClassVar[str] = "hyperprior"
    factor: ClassVar[int] = CodecBase.stride * HYPER_STRIDE
    config: HyperpriorConfig

    def __init__(self, config: HyperpriorConfig) -> None:
        super().__init__(config)
        m, nh, q = config.latent_channels, int(config.hyper_channels or config.channels), config.levels
        self.h_a = nn.Sequential(conv(m, nh, 3, 1), nn.ReLU(), conv(nh, nh), nn.ReLU(), conv(nh, nh))
        self.h_s = nn.Sequential(deconv(nh, nh), nn.ReLU(), deconv(nh, nh), nn.ReLU(), conv(nh, 2 * m, 3, 1))
        init = torch.linspace(-0.5, 0.5, q).view(q, 1).expand(q, nh) if q > 1 else torch.zeros(1, nh)
        self.log_hyper_gain = nn.Parameter(init.clone())
        self.log_inv_hyper_gain = nn.Parameter(-init.clone())
        self.z_priors = nn.ModuleList(FactorizedPrior(nh, config.filters, search_range=Z_RANGE) for _ in range(q))
        self.gaussian = GaussianConditional(config.scale_min, config.scale_max, config.scale_levels)
        self.h_s_int = IntegerConvStack(
            [(True, nh, nh, 5, 2), (True, nh, nh, 5, 2), (False, nh, 2 * m, 3, 1)],
            act_bits=config.act_bits, weight_bits=config.weight_bits)
        # g_s in the same exact arithmetic, derived from the float weights when first needed (not saved:
        # the derivation is deterministic, so the weights file and the model's identity stay as they were)
        c_in = config.in_channels
        self.g_s_int = IntegerConvStack(
            [(True, m, config.channels, 5, 2), (True, config.channels, config.channels, 5, 2),
             (True, config.channels, config.channels, 5, 2), (True, config.channels, c_in, 5, 2)],
            act_bits=G_S_ACT_BITS, weight_bits=config.weight_bits, nonlinearity="igdn", persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.g_s_int.clear())
        # float64 snapshots of the gains, taken with the tables: what the exact decoder path uses.
        self.register_buffer("gain_table", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("inv_gain_table", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("log_gain_table", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("inv_hyper_gain_table", torch.zeros(0, dtype=torch.float64))

    # -- shapes ----------------------------------------------------------------------------
    @staticmethod
    def hyper_shape(shape: tuple[int, int]) -> tuple[int, int]:
        """The hyper-latent's (h, w) for a latent of (h, w)."""
        return -(-shape[0] // HYPER_STRIDE), -(-shape[1] // HYPER_STRIDE)

    def _hyper_gains(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.exp(self.log_hyper_gain[quality])[:, :, None, None],
                torch.exp(self.log_inv_hyper_gain[quality])[:, :, None, None])

    # -- training / evaluation forward ------------------------------------------------------
    def forward(self, x: Tensor, quality: Tensor | int) -> CodecOutput:
        """As :meth:`models.codec.ImageCodec.forward` (one level or a (B,) tensor of levels), with the
        likelihoods of ``y`` under the Gaussian conditional and of ``z`` under its level's prior."""
        quality = self._quality_tensor(quality, x.shape[0], x.device)
        xp, (h, w) = pad_to_multiple(x, self.stride)
        y = self.g_a(xp)
        y_hat, likelihoods = self.entropy_forward(y, quality)
        x_hat = self.g_s(y_hat * self._gains(quality)[1])[..., :h, :w]
        if not self.training:
            x_hat = x_hat.clamp(0, 1)
        return CodecOutput(x_hat=x_hat, likelihoods=likelihoods, y_hat=y_hat)

    def entropy_forward(self, y: Tensor, quality: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The entropy side of :meth:`forward`, from the analysis transform's (un-gained) latent ``y``:
        the gained latent as decoded (``ŷ``, straight-through rounding when training) and the
        likelihoods of ``y`` and ``z``.

        Nothing here feeds the distortion except through ``ŷ``'s straight-through rounding, whose
        gradient reaches ``y`` only: ``h_a``, ``h_s``, the ``z`` priors and the hyper gains learn from
        the rate alone, which is what training them on latents computed once relies on
        (``benchmarks/train_codec.py --entropy-only``).
        """
        g, _ = self._gains(quality)
        y_g = y * g
        hg, ihg = self._hyper_gains(quality)
        z_g = self.h_a(pad_to_multiple(y, HYPER_STRIDE)[0]) * hg
        if self.training:
            z_noisy = z_g + torch.empty_like(z_g).uniform_(-0.5, 0.5)
            z_hat = z_g + (torch.round(z_g) - z_g).detach()
        else:
            z_noisy = z_hat = torch.round(z_g)
        lik_z = level_likelihoods(self.z_priors, z_noisy, quality)
        log_scale_y, mean_y = self.h_s(z_hat * ihg)[..., : y.shape[-2], : y.shape[-1]].chunk(2, 1)
        mean = mean_y * g
        scale = self.gaussian.scale_from_log(log_scale_y + self.log_gain[quality][:, :, None, None])
        if self.training:
            y_noisy = y_g + torch.empty_like(y_g).uniform_(-0.5, 0.5)
            y_hat = y_g + (torch.round(y_g - mean) + mean - y_g).detach()
        else:
            y_noisy = y_hat = torch.round(y_g - mean) + mean
        lik_y = self.gaussian.likelihood(y_noisy, mean, scale)
        return y_hat, {"y": lik_y, "z": lik_z}

    # -- the exact decoder-side path ------------------------------------------------------------
    def hyper_decode(self, z: Tensor, quality: int, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """From the integer hyper-latent (C_z, h/4, w/4): the means, log-scales and table indices of ``y``.

        Exact on every machine (see the module docstring): returns float64 means (M, h, w)
        and log-scales of the gained latent, and int64 table indices, all on the CPU.
        """
        q = self._check_quality(quality)
        one = float(1 << self.config.act_bits)
        inv_hyper_gain = self.inv_hyper_gain_table[q].cpu().view(1, -1, 1, 1)
        a = torch.round(z.detach().to("cpu", torch.float64).unsqueeze(0) * inv_hyper_gain * one)
        out = self.h_s_int(a)[0, :, : shape[0], : shape[1]] / one
        m = self.config.latent_channels
        log_scale = out[:m] + self.log_gain_table[q].cpu().view(-1, 1, 1)
        mean = out[m:] * self.gain_table[q].cpu().view(-1, 1, 1)
        return mean, log_scale, self.gaussian.index(log_scale)

    # -- inference -------------------------------------------------------------------------------
    def _require_tables(self) -> None:
        if not self.has_tables:
            raise RuntimeError("the entropy models have no integer tables: call update_tables() after training")

    def analyse(self, x: Tensor, quality: int) -> HyperLatents:
        """Image (1, 3, H, W) in [0, 1] -> the integer ``z`` and mean-removed ``y`` residuals that get coded."""
        return self._analyse(x, quality)[0]

    @torch.inference_mode()
    def _analyse(self, x: Tensor, quality: int) -> tuple[HyperLatents, Tensor]:
        """:meth:`analyse` and the table index of every residual."""
        q = self._check_quality(quality)
        self._require_tables()
        xp, _ = pad_to_multiple(x, self.stride)
        qt = torch.tensor([q], device=x.device)
        y = self._analysis(xp)
        y_g = (y * self._gains(qt)[0])[0]
        z_g = (self.h_a(pad_to_multiple(y, HYPER_STRIDE)[0]) * self._hyper_gains(qt)[0])[0]
        z = self.z_priors[q].clamp_to_tables(torch.round(z_g).cpu())
        mean, _, index = self.hyper_decode(z, q, tuple(y_g.shape[-2:]))
        residual = torch.round(y_g.to("cpu", torch.float64) - mean).clamp(-MAX_RESIDUAL, MAX_RESIDUAL)
        return HyperLatents(z=z, y=residual.to(torch.int32)), index

    @torch.inference_mode()
    def synthesise(self, latents: HyperLatents, quality: int, size: tuple[int, int]) -> Tensor:
        """Integer latents -> image (1, 3, H, W) in [0, 1] (the decoder after entropy decoding)."""
        q = self._check_quality(quality)
        mean, _, _ = self.hyper_decode(latents.z, q, tuple(latents.y.shape[-2:]))
        return self._synthesise(latents.y, mean, q, size)

    def _synthesise(self, residual: Tensor, mean: Tensor, q: int, size: tuple[int, int]) -> Tensor:
        """The decoded latent through the integer synthesis transform (exact: the same pixels on every
        machine and device), on the model's device; returns float32 (1, 3, H, W) in [0, 1]."""
        y_hat = (residual.to(torch.float64) + mean) * self.inv_gain_table[q].cpu().view(-1, 1, 1)
        if not self.g_s_int.ready:
            with _SYNTHESIS_LOCK:  # threads decoding with one model (a Dask worker's) derive it once
                if not self.g_s_int.ready:
                    self._quantise_synthesis()
        one = float(1 << G_S_ACT_BITS)
        dev = next(self.parameters()).device
        x_int = self._synthesis(lambda a: self.g_s_int(a, device=dev), torch.round(y_hat * one).unsqueeze(0))
        return (x_int[..., : size[0], : size[1]] / one).clamp(0, 1).to(torch.float32)

    @torch.no_grad()
    def _quantise_synthesis(self) -> None:
        layers = [mod for mod in self.g_s if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
        self.g_s_int.quantise_from(layers, [mod for mod in self.g_s if isinstance(mod, GDN)])

    @torch.inference_mode()
    def estimate_bits(self, latents: HyperLatents, quality: int) -> float:
        """Bits the continuous entropy models assign to coded latents: ``z`` under its prior, ``y``
        under the Gaussian with the unquantised predicted scale (the tables' cost is the payload)."""
        q = self._check_quality(quality)
        prior = self.z_priors[q]
        dev = prior.matrices[0].device
        bits_z = -torch.log2(prior.likelihood(latents.z.float().unsqueeze(0).to(dev))).sum()
        mean, log_scale, _ = self.hyper_decode(latents.z, q, tuple(latents.y.shape[-2:]))
        scale = torch.exp(log_scale).clamp_min(self.gaussian.scale_min)
        lik = self.gaussian.likelihood(latents.y.to(torch.float64), torch.zeros_like(mean), scale)
        return float(bits_z.cpu()) + float(-torch.log2(lik).sum())

    def compress(self, x: Tensor, quality: int, refine_steps: int = 0, on_step: Any = None) -> dict[str, Any]:
        """Image (1, 3, H, W) in [0, 1] -> ``{"strings": [payload], "shape": (h, w), "latents": HyperLatents}``.

        The payload is one range-coder stream: ``z`` channel by channel with its level's
        tables, then ``y``'s residuals grouped by scale table.
        """
        from models.entropy_coding import StreamEncoder

        if refine_steps:
            raise ValueError("latent refinement is not implemented for the hyperprior codec (use refine_steps=0)")
        q = self._check_quality(quality)
        latents, index = self._analyse(x, q)
        enc = StreamEncoder()
        enc.encode_channels(latents.z.numpy(), *self.z_priors[q].tables())
        enc.encode_indexed(latents.y.numpy(), index.numpy(), *self.gaussian.tables())
        return {"strings": [enc.payload()], "shape": tuple(latents.y.shape[-2:]), "latents": latents}

    def decompress(self, strings: list[bytes], shape: tuple[int, int], quality: int, size: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`compress`: returns (1, 3, H, W) in [0, 1]."""
        from models.entropy_coding import StreamDecoder

        q = self._check_quality(quality)
        self._require_tables()
        dec = StreamDecoder(strings[0])
        zh, zw = self.hyper_shape(shape)
        z = torch.from_numpy(dec.decode_channels((self.config.hyper_channels, zh, zw), *self.z_priors[q].tables()))
        with torch.inference_mode():
            mean, _, index = self.hyper_decode(z, q, shape)
        residual = torch.from_numpy(dec.decode_indexed(index.numpy(), *self.gaussian.tables()))
        with torch.inference_mode():
            return self._synthesise(residual, mean, q, size)

    # -- tables ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_tables(self) -> None:
        """Build the integer tables, the integer hyper-synthesis and the gain snapshots; call after training."""
        for p in self.z_priors:
            p.build_tables()
        self.gaussian.build_tables()
        layers = [mod for mod in self.h_s if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
        self.h_s_int.quantise_from(layers)
        self._quantise_synthesis()
        log_gain = self.log_gain.detach().to("cpu", torch.float64)
        self.log_gain_table = log_gain
        self.gain_table = torch.exp(log_gain)
        self.inv_gain_table = torch.exp(self.log_inv_gain.detach().to("cpu", torch.float64))
        self.inv_hyper_gain_table = torch.exp(self.log_inv_hyper_gain.detach().to("cpu", torch.float64))

    @property
    def has_tables(self) -> bool:
        return (all(p.has_tables for p in self.z_priors) and self.gaussian.has_tables and self.h_s_int.ready
                and self.gain_table.numel() > 0)


def make_loss_fn(model: CodecBase):
    """:func:`models.codec_train.make_loss_fn` (here too, so each codec module offers its training loss)."""
    from models.codec_train import make_loss_fn as loss_fn

    return loss_fn(model)


def build_hyperprior(config: dict[str, Any]) -> HyperpriorCodec:
    return HyperpriorCodec(HyperpriorConfig.from_dict(config))


__all__ = ["HyperLatents", "HyperpriorCodec", "HyperpriorConfig", "build_hyperprior"]
