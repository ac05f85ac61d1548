"""Training and inference loops shared by every aeflow autoencoder.

Pure PyTorch (no Prefect, fsspec or pandas): storage and progress display are
callbacks the caller passes in, so the same loop runs in a Prefect task, a
benchmark or a GPU check that has only torch installed.

The loop is deliberately lean: data is indexed with a seeded ``randperm`` rather
than a ``DataLoader`` (tabular rows and image patches are already tensors), the
model is checkpointed once per epoch through ``on_checkpoint``, and the best
weights by validation loss are restored at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Tensor, torch.Generator], Tensor]
"""``loss_fn(model, batch, generator) -> scalar loss``; the generator seeds any
corruption (noise, masks) so training is reproducible."""


def reconstruction_loss(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
    """Mean squared reconstruction error, the plain autoencoder objective."""
    return F.mse_loss(model(batch).x_hat.float(), batch.float())


def select_device(preference: str = "auto") -> torch.device:
    """Pick the training device: CUDA when present, else CPU; ``preference`` overrides.

    Args:
        preference: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: if CUDA is asked for and is not available.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available here")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and stopping settings for :func:`fit`."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    min_delta: float = 1e-4
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    improved: bool
    seconds: float
    samples: int


@dataclass
class TrainState:
    """Everything needed to continue training after an interruption.

    Serialised as flat tensors (for safetensors) plus a JSON-able dict, never pickled.
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
        meta = {
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "finished": self.finished,
            "optimizer": opt_meta,
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(h) for h in self.history]
        return d


def _detached(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_tensor(data: Tensor | np.ndarray) -> Tensor:
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if data.dtype == torch.float64:
        data = data.float()
    return data


def _place(data: Tensor, device: torch.device) -> Tensor:
    """Keep the dataset on the device when it comfortably fits; else stream batches."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if data.element_size() * data.nelement() < free // 4:
            return data.to(device)
    return data


@torch.inference_mode()
def evaluate_loss(
    model: nn.Module,
    data: Tensor,
    loss_fn: LossFn,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> float:
    """Average ``loss_fn`` over ``data`` in eval mode, with a fixed corruption seed."""
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    total, n = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size].to(device, non_blocking=True)
        with _autocast(device):
            loss = loss_fn(model, batch, gen)
        total += float(loss) * len(batch)
        n += len(batch)
    return total / max(n, 1)


def fit(
    model: nn.Module,
    train: Tensor | np.ndarray,
    val: Tensor | np.ndarray,
    settings: TrainSettings,
    *,
    loss_fn: LossFn = reconstruction_loss,
    resume: TrainState | None = None,
    on_epoch: Callable[[EpochStats, int], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` with Adam and early stopping on the validation loss.

    Args:
        model: Any module; ``loss_fn`` decides how it is called.
        train: Training samples, first dimension is the sample axis.
        val: Validation samples (may be empty: then the training loss drives
            early stopping).
        settings: Optimiser, epochs, patience, seed and device.
        loss_fn: ``loss_fn(model, batch, generator)``.
        resume: A state saved by ``on_checkpoint`` in an interrupted run; training
            continues from its epoch with the same optimiser and RNG state.
        on_epoch: Called after each epoch with its stats and the epoch budget.
        on_checkpoint: Called after each epoch with the full state to persist.
        on_batch: Called after each step with (step in epoch, steps per epoch).

    Returns:
        A :class:`TrainResult`; the model holds the best weights by validation loss.
    """
    device = select_device(settings.device)
    torch.manual_seed(settings.seed)
    model.to(device)
    train_t = _place(_to_tensor(train), device)
    val_t = _place(_to_tensor(val), device)
    if len(train_t) == 0:
        raise ValueError("no training samples")
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)

    start_epoch = 0
    best_val = math.inf
    best_epoch = 0
    bad_epochs = 0
    best_state = {k: _detached(v) for k, v in model.state_dict().items()}
    history: list[EpochStats] = []
    finished = False
    if resume is not None:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        gen.set_state(resume.generator_state)
        start_epoch = resume.epoch
        best_val, best_epoch, bad_epochs = resume.best_val_loss, resume.best_epoch, resume.bad_epochs
        best_state = {k: v.clone() for k, v in resume.best_model.items()}
        history = [EpochStats(**h) for h in resume.history]
        finished = resume.finished

    n = len(train_t)
    bs = min(settings.batch_size, n)
    steps = n // bs
    t0 = time.perf_counter()
    train_seconds = 0.0
    samples = 0
    epoch = start_epoch
    while not finished and epoch < settings.epochs:
        epoch += 1
        model.train()
        te = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        running = torch.zeros((), device=device)
        # Drop the ragged last batch (BatchNorm needs > 1 sample; the permutation changes each epoch).
        for step in range(steps):
            idx = perm[step * bs : (step + 1) * bs]
            batch = train_t[idx.to(train_t.device)].to(device, non_blocking=True)
            with _autocast(device):
                loss = loss_fn(model, batch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            if on_batch is not None:
                on_batch(step + 1, steps)
        train_loss = float(running) / steps
        epoch_samples = steps * bs
        train_seconds += time.perf_counter() - te
        samples += epoch_samples
        if len(val_t):
            val_loss = evaluate_loss(model, val_t, loss_fn, device, settings.eval_batch_size, settings.seed)
        else:
            val_loss = train_loss
        improved = best_val - val_loss > settings.min_delta * abs(best_val) if math.isfinite(best_val) else True
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch}; lower the learning rate")
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: _detached(v) for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        stats = EpochStats(epoch, train_loss, val_loss, best_val, improved, time.perf_counter() - te, epoch_samples)
        history.append(stats)
        finished = bad_epochs >= settings.patience or epoch >= settings.epochs
        if on_checkpoint is not None:
            on_checkpoint(
                TrainState(
                    epoch=epoch,
                    model={k: _detached(v) for k, v in model.state_dict().items()},
                    best_model=best_state,
                    optimizer=opt.state_dict(),
                    best_val_loss=best_val,
                    best_epoch=best_epoch,
                    bad_epochs=bad_epochs,
                    generator_state=gen.get_state(),
                    history=[asdict(h) for h in history],
                    finished=finished,
                )
            )
        if on_epoch is not None:
            on_epoch(stats, settings.epochs)

    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        stopped_early=bad_epochs >= settings.patience and epoch < settings.epochs,
        resumed_from_epoch=start_epoch,
        device=describe_device(device),
        seconds=time.perf_counter() - t0,
        train_samples_per_s=samples / train_seconds if train_seconds > 0 else 0.0,
        history=history,
    )


@torch.inference_mode()
def predict(
    fn: Callable[[Tensor], Tensor],
    data: Tensor | np.ndarray,
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Apply ``fn`` (e.g. ``model.encode``) to ``data`` in batches; returns float32 numpy.

    The caller puts the model in eval mode on ``device``.
    """
    device = torch.device(device)
    data_t = _to_tensor(data)
    outs: list[np.ndarray] = []
    for start in range(0, len(data_t), batch_size):
        batch = data_t[start : start + batch_size].to(device, non_blocking=True)
        with _autocast(device):
            out = fn(batch)
        outs.append(out.float().cpu().numpy())
    if not outs:
        return fn(data_t[:0].to(device)).float().cpu().numpy()
    return np.concatenate(outs, axis=0)
