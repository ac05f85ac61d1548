"""What a training run is told and what it leaves: settings, per-epoch stats, the resumable state, the result.

Pure PyTorch. :class:`TrainState` is serialised as flat tensors (for safetensors) plus a
JSON-able dict: checkpoints never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Tensor, torch.Generator], Tensor]
"""``loss_fn(model, batch, generator) -> scalar loss``; the generator seeds any
corruption (noise, masks) so training is reproducible.

On CUDA, a loss function that sets the attribute ``device_rng = True`` receives a
:class:`DeviceGenerator` on the training device: it draws its large random tensors
with ``device=generator.device`` and its small host-side choices (a rotation, which
rows get which noise) from :func:`host_generator`. Other loss functions get the CPU
generator everywhere, as on CPU."""

CompileMode = Literal["off", "on", "auto"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser, batch, stopping and checkpoint settings for :func:`fit`.

    Attributes:
        batch_size: Samples per step; ``None`` = automatic: ``default_batch_size`` on CPU,
            :func:`auto_batch_size` on CUDA (with the learning rate scaled by
            ``sqrt(batch / default_batch_size)``, ramped up over the first epoch).
        default_batch_size: The batch ``lr`` is tuned for; the smallest automatic batch.
        compile: ``torch.compile`` the model: ``"off"``, ``"on"``, or ``"auto"`` (CUDA only,
            when the run's remaining steps, timed eagerly, would take >= COMPILE_PAYOFF_S).
        compile_mode: ``torch.compile`` mode; ``None`` = CUDA graphs ("reduce-overhead")
            for steps under CUDA_GRAPH_STEP_S, else "default".
        checkpoint_seconds: 0 = ``on_checkpoint`` after every epoch; N > 0 = at most one
            checkpoint per N seconds, at an epoch's end or within a long epoch (with the
            position in it), plus one when training finishes.
    """

    epochs: int = 100
    batch_size: int | None = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    min_delta: float = 1e-4
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 4096
    default_batch_size: int = 256
    compile: CompileMode = "auto"
    compile_mode: str | None = None
    checkpoint_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "eval_batch_size", "default_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None for automatic), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.compile not in ("off", "on", "auto"):
            raise ValueError(f"compile must be 'off', 'on' or 'auto', got {self.compile!r}")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    improved: bool
    seconds: float
    samples: int
    train_seconds: float = 0.0  # the optimiser steps alone (``seconds`` adds validation and checkpoints)


@dataclass
class TrainState:
    """Everything needed to continue training after an interruption.

    Serialised as flat tensors (for safetensors) plus a JSON-able dict, never pickled.
    ``epoch`` counts completed epochs; ``step > 0`` marks a checkpoint taken within
    epoch ``epoch + 1`` after ``step`` batches: resuming regenerates that epoch's batch
    order from ``epoch_generator_state`` (the generators at its start) and skips them.
    """

    epoch: int
    model: dict[str, Tensor]
    best_model: dict[str, Tensor]
    optimizer: dict[str, Any]
    best_val_loss: float
    best_epoch: int
    bad_epochs: int
    generator_state: Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    device_generator_state: Tensor | None = None
    step: int = 0
    running_loss: float = 0.0
    epoch_generator_state: Tensor | None = None
    epoch_device_generator_state: Tensor | None = None
    batch_size: int | None = None
    global_rng_state: Tensor | None = None  # torch's global RNG (dropout) on the training device
    lr_top: float | None = None  # the scaled learning rate after plateau halvings

    _OPTIONAL_TENSORS = ("device_generator_state", "epoch_generator_state", "epoch_device_generator_state",
                         "global_rng_state")

    def to_flat(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        for k, v in self.model.items():
            tensors[f"model.{k}"] = _detached(v)
        for k, v in self.best_model.items():
            tensors[f"best.{k}"] = _detached(v)
        opt_meta: dict[str, Any] = {"param_groups": self.optimizer["param_groups"], "scalars": {}}
        for idx, st in self.optimizer["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"opt.{idx}.{k}"] = _detached(v)
                else:
                    opt_meta["scalars"][f"{idx}.{k}"] = v
        tensors["generator_state"] = self.generator_state.clone()
        for name in self._OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.clone()
        meta = {
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "finished": self.finished,
            "optimizer": opt_meta,
            "step": self.step,
            "running_loss": self.running_loss,
            "batch_size": self.batch_size,
            "lr_top": self.lr_top,
        }
        # JSON round trip here so a non-serialisable value fails at save time, not at resume.
        return tensors, json.loads(json.dumps(meta))

    @classmethod
    def from_flat(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for k, v in meta["optimizer"]["scalars"].items():
            idx, name = k.split(".", 1)
            state.setdefault(int(idx), {})[name] = v
        batch_size = meta.get("batch_size")
        return cls(
            epoch=int(meta["epoch"]),
            model=model,
            best_model=best,
            optimizer={"state": state, "param_groups": meta["optimizer"]["param_groups"]},
            best_val_loss=float(meta["best_val_loss"]),
            best_epoch=int(meta["best_epoch"]),
            bad_epochs=int(meta["bad_epochs"]),
            generator_state=tensors["generator_state"],
            history=list(meta.get("history", [])),
            finished=bool(meta.get("finished", False)),
            step=int(meta.get("step", 0)),
            running_loss=float(meta.get("running_loss", 0.0)),
            batch_size=int(batch_size) if batch_size is not None else None,
            lr_top=float(meta["lr_top"]) if meta.get("lr_top") is not None else None,
            **{name: tensors.get(name) for name in cls._OPTIONAL_TENSORS},
        )


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    resumed_from_epoch: int
    device: str
    seconds: float
    train_samples_per_s: float
    history: list[EpochStats]
    batch_size: int = 0
    lr: float = 0.0  # after scaling for an automatic batch
    compiled: str = "off"  # "off", the torch.compile mode used, or why compiling was abandoned
    resumed: bool = False  # started from a checkpoint (seconds and samples/s are then this session's only)
    resumed_from_step: int = 0  # the step within epoch resumed_from_epoch + 1 it went on from

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(h) for h in self.history]
        return d


def _detached(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous().clone()
