"""Fully convolutional autoencoders for images, and the building blocks they share.

Pure PyTorch (plus numpy for patch sampling): no Prefect, fsspec or pandas.

- :class:`ConvAutoencoder` — encoder of strided convolutions down to a code ``z``
  with ``latent_channels`` channels at ``1 / factor`` of the resolution, and a
  mirrored decoder. Optional U-Net skips (``skip=True``, for restoration) and a
  residual output (``residual=True``: the decoder predicts a correction added to
  the input, as DnCNN does). Works on any image size: the input is padded to a
  multiple of :attr:`ConvAEConfig.factor` and the output cropped back.
- Inference on large images goes through :func:`models.image_ops.tiled_apply` (overlapping
  tiles blended with a tapered window: no visible seams, bounded memory).
- The blocks (:func:`conv_block`, :class:`Down`, :class:`Up`) are public so other image
  models reuse them; padding and training crops are in :mod:`models.image_ops`.

Images are float tensors ``(N, C, H, W)`` in ``[0, 1]``; uint8 batches are
converted by :func:`to_unit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.image_ops import pad_to_multiple
from models.training import host_generator

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


@dataclass(frozen=True)
class ConvAEConfig:
    """Shape of a :class:`ConvAutoencoder`.

    Attributes:
        in_channels: 1 (grayscale) or 3 (RGB); the output has the same channels.
        channels: Width of each resolution level, from full resolution down; every
            level after the first halves the resolution, so the code is at
            ``1 / 2**(len(channels) - 1)`` of the input size.
        latent_channels: Channels of the code ``z`` (a 1x1 projection of the deepest level).
        blocks: 3x3 convolutions per level (after the down/up-sampling step).
        skip: U-Net skip connections from encoder to decoder levels. Good for
            restoration; leave off when the code itself must carry the image (index).
        residual: Output ``x + decoder(...)`` (the network learns the correction).
        activation: One of :data:`ACTIVATIONS`.
        norm: GroupNorm after each convolution.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 16
    blocks: int = 1
    skip: bool = False
    residual: bool = False
    activation: str = "relu"
    norm: bool = False

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of widths >= 1, got {list(self.channels)}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def factor(self) -> int:
        """Total downsampling: inputs are padded to a multiple of it."""
        return 2 ** (len(self.channels) - 1)

    def code_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape ``(C, h, w)`` of the code of a ``height x width`` image."""
        f = self.factor
        return self.latent_channels, -(-height // f), -(-width // f)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvAEConfig:
        d = dict(d)
        d["channels"] = tuple(d.get("channels", ()))
        return cls(**d)


@dataclass
class ConvAEOutput:
    """What :meth:`ConvAutoencoder.forward` returns: the reconstruction and the code."""

    x_hat: Tensor
    z: Tensor


# ---------------------------------------------------------------------------------------
# Building blocks


def conv_block(c_in: int, c_out: int, n: int = 1, activation: str = "relu", norm: bool = False) -> nn.Sequential:
    """``n`` times (3x3 conv, optional GroupNorm, activation)."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1))
        if norm:
            layers.append(nn.GroupNorm(min(8, c_out), c_out))
        layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Down(nn.Module):
    """Halve the resolution with a strided 3x3 conv, then a conv block."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, activation: str = "relu", norm: bool = False) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.act = ACTIVATIONS[activation]()
        self.block = conv_block(c_out, c_out, n, activation, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.act(self.down(x)))


class Up(nn.Module):
    """Double the resolution (2x2 transposed conv), optionally concatenate a skip, then a conv block."""

    def __init__(self, c_in: int, c_out: int, c_skip: int = 0, n: int = 1, activation: str = "relu", norm: bool = False) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.act = ACTIVATIONS[activation]()
        self.block = conv_block(c_out + c_skip, c_out, n, activation, norm)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.act(self.up(x))
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


def to_unit(batch: Tensor) -> Tensor:
    """uint8 images to float in [0, 1]; float images pass through."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float()


# ---------------------------------------------------------------------------------------
# The model


