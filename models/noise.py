"""Synthetic corruption for denoising autoencoders (seeded; torch only).

Every function takes images in [0, 1] and a CPU ``torch.Generator`` so training
and evaluation are reproducible; noise is drawn on the CPU and moved to the
images' device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.conv import augment, to_unit
from models.training import host_generator, host_to_device

NOISE_KINDS = ("gaussian", "salt_pepper", "mask")


@dataclass(frozen=True)
class NoiseConfig:
    """Which corruptions to train with; each sample gets one kind, drawn uniformly.

    Attributes:
        kinds: Subset of :data:`NOISE_KINDS`.
        sigma: Gaussian standard deviation in 0..255 units (25 means 25/255).
        sigma_max: When set, sigma is drawn uniformly from [sigma, sigma_max] per sample
            (a blind denoiser); else it is fixed.
        salt_pepper: Fraction of pixels set to 0 or 1.
        mask: Fraction of pixels set to 0 (random masking / dropout noise).
    """

    kinds: tuple[str, ...] = ("gaussian",)
    sigma: float = 25.0
    sigma_max: float | None = None
    salt_pepper: float = 0.05
    mask: float = 0.2

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in NOISE_KINDS]
        if not self.kinds or bad:
            raise ValueError(f"noise kinds must be a non-empty subset of {list(NOISE_KINDS)}, got {list(self.kinds)}")
        if self.sigma < 0 or (self.sigma_max is not None and self.sigma_max < self.sigma):
            raise ValueError(f"need 0 <= sigma <= sigma_max, got sigma={self.sigma}, sigma_max={self.sigma_max}")
        for name in ("salt_pepper", "mask"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        object.__setattr__(self, "kinds", tuple(self.kinds))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(like.device)


def gaussian(x: Tensor, sigma: Tensor | float, generator: torch.Generator) -> Tensor:
    """``x + sigma * N(0, 1)``; ``sigma`` in [0, 1] units, a float or one value per sample."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    if isinstance(sigma, Tensor):
        sigma = host_to_device(sigma, x.device).view(-1, *([1] * (x.dim() - 1)))
    return x + sigma * noise


def salt_pepper(x: Tensor, amount: float, generator: torch.Generator) -> Tensor:
    u = _rand(tuple(x.shape), generator, x)
    # masked_fill rather than boolean indexing: no device synchronisation on CUDA
    return x.masked_fill(u < amount / 2, 0.0).masked_fill((u >= amount / 2) & (u < amount), 1.0)


def mask(x: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    keep = (_rand(tuple(x.shape), generator, x) >= fraction).to(x.dtype)
    return x * keep


def corrupt(x: Tensor, cfg: NoiseConfig, generator: torch.Generator) -> Tensor:
    """Corrupt a batch: each sample gets one of ``cfg.kinds``."""
    n = x.shape[0]
    host = host_generator(generator)  # per-sample choices on the host, noise on the generator's device
    kinds = torch.randint(0, len(cfg.kinds), (n,), generator=host)
    out = x.clone()
    for i, kind in enumerate(cfg.kinds):
        sel = host_to_device((kinds == i).nonzero().flatten(), x.device)
        if len(sel) == 0:
            continue
        xs = x[sel]
        if kind == "gaussian":
            if cfg.sigma_max is not None:
                s = cfg.sigma + (cfg.sigma_max - cfg.sigma) * torch.rand(len(sel), generator=host)
                out[sel] = gaussian(xs, s / 255.0, generator)
            else:
                out[sel] = gaussian(xs, cfg.sigma / 255.0, generator)
        elif kind == "salt_pepper":
            out[sel] = salt_pepper(xs, cfg.salt_pepper, generator)
        else:
            out[sel] = mask(xs, cfg.mask, generator)
    return out


class DenoisingLoss:
    """``loss_fn(model, batch, generator)`` for :func:`models.training.fit`: augment, corrupt, MSE to clean."""

    device_rng = True  # noise drawn on the training device (see models.training.LossFn)

    def __init__(self, noise: NoiseConfig) -> None:
        self.noise = noise

    def __call__(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        clean = augment(to_unit(batch), generator)
        noisy = corrupt(clean, self.noise, generator)
        return F.mse_loss(model(noisy).x_hat.float(), clean)
