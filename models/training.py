"""Training and inference loops shared by every aeflow autoencoder.

Pure PyTorch (no Prefect, fsspec or pandas): storage and progress display are
callbacks the caller passes in, so the same loop runs in a Prefect task, a
benchmark or a GPU check that has only torch installed.

The loop is written once for every data source: :func:`fit` draws its minibatches
from a :class:`BatchSource` — tensors in memory (:class:`TensorSource`, indexed with
a seeded ``randperm`` rather than a ``DataLoader``: tabular rows and image patches are
already tensors) or a stream read in the background (``tasks.streaming``). The model
is checkpointed through ``on_checkpoint`` (every epoch, or at most every
``checkpoint_seconds`` and then also within long epochs, with the position in the
epoch), and the best weights by validation loss are restored at the end.

On CUDA the loop does no per-step host work beyond launching kernels: the data stays
on the device when it fits (permutation and gathering there too), losses are summed
on the device, progress callbacks are throttled, Adam is fused, bf16 autocast is on,
convolutional models run channels-last, and ``torch.compile`` (with CUDA graphs for
short steps) is used when the run is long enough to repay it. The batch size, when
not given, is chosen to fill the device (:func:`auto_batch_size`) with the learning
rate scaled by ``sqrt(batch / default_batch_size)``. On CPU the loop computes exactly
what it always did (same batches, same random draws, same optimiser).
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("aeflow.training")

LossFn = Callable[[nn.Module, Tensor, torch.Generator], Tensor]
"""``loss_fn(model, batch, generator) -> scalar loss``; the generator seeds any
corruption (noise, masks) so training is reproducible.

On CUDA, a loss function that sets the attribute ``device_rng = True`` receives a
:class:`DeviceGenerator` on the training device: it draws its large random tensors
with ``device=generator.device`` and its small host-side choices (a rotation, which
rows get which noise) from :func:`host_generator`. Other loss functions get the CPU
generator everywhere, as on CPU."""

# Progress callbacks (on_batch) are called at most this often, and on an epoch's last step.
PROGRESS_EVERY_S = 0.5
# compile="auto": steps [PROBE_START, PROBE_END) of the run are timed (one synchronisation
# at each end) to decide whether compiling repays itself.
PROBE_START, PROBE_END = 5, 25
# Compile when the rest of the run, at the timed eager speed, would take at least this long:
# compilation costs ~20-60 s and saves a third to a half of the step time.
COMPILE_PAYOFF_S = 120.0
# A learning rate scaled up for an automatic batch is halved after this many epochs without
# improvement (at most a third of `patience`): large-batch Adam oscillates at the end of training.
LR_PLATEAU_EPOCHS = 3
# Steps shorter than this (eager) are dominated by kernel launches: compile with CUDA graphs.
CUDA_GRAPH_STEP_S = 0.005
# auto_batch_size: one step should keep the device busy at least this long at its bf16 peak,
# and an epoch should keep at least MIN_STEPS_PER_EPOCH optimiser steps.
TARGET_STEP_S = 0.001
MIN_STEPS_PER_EPOCH = 16
# Dense bf16 tensor-core FLOP per clock per SM by compute capability (major): V100 (fp16),
# A100, H100/H200, B200. Other parts of a family are slower; the estimate only picks a power of two.
_BF16_FLOP_PER_CLOCK_SM = {7: 1024, 8: 2048, 9: 4096, 10: 8192}
_ASSUMED_CLOCK_HZ = 1.8e9


def reconstruction_loss(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
    """Mean squared reconstruction error, the plain autoencoder objective."""
    return F.mse_loss(model(batch).x_hat.float(), batch.float())


reconstruction_loss.device_rng = True  # type: ignore[attr-defined]  # draws nothing


class DeviceGenerator(torch.Generator):
    """A generator on the training device that carries the host generator as ``.host``.

    Build with ``DeviceGenerator(device=...)`` then set ``.host``; see :data:`LossFn`.
    """

    host: torch.Generator


def host_generator(generator: torch.Generator) -> torch.Generator:
    """The CPU generator for small host-side random choices: ``generator.host`` or itself."""
    return getattr(generator, "host", generator)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without synchronising (pinned, non-blocking) on CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    """Keep the dataset on the device when it comfortably fits; else gather batches on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if data.element_size() * data.nelement() < free // 4:
            return data.to(device)
    return data


