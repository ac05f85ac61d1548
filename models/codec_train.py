"""Training helpers of the learned codecs: the ``R + λ·D`` loss, the loss function for
:func:`models.training.fit`, and function-preserving model surgery (widening a codec,
starting a hyperprior codec from a trained factorized one).

Pure PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.codec import (
    CodecBase,
    CodecConfig,
    CodecOutput,
    ImageCodec,
    load_codec_state,
)
from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig
from models.codec_layers import GDN
from models.image_ops import pad_to_multiple


class RateDistortionLoss(nn.Module):
    """``R + λ·D`` per sample: bits per pixel plus λ·255²·MSE, λ by each sample's level.

    Returns the mean over the batch; :attr:`last` keeps the parts for logging, as detached
    tensors on the loss's device (``float()`` them to log: a conversion here would make the host
    wait for the device at every training step).
    """

    def __init__(self, lambdas: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("lambdas", torch.tensor(lambdas, dtype=torch.float32), persistent=False)
        self.last: dict[str, Tensor] = {}

    def forward(self, out: CodecOutput, x: Tensor, quality: Tensor) -> Tensor:
        b, _, h, w = x.shape
        bits = sum(-torch.log2(l).reshape(b, -1).sum(1) for l in out.likelihoods.values())
        bpp = bits / (h * w)
        mse = F.mse_loss(out.x_hat.float(), x.float(), reduction="none").reshape(b, -1).mean(1)
        if self.lambdas.device != x.device:  # once: a copy from the host each step would wait for the device
            self.lambdas = self.lambdas.to(x.device)
        lam = self.lambdas[quality]
        loss = (bpp + lam * (255.0**2) * mse).mean()
        self.last = {"bpp": bpp.mean().detach(), "mse": mse.mean().detach()}
        return loss


def make_loss_fn(model: CodecBase):
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
        quality = (torch.arange(len(x), device=x.device) + offset) % levels  # made on the device: no copy, no wait
        return criterion(m(x, quality), x, quality)

    return loss_fn


def transforms_in_bf16(model: CodecBase, device_type: str = "cuda") -> None:
    """Run ``model``'s analysis and synthesis transforms under bf16 autocast, their outputs back in float32.

    A training-speed option (``benchmarks/train_codec.py --bf16-transforms``): the convolutions, nearly all
    of a step's arithmetic, run on bf16 tensor cores; the entropy models, gains and the loss stay in float32,
    and so do the weights. Applied to this instance only (its ``g_a``/``g_s`` forward); the weights file,
    coding and decoding are unaffected.
    """
    for name in ("g_a", "g_s"):
        module = getattr(model, name)
        forward = module.forward

        def in_bf16(x: Tensor, forward=forward) -> Tensor:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return forward(x).float()

        module.forward = in_bf16


def make_rate_loss_fn(model: HyperpriorCodec):
    """A ``loss_fn(model, latents, generator)`` for a hyperprior's entropy side alone.

    ``latents`` are (B, M, h, w) outputs of the analysis transform (un-gained; crops of
    ``h·stride × w·stride`` pixels); the loss is their bits per pixel under
    :meth:`~models.codec_hyperprior.HyperpriorCodec.entropy_forward`, every batch covering the
    quality levels in turn as in :func:`make_loss_fn`. With the transforms and gains fixed this is
    the whole of what ``h_a``, ``h_s``, the ``z`` priors and the hyper gains learn from ``R + λ·D``
    (the distortion does not depend on them).
    """
    levels = model.config.levels
    stride = model.stride

    def loss_fn(m: nn.Module, latents: Tensor, generator: torch.Generator) -> Tensor:
        offset = int(torch.randint(levels, (1,), generator=generator))
        quality = (torch.arange(len(latents), device=latents.device) + offset) % levels
        _, likelihoods = m.entropy_forward(latents, quality)  # type: ignore[operator]
        b = len(latents)
        bits = sum(-torch.log2(lik).reshape(b, -1).sum(1) for lik in likelihoods.values())
        return (bits / (latents.shape[-2] * latents.shape[-1] * stride * stride)).mean()

    return loss_fn


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


def interpolate_gains(log_gain: Tensor, lambdas: tuple[float, ...], new_lambdas: tuple[float, ...]) -> Tensor:
    """Per-channel log-gains (Q, C) at ``lambdas`` carried to ``new_lambdas``: piecewise linear in log λ,
    extended linearly beyond the ends (a new top level gets a finer quantisation step)."""
    old_x = torch.tensor([float(l) for l in lambdas], dtype=torch.float64).log()
    new_x = torch.tensor([float(l) for l in new_lambdas], dtype=torch.float64).log()
    if len(lambdas) == 1:
        return log_gain[:1].expand(len(new_lambdas), -1).clone()
    seg = (torch.searchsorted(old_x, new_x) - 1).clamp(0, len(lambdas) - 2)
    x0, x1 = old_x[seg], old_x[seg + 1]
    t = ((new_x - x0) / (x1 - x0)).to(log_gain.dtype).unsqueeze(1)
    return log_gain[seg] + t * (log_gain[seg + 1] - log_gain[seg])


@torch.no_grad()
def hyperprior_from_factorized(model: ImageCodec, config: HyperpriorConfig, seed: int = 0) -> HyperpriorCodec:
    """A hyperprior codec whose transforms and gains start as a trained factorized codec's.

    ``g_a``, ``g_s`` and the latent's per-level gains are copied (gains interpolated in log λ
    when ``config.lambdas`` differ); the hyper-analysis, hyper-synthesis, hyper-gains and
    ``z``'s priors start fresh (seeded by ``seed``). The factorized priors are dropped: the
    hyperprior predicts the latent's distribution instead.
    """
    old = model.config
    if (config.channels, config.latent_channels, config.in_channels) != (old.channels, old.latent_channels,
                                                                         old.in_channels):
        raise ValueError(f"transform shapes differ: factorized N={old.channels}, M={old.latent_channels}, "
                         f"hyperprior N={config.channels}, M={config.latent_channels}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        new = HyperpriorCodec(config)
    state = new.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(("g_a.", "g_s.")):
            state[k] = v.clone()
    for name in ("log_gain", "log_inv_gain"):
        state[name] = interpolate_gains(getattr(model, name).detach(), old.lambdas, config.lambdas)
    load_codec_state(new, state)
    return new


@torch.no_grad()
def calibrate_hyperprior(model: HyperpriorCodec, x: Tensor, weight_scale: float = 0.1,
                         z_scale: float = 1.0, prior_steps: int = 300) -> dict[str, float]:
    """Start the hyper-synthesis at a per-channel Gaussian fitted to the latents of ``x`` (B, 3, H, W).

    The output layer's biases get each channel's mean and log standard deviation of the
    un-gained latent ``y = g_a(x)``, and its weights are scaled by ``weight_scale``: before any
    training the model then codes ``y`` about as a per-channel Gaussian would, instead of with
    the arbitrary scales of a random network, and training refines the prediction from ``z``.
    ``z_scale`` scales the hyper-analysis' output layer (below 1: ``z`` starts near zero), and
    each level's ``z`` prior is fitted to the resulting ``z`` for ``prior_steps`` Adam steps.
    Returns the latent's mean standard deviation and |mean|, and ``z``'s standard deviation (for the log).
    """
    y = model.g_a(pad_to_multiple(x, model.stride)[0])
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    last = model.h_s[-1]
    m = model.config.latent_channels
    last.weight.mul_(weight_scale)
    last.bias[:m] = std.log()
    last.bias[m:] = mean
    if z_scale != 1.0:  # a small z: side information costs almost nothing until it proves useful
        model.h_a[-1].weight.mul_(z_scale)
        model.h_a[-1].bias.mul_(z_scale)
    z = model.h_a(pad_to_multiple(y, 4)[0])
    bits = _fit_priors(model, z, prior_steps)
    return {"latent_std": float(std.mean()), "latent_abs_mean": float(mean.abs().mean()), "z_std": float(z.std()),
            "z_bits_per_element": bits}


def _fit_priors(model: HyperpriorCodec, z: Tensor, steps: int) -> float:
    """Fit each level's ``z`` prior to the (gained, noisy) hyper-latents ``z``; returns the final bits per element.

    A fresh prior is wide (Ballé's initialisation): it would charge several bits for every element
    of a ``z`` that is still all zeros, far more than the side information is worth.
    """
    bits = 0.0
    with torch.enable_grad():
        for q, prior in enumerate(model.z_priors):
            zq = (z * torch.exp(model.log_hyper_gain[q]).view(1, -1, 1, 1)).detach()
            opt = torch.optim.Adam(prior.parameters(), lr=0.01)
            for _ in range(steps):
                loss = -torch.log2(prior.likelihood(zq + torch.empty_like(zq).uniform_(-0.5, 0.5))).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            bits += float(loss.detach()) / len(model.z_priors)
    return bits