class ConvAutoencoder(nn.Module):
    """Fully convolutional autoencoder; see the module docstring."""

    kind = "conv"

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__()
        self.config = config
        c, act, norm, n = config.channels, config.activation, config.norm, config.blocks
        self.stem = conv_block(config.in_channels, c[0], n, act, norm)
        self.downs = nn.ModuleList([Down(c[i], c[i + 1], n, act, norm) for i in range(len(c) - 1)])
        self.to_latent = nn.Conv2d(c[-1], config.latent_channels, 1)
        self.from_latent = nn.Sequential(nn.Conv2d(config.latent_channels, c[-1], 1), ACTIVATIONS[act]())
        self.ups = nn.ModuleList(
            [Up(c[i + 1], c[i], c[i] if config.skip else 0, n, act, norm) for i in reversed(range(len(c) - 1))]
        )
        self.head = nn.Conv2d(c[0], config.in_channels, 3, padding=1)
        if config.residual:
            # Start as the identity: the correction is learned from zero.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def factor(self) -> int:
        return self.config.factor

    def _encode_padded(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.stem(x)
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        return self.to_latent(h), skips

    def encode(self, x: Tensor) -> Tensor:
        """The code ``z`` ``(N, latent_channels, ceil(H/f), ceil(W/f))`` of images of any size."""
        x, _ = pad_to_multiple(to_unit(x), self.factor, "reflect")
        return self._encode_padded(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Images from codes (without skips; a model trained with ``skip=True`` needs ``forward``)."""
        h = self.from_latent(z)
        for up in self.ups:
            h = up(h)
        return self.head(h)

    def forward(self, x: Tensor) -> ConvAEOutput:
        x = to_unit(x)
        xp, (h0, w0) = pad_to_multiple(x, self.factor, "reflect")
        z, skips = self._encode_padded(xp)
        h = self.from_latent(z)
        for i, up in enumerate(self.ups):
            h = up(h, skips[-2 - i] if self.config.skip else None)
        out = self.head(h)
        if self.config.residual:
            out = xp + out
        return ConvAEOutput(x_hat=out[..., :h0, :w0], z=z)


def build_conv(config: dict[str, Any]) -> ConvAutoencoder:
    return ConvAutoencoder(ConvAEConfig.from_dict(config))


# ---------------------------------------------------------------------------------------
# Patches (tiled inference is models.image_ops.tiled_apply)


def augment(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Random flips and 90-degree rotations of a square patch batch (one draw per batch: cheap)."""
    host = host_generator(generator)  # host-side choices: no device synchronisation
    k = int(torch.randint(0, 4, (1,), generator=host))
    flip = bool(torch.randint(0, 2, (1,), generator=host))
    if k:
        batch = torch.rot90(batch, k, dims=(-2, -1))
    if flip:
        batch = batch.flip(-1)
    return batch


def reconstruction_loss(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
    """MSE between an (augmented) image batch and its reconstruction, in [0, 1] units."""
    x = augment(to_unit(batch), generator)
    return F.mse_loss(model(x).x_hat.float(), x)


reconstruction_loss.device_rng = True  # type: ignore[attr-defined]  # see models.training.LossFn


def latent_noise_loss(sigma: float) -> Callable[[nn.Module, Tensor, torch.Generator], Tensor]:
    """A :func:`reconstruction_loss` whose decoder sees the code with seeded Gaussian noise added.

    The noise has ``sigma`` times the batch's standard deviation of ``z`` (so shrinking the
    code cannot hide it): nearby codes must decode to similar images, which makes L2 distances
    between codes more meaningful for search. ``sigma = 0`` is :func:`reconstruction_loss`.
    Models with ``skip=True`` are refused (their decoder needs the encoder's skips).
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return reconstruction_loss

    def loss(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        if model.config.skip:
            raise ValueError("latent noise needs a model without skip connections")
        x = augment(to_unit(batch), generator)
        xp, (h0, w0) = pad_to_multiple(x, model.factor, "reflect")
        z, _ = model._encode_padded(xp)
        noise = torch.randn(z.shape, generator=generator, device=generator.device).to(z.device, z.dtype)
        out = model.decode(z + sigma * z.detach().std() * noise)
        if model.config.residual:
            out = xp + out
        return F.mse_loss(out[..., :h0, :w0].float(), x)

    loss.device_rng = True  # type: ignore[attr-defined]
    return loss
