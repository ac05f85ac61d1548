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
rate scaled by ``sqrt(batch / default_batch_size)`` (ramped up over the first epoch, halved on
plateaus, decayed over the last half of the planned epochs). On CPU the loop computes exactly
what it always did (same batches, same random draws, same optimiser).

Over 400 lines because :func:`fit` is one function on purpose: its step loop is the hot path
(no call out per step on CUDA), and resume, early stopping, the learning-rate ramp and mid-epoch
checkpoints all share its state. Batch sources are in ``models/batches.py``, the GPU machinery
(autocast, automatic batch, compile) in ``models/gpu.py``, settings and state in
``models/train_state.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.batches import (
    BatchSource,
    DeviceGenerator,
    TensorSource,
    _to_tensor,
    as_source,
    host_generator,
    host_to_device,
)
from models.gpu import (
    CUDA_GRAPH_STEP_S,
    MIN_STEPS_PER_EPOCH,
    TARGET_STEP_S,
    StepCost,
    _autocast,
    _compile,
    _default_batch,
    _has_conv,
    auto_batch_size,
    measure_step_cost,
    peak_bf16_flops,
)
from models.train_state import (
    CompileMode,
    EpochStats,
    LossFn,
    TrainResult,
    TrainSettings,
    TrainState,
    _detached,
)

__all__ = [  # the loop's public names, wherever they are defined (models/batches.py, gpu.py, train_state.py)
    "CUDA_GRAPH_STEP_S",
    "MIN_STEPS_PER_EPOCH",
    "PROBE_END",
    "PROBE_START",
    "TARGET_STEP_S",
    "BatchSource",
    "CompileMode",
    "DeviceGenerator",
    "EpochStats",
    "LossFn",
    "StepCost",
    "TensorSource",
    "TrainResult",
    "TrainSettings",
    "TrainState",
    "as_source",
    "auto_batch_size",
    "describe_device",
    "evaluate_loss",
    "fit",
    "host_generator",
    "host_to_device",
    "measure_step_cost",
    "peak_bf16_flops",
    "predict",
    "reconstruction_loss",
    "select_device",
]

log = logging.getLogger("aeflow.training")



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
# A scaled lr also decays linearly over the last half of the planned steps (settings.epochs), to a tenth of
# itself at the end: with 16x fewer steps than at the default batch the run ends while the loss still falls,
# and the decay lowered the final validation loss by 3.5-36% in CPU analogs of the batch check (RESULTS.md).
LR_ANNEAL_FRACTION = 0.5
LR_ANNEAL_END = 0.1


def reconstruction_loss(model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
    """Mean squared reconstruction error, the plain autoencoder objective."""
    return F.mse_loss(model(batch).x_hat.float(), batch.float())


reconstruction_loss.device_rng = True  # type: ignore[attr-defined]  # draws nothing
# Compiled together with the model when training compiles (the loss's casts and reduction fuse into the
# step's graph instead of reading and writing the batch-sized output several more times): a loss that
# draws nothing from its generator can say so.
reconstruction_loss.compile_with_model = True  # type: ignore[attr-defined]


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


class _ModelLoss(nn.Module):
    """``loss_fn(model, batch)`` as one module, so that compiling it compiles the loss with the model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Tensor) -> Tensor:
        return self.loss_fn(self.model, batch, None)  # type: ignore[arg-type]  # draws nothing (compile_with_model)


def _compiled_step(model: nn.Module, loss_fn: LossFn, mode: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The training step's loss through ``torch.compile``: the model and the loss in one graph when the loss
    says it draws nothing from its generator (``compile_with_model``), else the model alone."""
    if getattr(loss_fn, "compile_with_model", False):
        whole = _compile(_ModelLoss(model, loss_fn), mode)
        return lambda batch, generator: whole(batch)
    compiled = _compile(model, mode)
    return lambda batch, generator: loss_fn(compiled, batch, generator)


@contextmanager
def _closing(batches: Iterator[Tensor]) -> Iterator[Iterator[Tensor]]:
    try:
        yield batches
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


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

    def eager_step(batch: Tensor, generator: torch.Generator) -> Tensor:
        return loss_fn(model, batch, generator)

    step_loss: Callable[[Tensor, torch.Generator], Tensor] = eager_step
    compiled = "off"
    compile_checked = True  # False until the first compiled step has run
    if settings.compile == "on" and (not cuda or settings.compile_mode):
        compiled = settings.compile_mode or "default"
        step_loss, compile_checked = _compiled_step(model, loss_fn, compiled), False
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
                    done_steps = (epoch - 1) * steps + step + 1
                    frac = min(1.0, done_steps / steps)
                    lr_now = settings.lr + (lr_top - settings.lr) * frac
                    if LR_ANNEAL_FRACTION > 0:  # decay over the planned run's last part (a pure function of the step: resumable)
                        total = settings.epochs * steps
                        left = (total - done_steps) / (LR_ANNEAL_FRACTION * total)
                        if left < 1:
                            lr_now *= LR_ANNEAL_END + (1 - LR_ANNEAL_END) * max(0.0, left)
                    for group in opt.param_groups:
                        group["lr"] = lr_now
                batch = batch.to(device, non_blocking=True)
                if channels_last and batch.dim() == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                if compile_checked:
                    with _autocast(device):
                        loss = step_loss(batch, loss_gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                else:  # the first compiled step: a compiler failure falls back to eager training
                    try:
                        with _autocast(device):
                            loss = step_loss(batch, loss_gen)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    except Exception as e:  # noqa: BLE001 - torch.compile raises many kinds
                        log.warning("torch.compile failed, training continues without it: %s", e)
                        compiled = f"failed ({type(e).__name__})"
                        step_loss = eager_step
                        with _autocast(device):
                            loss = step_loss(batch, loss_gen)
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
                            step_loss, compiled, compile_checked = _compiled_step(model, loss_fn, mode), mode, False
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
        resumed=resume is not None,
        resumed_from_step=resume_step,
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