# ---------------------------------------------------------------------------------------
# Where batches come from


class BatchSource(ABC):
    """Where :func:`fit` and :func:`evaluate_loss` get their samples.

    Implementations: :class:`TensorSource` (in memory) and ``tasks.streaming.ParquetStream``
    (minibatches read from Parquet partitions in the background). Batches may be on the host
    (the loop copies them, non-blocking from pinned memory) or already on the device.
    """

    @abstractmethod
    def __len__(self) -> int:
        """Samples in one pass."""

    def prepare(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Called once by :func:`fit` before any batch: place or pin data for ``device``."""

    @abstractmethod
    def train_batches(
        self,
        *,
        epoch: int,
        batch_size: int,
        seed: int,
        generator: torch.Generator,
        device_generator: torch.Generator | None = None,
        skip: int = 0,
    ) -> Iterator[Tensor]:
        """Epoch ``epoch``'s ``len(self) // batch_size`` full, shuffled batches, from batch ``skip`` on.

        The order must be a function of (``seed``, ``epoch``) or of the generators' states at
        the call, which must draw whatever they draw before returning (so the caller can
        reset them for the loss). The ragged last batch is dropped.
        """

    @abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        """Every sample once, in a fixed order, in batches of at most ``batch_size``."""

    @abstractmethod
    def example(self, n: int) -> Tensor:
        """Up to ``n`` samples (to probe the model's cost per sample)."""


class TensorSource(BatchSource):
    """Samples held in one tensor (or numpy array), the first dimension being the sample axis.

    Args:
        data: The samples.
        shuffle: Draw a new permutation each epoch (off: the stored order, for tests that
            compare against a stream read in order).
    """

    def __init__(self, data: Tensor | np.ndarray, *, shuffle: bool = True) -> None:
        self.data = _to_tensor(data)
        self.shuffle = shuffle
        self._pin = False

    def __len__(self) -> int:
        return len(self.data)

    def prepare(self, device: torch.device) -> None:
        self.data = _place(self.data, device)
        self._pin = device.type == "cuda" and self.data.device.type == "cpu"

    def train_batches(self, *, epoch, batch_size, seed, generator, device_generator=None, skip=0):
        n = len(self.data)
        perm: Tensor | None = None
        if self.shuffle:
            on_device = self.data.device.type != "cpu"
            if on_device and device_generator is not None:
                perm = torch.randperm(n, generator=device_generator, device=self.data.device)
            else:
                perm = torch.randperm(n, generator=generator)
        return self._batches(perm, n // batch_size, batch_size, skip)

    def _batches(self, perm: Tensor | None, steps: int, bs: int, skip: int) -> Iterator[Tensor]:
        data = self.data
        for step in range(skip, steps):
            if perm is None:
                yield data[step * bs : (step + 1) * bs]
            elif self._pin:  # host data, CUDA training: gather into pinned memory, copied without a sync
                out = torch.empty((bs, *data.shape[1:]), dtype=data.dtype, pin_memory=True)
                torch.index_select(data, 0, perm[step * bs : (step + 1) * bs], out=out)
                yield out
            elif data.device.type == "cpu":
                yield data[perm[step * bs : (step + 1) * bs]]
            else:
                yield torch.index_select(data, 0, perm[step * bs : (step + 1) * bs])

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(self.data), batch_size):
            yield self.data[start : start + batch_size]

    def example(self, n: int) -> Tensor:
        return self.data[:n]


def as_source(data: Tensor | np.ndarray | BatchSource) -> BatchSource:
    """``data`` itself when it is a :class:`BatchSource`, else a :class:`TensorSource` over it."""
    return data if isinstance(data, BatchSource) else TensorSource(data)


# ---------------------------------------------------------------------------------------
# Sizing the batch for the device


def peak_bf16_flops(device: torch.device) -> float:
    """A rough dense bf16 tensor-core peak of a CUDA device (SMs x FLOP/clock x ~1.8 GHz)."""
    props = torch.cuda.get_device_properties(device)
    per_clock = _BF16_FLOP_PER_CLOCK_SM.get(props.major, 1024 if props.major < 7 else 4096)
    if props.major == 8 and props.minor != 0:  # GA10x/AD10x: half of A100 per SM
        per_clock = 1024
    return props.multi_processor_count * per_clock * _ASSUMED_CLOCK_HZ


@dataclass(frozen=True)
class StepCost:
    """What one training sample costs: forward+backward FLOP (matmuls and convolutions) and memory."""

    flops: float
    bytes: float


def measure_step_cost(model: nn.Module, loss_fn: LossFn, example: Tensor, device: torch.device) -> StepCost:
    """FLOP and activation memory per sample of one forward+backward of ``loss_fn``.

    Runs two small batches under ``torch.utils.flop_counter.FlopCounterMode``; the model's
    weights, buffers (BatchNorm statistics), gradients and the global RNG are left as they
    were. Memory is measured on CUDA only (0 elsewhere).
    """
    from torch.utils.flop_counter import FlopCounterMode

    k2 = max(1, min(32, len(example)))
    k1 = max(2, k2 // 4)  # >= 2: BatchNorm refuses a batch of one in training mode
    sizes = (k1, k2) if k2 > k1 else (k2,)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    was_training = model.training
    cuda = device.type == "cuda"
    flops: list[float] = []
    peaks: list[float] = []
    host = torch.Generator().manual_seed(0)
    gen: torch.Generator = host
    if cuda and getattr(loss_fn, "device_rng", False):
        gen = DeviceGenerator(device=device)
        gen.manual_seed(0)
        gen.host = host  # type: ignore[attr-defined]
    devices = [device] if cuda else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        for k in sizes:
            batch = example[:k].to(device)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            counter = FlopCounterMode(display=False)
            with counter:
                with _autocast(device):
                    loss = loss_fn(model, batch, gen)
                loss.backward()
            flops.append(float(counter.get_total_flops()))
            if cuda:
                torch.cuda.synchronize(device)
                peaks.append(float(torch.cuda.max_memory_allocated(device) - base))
            model.zero_grad(set_to_none=True)
            del loss
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    model.train(was_training)
    if len(sizes) == 2:
        per_flop = (flops[1] - flops[0]) / (k2 - k1)
        per_byte = (peaks[1] - peaks[0]) / (k2 - k1) if cuda else 0.0
    else:
        per_flop, per_byte = flops[0] / k2, (peaks[0] / k2 if cuda else 0.0)
    return StepCost(flops=max(per_flop, 0.0), bytes=max(per_byte, 0.0))


def auto_batch_size(
    cost: StepCost,
    *,
    n_train: int,
    floor: int,
    peak_flops: float,
    free_bytes: float,
) -> int:
    """The batch that fills the device: ``floor * 2**k`` for the smallest ``k`` whose step
    is at least ``TARGET_STEP_S`` of ``peak_flops``, then capped so that an epoch keeps
    ``MIN_STEPS_PER_EPOCH`` steps and the activations take at most half of ``free_bytes``.
    Never below ``floor`` (nor above ``n_train``).
    """
    batch = floor
    data_cap = max(floor, n_train // MIN_STEPS_PER_EPOCH)
    if cost.flops > 0:
        while batch * cost.flops < peak_flops * TARGET_STEP_S and batch * 2 <= data_cap:
            batch *= 2
    if cost.bytes > 0:
        while batch > floor and batch * cost.bytes > free_bytes / 2:
            batch //= 2
    return max(1, min(batch, n_train))


def _default_batch(model: nn.Module, loss_fn: LossFn, source: BatchSource, device: torch.device, floor: int) -> int:
    """The batch when none is given: ``floor`` on CPU; on CUDA, :func:`auto_batch_size` for the model."""
    if device.type != "cuda":
        return floor
    cost = measure_step_cost(model, loss_fn, source.example(32), device)
    free, _ = torch.cuda.mem_get_info(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # Adam's two moments (allocated at the first step) and the gradients are not in `free` yet.
    free = max(0.0, free - 3 * params)
    batch = auto_batch_size(cost, n_train=len(source), floor=floor, peak_flops=peak_bf16_flops(device), free_bytes=free)
    log.info("GPU batch: %d (%.3g MFLOP and %.3g MB per sample, floor %d, %d samples)",
             batch, cost.flops / 1e6, cost.bytes / 1e6, floor, len(source))
    return batch


# ---------------------------------------------------------------------------------------
# The loop


@torch.inference_mode()
def evaluate_loss(
    model: nn.Module,
    data: Tensor | np.ndarray | BatchSource,
    loss_fn: LossFn,
    device: torch.device,
    batch_size: int,
    seed: int,
) -> float:
    """Average ``loss_fn`` over ``data`` in eval mode, with a fixed corruption seed."""
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
    cuda = device.type == "cuda"
    if cuda and getattr(loss_fn, "device_rng", False):
        dev_gen = DeviceGenerator(device=device)
        dev_gen.manual_seed(seed + 7919)
        dev_gen.host = gen  # type: ignore[attr-defined]
        gen = dev_gen
    total, n = 0.0, 0
    total_t = torch.zeros((), dtype=torch.float64, device=device) if cuda else None
    for batch in as_source(data).eval_batches(batch_size):
        batch = batch.to(device, non_blocking=True)
        with _autocast(device):
            loss = loss_fn(model, batch, gen)
        if total_t is not None:  # no synchronisation per batch on the GPU
            total_t += loss.detach().double() * len(batch)
        else:
            total += float(loss) * len(batch)
        n += len(batch)
    if total_t is not None:
        total = float(total_t)
    return total / max(n, 1)


@contextmanager
def _closing(batches: Iterator[Tensor]) -> Iterator[Iterator[Tensor]]:
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def _compile(model: nn.Module, mode: str) -> nn.Module:
    return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]


def fit(
    model: nn.Module,
    train: Tensor | np.ndarray | BatchSource,
    val: Tensor | np.ndarray | BatchSource,
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
        train: Training samples (first dimension is the sample axis) or a :class:`BatchSource`.
        val: Validation samples or source (may be empty: then the training loss drives
            early stopping).
        settings: Optimiser, batch, epochs, patience, seed, device, compile, checkpoints.
        loss_fn: ``loss_fn(model, batch, generator)``.
        resume: A state saved by ``on_checkpoint`` in an interrupted run; training
            continues from its epoch (and position within it) with the same optimiser
            and RNG state.
        on_epoch: Called after each epoch with its stats and the epoch budget.
        on_checkpoint: Called with the full state to persist (see ``checkpoint_seconds``).
        on_batch: Called with (step in epoch, steps per epoch) at most every
            ``PROGRESS_EVERY_S`` seconds and at the epoch's last step.

    Returns:
        A :class:`TrainResult`; the model holds the best weights by validation loss.
    """
    device = select_device(settings.device)
    cuda = device.type == "cuda"
    torch.manual_seed(settings.seed)
    model.to(device)
    train_src, val_src = as_source(train), as_source(val)
    train_src.prepare(device)
    val_src.prepare(device)
    n = len(train_src)
    if n == 0:
        raise ValueError("no training samples")
    channels_last = cuda and _has_conv(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    fused = cuda and all(p.is_cuda and p.is_floating_point() for p in model.parameters())
    opt_flags: dict[str, Any] = {"fused": True} if fused else {}
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, **opt_flags)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    dev_gen: DeviceGenerator | None = None
    if cuda:
        dev_gen = DeviceGenerator(device=device)
        dev_gen.manual_seed(settings.seed)
        dev_gen.host = gen
    loss_gen: torch.Generator = dev_gen if dev_gen is not None and getattr(loss_fn, "device_rng", False) else gen

    start_epoch = 0
    best_val = math.inf
    best_epoch = 0
    bad_epochs = 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[EpochStats] = []
    finished = False
    resume_step, resume_running = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        for group in opt.param_groups:  # a checkpoint from another device keeps this device's kernels
            group["fused"] = opt_flags.get("fused", None)
            group["foreach"] = None
        if fused:  # fused Adam keeps its step counts on the device (a CPU checkpoint has them on the host)
            for p, st in opt.state.items():
                if isinstance(st.get("step"), Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        gen.set_state(resume.generator_state)
        if dev_gen is not None and resume.device_generator_state is not None:
            dev_gen.set_state(resume.device_generator_state)
        if resume.global_rng_state is not None:  # dropout continues as in an uninterrupted run
            try:
                if cuda:
                    torch.cuda.set_rng_state(resume.global_rng_state, device)
                else:
                    torch.set_rng_state(resume.global_rng_state)
            except RuntimeError as e:  # a checkpoint from the other kind of device
                log.debug("global RNG state not restored: %s", e)
        start_epoch = resume.epoch
        best_val, best_epoch, bad_epochs = resume.best_val_loss, resume.best_epoch, resume.bad_epochs
        best_state = {k: v.to(device).clone() for k, v in resume.best_model.items()}
        history = [EpochStats(**h) for h in resume.history]
        finished = resume.finished
        resume_step, resume_running = resume.step, resume.running_loss

    # The batch: a resumed run keeps its own; an explicit one wins; else the device's default.
    if resume is not None and resume.batch_size:
        bs = resume.batch_size
    elif settings.batch_size is not None:
        bs = settings.batch_size
    elif finished:
        bs = settings.default_batch_size
    else:
        bs = _default_batch(model, loss_fn, train_src, device, settings.default_batch_size)
    bs = min(bs, n)
    steps = n // bs
    lr_peak = settings.lr
    if settings.batch_size is None and bs > settings.default_batch_size and getattr(model, "scale_lr_with_batch", True):
        lr_peak = settings.lr * math.sqrt(bs / settings.default_batch_size)
    # A scaled lr ramps up from lr over the first epoch and is halved (down to lr) whenever the
    # validation loss has not improved for `plateau` epochs.
    scaled_lr = lr_peak != settings.lr
    lr_top = resume.lr_top if resume is not None and resume.lr_top is not None else lr_peak
    plateau = min(LR_PLATEAU_EPOCHS, max(1, settings.patience // 3))

    step_model: nn.Module = model
    compiled = "off"
    compile_checked = True  # False until the first compiled step has run
    if settings.compile == "on" and (not cuda or settings.compile_mode):
        compiled = settings.compile_mode or "default"
        step_model, compile_checked = _compile(model, compiled), False
    # On CUDA, "auto" (and "on" without a mode) times a few eager steps first.
    probe = cuda and settings.compile != "off" and compiled == "off" and not finished
    probe_t0 = 0.0

    t0 = time.perf_counter()
    last_checkpoint = t0
    last_progress = -math.inf
    train_seconds = 0.0
    samples = 0
    global_step = 0
    epoch = start_epoch

    def state(epoch_done: int, step: int, running: float, epoch_states: tuple[Tensor | None, Tensor | None]) -> TrainState:
        return TrainState(
            epoch=epoch_done,
            model={k: _detached(v) for k, v in model.state_dict().items()},
            best_model=best_state,
            optimizer=opt.state_dict(),
            best_val_loss=best_val,
            best_epoch=best_epoch,
            bad_epochs=bad_epochs,
            generator_state=gen.get_state(),
            history=[asdict(h) for h in history],
            finished=finished,
            device_generator_state=dev_gen.get_state() if dev_gen is not None else None,
            step=step,
            running_loss=running,
            epoch_generator_state=epoch_states[0] if step else None,
            epoch_device_generator_state=epoch_states[1] if step else None,
            batch_size=bs,
            global_rng_state=torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state(),
            lr_top=lr_top if scaled_lr else None,
        )

    while not finished and epoch < settings.epochs:
        epoch += 1
        model.train()
        te = time.perf_counter()
        skip = resume_step if epoch == start_epoch + 1 else 0
        if skip and resume is not None and resume.epoch_generator_state is not None:
            gen.set_state(resume.epoch_generator_state)
            if dev_gen is not None and resume.epoch_device_generator_state is not None:
                dev_gen.set_state(resume.epoch_device_generator_state)
        epoch_states = (gen.get_state(), dev_gen.get_state() if dev_gen is not None else None)
        batches = train_src.train_batches(
            epoch=epoch, batch_size=bs, seed=settings.seed, generator=gen, device_generator=dev_gen, skip=skip
        )
        if skip and resume is not None:  # the epoch's order is drawn: continue the loss's random stream
            gen.set_state(resume.generator_state)
            if dev_gen is not None and resume.device_generator_state is not None:
                dev_gen.set_state(resume.device_generator_state)
        running = torch.zeros((), device=device)
        if skip:
            running.fill_(resume_running)
        step = skip
        with _closing(batches):  # a stream's reader thread stops even when training raises
            for batch in batches:
                if scaled_lr:
                    frac = min(1.0, ((epoch - 1) * steps + step + 1) / steps)
                    for group in opt.param_groups:
                        group["lr"] = settings.lr + (lr_top - settings.lr) * frac
                batch = batch.to(device, non_blocking=True)
                if channels_last and batch.dim() == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                if compile_checked:
                    with _autocast(device):
                        loss = loss_fn(step_model, batch, loss_gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                else:  # the first compiled step: a compiler failure falls back to eager training
                    try:
                        with _autocast(device):
                            loss = loss_fn(step_model, batch, loss_gen)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    except Exception as e:  # noqa: BLE001 - torch.compile raises many kinds
                        log.warning("torch.compile failed, training continues without it: %s", e)
                        compiled = f"failed ({type(e).__name__})"
                        step_model = model
                        with _autocast(device):
                            loss = loss_fn(step_model, batch, loss_gen)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    compile_checked = True
                opt.step()
                running += loss.detach()
                step += 1
                global_step += 1
                if probe and global_step in (PROBE_START, PROBE_END):
                    torch.cuda.synchronize(device)
                    if global_step == PROBE_START:
                        probe_t0 = time.perf_counter()
                    else:
                        probe = False
                        per_step = (time.perf_counter() - probe_t0) / (PROBE_END - PROBE_START)
                        remaining = (settings.epochs - epoch) * steps + (steps - step)
                        if settings.compile == "on" or per_step * remaining >= COMPILE_PAYOFF_S:
                            mode = settings.compile_mode or ("reduce-overhead" if per_step < CUDA_GRAPH_STEP_S else "default")
                            log.info("compiling the model (mode %s): %.2f ms per eager step, %d steps to go", mode, per_step * 1e3, remaining)
                            step_model, compiled, compile_checked = _compile(model, mode), mode, False
                if on_batch is not None or settings.checkpoint_seconds > 0:
                    now = time.perf_counter()
                    if on_batch is not None and (step == steps or now - last_progress >= PROGRESS_EVERY_S):
                        last_progress = now
                        on_batch(step, steps)
                    if (on_checkpoint is not None and settings.checkpoint_seconds > 0 and step < steps
                            and now - last_checkpoint >= settings.checkpoint_seconds):
                        on_checkpoint(state(epoch - 1, step, float(running), epoch_states))
                        last_checkpoint = time.perf_counter()
        if step == 0:
            raise ValueError(f"the training source yielded no batch of {bs} samples in epoch {epoch}")
        train_loss = float(running) / step
        epoch_samples = steps * bs
        epoch_train_s = time.perf_counter() - te
        train_seconds += epoch_train_s
        samples += (step - skip) * bs
        if len(val_src):
            val_loss = evaluate_loss(model, val_src, loss_fn, device, settings.eval_batch_size, settings.seed)
        else:
            val_loss = train_loss
        improved = best_val - val_loss > settings.min_delta * abs(best_val) if math.isfinite(best_val) else True
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch}; lower the learning rate")
        if improved:
            best_val, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if scaled_lr and bad_epochs % plateau == 0:
                lr_top = max(settings.lr, lr_top / 2)
        stats = EpochStats(epoch, train_loss, val_loss, best_val, improved, time.perf_counter() - te, epoch_samples,
                           epoch_train_s)
        history.append(stats)
        finished = bad_epochs >= settings.patience or epoch >= settings.epochs
        if on_checkpoint is not None and (
            finished or settings.checkpoint_seconds <= 0
            or time.perf_counter() - last_checkpoint >= settings.checkpoint_seconds
        ):
            on_checkpoint(state(epoch, 0, 0.0, epoch_states))
            last_checkpoint = time.perf_counter()
        if on_epoch is not None:
            on_epoch(stats, settings.epochs)

    model.load_state_dict(best_state)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
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
        batch_size=bs,
        lr=lr_peak,
        compiled=compiled,
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
