"""The image application interface: what denoise, index (and the learned codec) share.

An image application is registered like a tabular one (``@register``) and
declares ``kind = "image"``; the pipeline (``flows/pipeline.py: run_image_app``)
then runs: inspect (list + hash files) -> load (Dask: decode, validate,
normalise, shard) -> fit (train the conv autoencoder, or load ``--model``) ->
apply -> evaluate (with baselines) -> report -> manifest. Only ``fit``,
``apply``, ``evaluate`` and ``report`` differ between applications.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from prefect import task
from pydantic import Field, field_validator
from torch import nn

from models import build_model
from models.conv import ConvAEConfig, ConvAutoencoder
from models.training import TrainResult
from tasks.config import AppConfig, Frozen, RunConfig
from tasks.errors import InputError, ModelMismatchError
from tasks.images import ImageLoadConfig, ImageSet, ImageSource, load_images, read_images
from tasks.prefect_utils import IO_TASK
from tasks.storage import MODEL_DIR, RunDir


class ConvModelConfig(Frozen):
    """Convolutional autoencoder architecture (see ``models.conv.ConvAEConfig``)."""

    channels: tuple[int, ...] = Field((32, 64, 128), description="Width per resolution level; each level after the first halves the resolution.")
    latent_channels: int = Field(16, ge=1, le=4096, description="Channels of the code z.")
    blocks: int = Field(1, ge=1, le=8, description="3x3 convolutions per level.")
    skip: bool = Field(False, description="U-Net skip connections (restoration); off when the code must carry the image.")
    residual: bool = Field(False, description="Predict a correction added to the input.")
    activation: str = "relu"
    norm: bool = False

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


@dataclass
class ImageFitted:
    """A trained image model and the application's fitted state."""

    model: nn.Module
    state: dict[str, Any] = field(default_factory=dict)
    train: TrainResult | None = None
    source_run: str | None = None
    weights_hash: str | None = None


@dataclass
class ImageContext:
    """What an image application's methods get: config, run directory and the decoded images."""

    config: RunConfig
    run: RunDir
    train: ImageSet | None
    target: ImageSet | None
    reference: ImageSet | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Files that evaluate writes for people (plots, per-image tables): {name: relative path}.
    artifacts: dict[str, str] = field(default_factory=dict)
    # In-process results one stage hands to the next (e.g. index codes), never persisted.
    cache: dict[str, Any] = field(default_factory=dict)

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices into ``self.train``: deterministic by relative path and seed."""
        assert self.train is not None
        cfg = self.config.preprocess
        val = np.array(
            [_unit_hash(f"{cfg.split_seed}:{rel}") < cfg.val_fraction for rel in self.train.rel], dtype=bool
        )
        if val.all():  # never leave nothing to train on
            val[0] = False
        idx = np.arange(len(self.train.rel))
        return idx[~val], idx[val]


def _unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64


# Common `aeflow run` options that mean something for images (the tabular column options do not).
IMAGE_COMMON_OPTIONS = (
    "input", "apply_to", "model", "output", "epochs", "batch_size", "lr", "patience", "seed", "device",
    "val_fraction", "dask_address", "run_id",
)


class ImageApp:
    """Base of the image applications. Subclasses set ``name``, ``Config``, ``RunConfig``
    and implement ``fit``, ``apply``, ``evaluate`` (and optionally ``report``)."""

    kind: ClassVar[str] = "image"
    name: ClassVar[str] = ""
    Config: ClassVar[type[AppConfig]] = AppConfig
    RunConfig: ClassVar[type[RunConfig]] = ImageRunConfig
    model_kind: ClassVar[str] = "conv"
    common_options: ClassVar[tuple[str, ...]] = IMAGE_COMMON_OPTIONS
    cli_options: ClassVar[tuple[tuple[str, str, type, str], ...]] = (
        ("--skip-bad", "load.skip_bad", bool, "Leave out files that do not decode (listed in the manifest) instead of failing."),
        ("--mode", "load.mode", str, "gray, rgb or keep: how image modes are normalised."),
    )

    # -- validation --------------------------------------------------------------------
    def min_side(self, config: RunConfig, role: str) -> int:
        """Smallest image side the network accepts for ``role`` (input, apply-to)."""
        return config.model.factor  # type: ignore[attr-defined]

    def check_sizes(self, config: RunConfig, imset: ImageSet, role: str, why: str = "the network") -> None:
        need = self.min_side(config, role)
        for rel, (_, h, w) in zip(imset.rel, imset.shapes, strict=True):
            if min(h, w) < need:
                raise InputError(
                    f"{imset.source_uri.rstrip('/')}/{rel} is {w}x{h} pixels, too small for {why}: "
                    f"{role} images need at least {need}x{need}"
                )

    # -- persistence --------------------------------------------------------------------
    def save(self, run: RunDir, fitted: ImageFitted) -> None:
        model = fitted.model
        run.save_model(
            getattr(model, "kind", self.model_kind),
            model.config.to_dict(),
            model.state_dict(),
            {
                "state": fitted.state,
                "train": {k: v for k, v in (fitted.train.to_dict() if fitted.train else {}).items() if k != "history"},
            },
        )
        fitted.weights_hash = run.read_json(f"{MODEL_DIR}/config.json").get("weights")

    def load(self, run: RunDir, device: torch.device) -> ImageFitted:
        """Rebuild a fitted model from a run's ``model/`` folder (no unpickling)."""
        meta, state_dict = run.load_model_files()
        if meta.get("app") != self.name:
            raise ModelMismatchError(f"{run.uri} holds a model of the {meta.get('app')!r} application, not {self.name!r}")
        model = build_model(meta["kind"], meta["config"])
        model.load_state_dict(state_dict)
        model.to(device).eval()
        return ImageFitted(model=model, state=meta.get("state", {}), source_run=run.uri, weights_hash=meta.get("weights"))

    # -- the application -----------------------------------------------------------------
    def fit(self, ctx: ImageContext) -> ImageFitted:
        raise NotImplementedError

    def apply(self, ctx: ImageContext, fitted: ImageFitted) -> dict[str, str]:
        raise NotImplementedError

    def evaluate(self, ctx: ImageContext, fitted: ImageFitted) -> Any:
        raise NotImplementedError

    def report(self, ctx: ImageContext, fitted: ImageFitted, evaluation: Any) -> dict[str, str]:
        return {}


def images_of(imset: ImageSet, idx: np.ndarray | None = None) -> list[np.ndarray]:
    images = read_images(imset)
    return images if idx is None else [images[i] for i in idx]


@task(name="load-images", task_run_name="load-images-{prefix}", **IO_TASK)
def load_images_task(source: ImageSource, load: ImageLoadConfig, run: RunDir, prefix: str) -> ImageSet:
    """Prefect task over :func:`load_images` (validation errors are not retried)."""
    return load_images(source, load, run=run, prefix=prefix)
