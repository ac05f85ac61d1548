"""The image applications' base: what denoise, index and compress share.

An image application subclasses :class:`ImageApp` (``data = IMAGES``): its images are
listed and hashed at the door, then decoded, validated and normalised on the Dask client
into shards of the run (``tasks/apps/kinds.py: ImageData``, ``tasks/images.py``), and
the stages get an :class:`~tasks.apps.kinds.ImageContext`. This module adds the
convolutional model's configuration and what size images the network needs: a ``load.size``
below it is refused before any image is read, and smaller decoded images are refused by name
(or left out with ``--skip-bad``) by the loader.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from models.conv import ConvAEConfig, ConvAutoencoder
from tasks.apps.base import Application, Fitted
from tasks.apps.kinds import IMAGES
from tasks.config import Frozen, RunConfig
from tasks.errors import ConfigError, ModelMismatchError
from tasks.images import ImageLoadConfig


class ConvModelConfig(Frozen):
    """Convolutional autoencoder architecture (see ``models.conv.ConvAEConfig``)."""

    channels: tuple[int, ...] = Field((32, 64, 128), description="Width per resolution level; each level after the first halves the resolution.")
    latent_channels: int = Field(16, ge=1, le=4096, description="Channels of the code z.")
    blocks: int = Field(1, ge=1, le=8, description="3x3 convolutions per level.")
    skip: bool = Field(False, description="U-Net skip connections (restoration); off when the code must carry the image.")
    residual: bool = Field(False, description="Predict a correction added to the input.")
    activation: Literal["relu", "gelu", "silu", "leaky_relu", "elu"] = Field(
        "relu", description="Nonlinearity after every convolution (relu, gelu, silu, leaky_relu, elu).")
    norm: bool = Field(False, description="GroupNorm after every convolution, before its nonlinearity.")

    @field_validator("channels")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"channels must be widths >= 1, got {list(v)}")
        return v

    def build(self, in_channels: int) -> ConvAutoencoder:
        return ConvAutoencoder(
            ConvAEConfig(
                in_channels=in_channels,
                channels=tuple(self.channels),
                latent_channels=self.latent_channels,
                blocks=self.blocks,
                skip=self.skip,
                residual=self.residual,
                activation=self.activation,
                norm=self.norm,
            )
        )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class ImageRunConfig(RunConfig):
    """A run of an image application: image loading and a conv model replace the tabular sections."""

    load: ImageLoadConfig = ImageLoadConfig()
    model: ConvModelConfig = ConvModelConfig()
    UNUSED: ClassVar[dict[str, str]] = {
        "preprocess.scaler": "pixels are scaled to [0, 1]",
        "preprocess.max_categories": "images have no categorical columns",
    }


class ImageApp(Application):
    """Base of the image applications: the conv autoencoder and the image-size check."""

    data = IMAGES
    RunConfig: ClassVar[type[RunConfig]] = ImageRunConfig
    model_kind: ClassVar[str] = "conv"
    cli_options = (
        ("--skip-bad", "load.skip_bad", bool, "Leave out files that are not PNG/JPEG, do not decode or are smaller than "
         "the network needs instead of failing (named in a warning and the run's notes; listed with reasons in the "
         "manifest)."),
        ("--mode", "load.mode", str, "gray, rgb or keep (default keep): keep leaves grayscale (L) and RGB images as they are and "
         "converts the rest (grayscale with alpha -> L; RGBA, CMYK, palette -> RGB; 16-bit -> 8-bit), counted in the "
         "run's notes; transparency is composited on white (--set load.alpha=refuse refuses it)."),
    )

    def load(self, uri: str, device: torch.device) -> Fitted:
        """The model ``--model`` names; a run that applied another model (``--model`` with
        ``--apply-to``) and saved none of its own stands for the model it applied (its manifest's
        ``model_run``), so a day's apply run can be passed on as the model."""
        from tasks.storage import MODEL_DIR, RunDir, open_model_source

        source = open_model_source(uri)
        if isinstance(source, RunDir) and not source.exists(f"{MODEL_DIR}/config.json"):
            applied = source.manifest().model_run
            if applied:
                if source.app != self.name:
                    raise ModelMismatchError(f"{uri} is a run of the {source.app!r} application, not {self.name!r}")
                return super().load(applied, device)
        return super().load(uri, device)

    # Roles of the image sets (the data kind's input keys) as min_side and the messages name them.
    SIZE_ROLES: ClassVar[dict[str, str]] = {"input": "input", "apply_to": "apply-to", "reference": "reference"}

    @staticmethod
    def factor(config: RunConfig, fitted: Fitted | None = None) -> int:
        """The network's total downsampling: the reused model's (``--model``), else the configured model's."""
        model = getattr(fitted, "model", None)
        return int(getattr(model, "factor", 0) or config.model.factor)  # type: ignore[attr-defined]

    def min_side(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> int:
        """Smallest image side the network accepts for ``role`` (input, apply-to, reference). Images
        that are not a multiple of it are padded and cropped back (``models.conv``); smaller ones are refused
        (or left out with ``--skip-bad``) when they are decoded."""
        return self.factor(config, fitted)

    def too_small_for(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> str:
        """What :meth:`min_side` is the minimum of, for messages ("too small for ...")."""
        return f"the network, which downsamples by {self.factor(config, fitted)}"

    def size_setting_minimum(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> tuple[int, str]:
        """The smallest ``load.size`` for ``role`` and why: by default :meth:`min_side`, as every image is
        resized to it."""
        return self.min_side(config, role, fitted), self.too_small_for(config, role, fitted)

    def check_size_setting(self, config: RunConfig, roles: list[str], fitted: Fitted | None = None) -> None:
        """Refuse a ``load.size`` the network cannot take, before any image is read: every image is resized
        to it, so checking the decoded images named a file for what a setting did.

        Raises:
            ConfigError: (exit 2) naming the setting, its value and the minimum.
        """
        size = config.load.size  # type: ignore[attr-defined]
        if size is None:
            return
        flag = next((f for f, path, *_ in self.cli_options if path == "load.size"), None)
        setting = f"{flag} (load.size)" if flag else "load.size"
        for role in roles:
            need, why = self.size_setting_minimum(config, role, fitted)
            if size < need:
                raise ConfigError(self.size_setting_refusal(setting, size, role, need, why))

    def size_setting_refusal(self, setting: str, size: int, role: str, need: int, why: str) -> str:
        """The message refusing ``load.size`` ``size`` below ``need`` (:meth:`size_setting_minimum`)."""
        return (f"{setting} {size}: images resized to {size}x{size} are too small for {why}; "
                f"{role} images need at least {need}x{need}, so {setting} must be at least {need}")
