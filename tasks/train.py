"""Training as a Prefect-friendly function: checkpoints into the run, progress on screen and in the UI.

The loop itself is ``models.training.fit`` (pure torch); this module wires its
callbacks to the run directory (safetensors checkpoints at most every
``train.checkpoint_seconds``, within long epochs too, resumed automatically when an
interrupted run of the same fingerprint is restarted), a rich progress bar on the
terminal, and a Prefect progress artifact. The data is arrays in memory or a
``models.training.BatchSource`` such as ``tasks.streaming.ParquetStream``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from models.training import (
    BatchSource,
    LossFn,
    TrainResult,
    TrainSettings,
    TrainState,
    fit,
    reconstruction_loss,
    select_device,
)
from tasks.config import TrainConfig
from tasks.errors import ConfigError, TrainingDiverged
from tasks.storage import CHECKPOINT_DIR, CheckpointError, RunDir

log = logging.getLogger("aeflow.train")


def settings_from(cfg: TrainConfig) -> TrainSettings:
    return TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        default_batch_size=cfg.default_batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        patience=cfg.patience,
        seed=cfg.seed,
        device=cfg.device,
        compile=cfg.compile,
        checkpoint_seconds=cfg.checkpoint_seconds,
    )


def resolve_device(preference: str) -> torch.device:
    """``train.device`` as a torch device; anything this machine cannot run is a configuration error.

    Raises:
        ConfigError: (exit 2) an unknown device, CUDA asked for without CUDA, or a CUDA index
            this machine does not have; the message names the value.
    """
    try:
        device = select_device(preference)
    except ValueError as e:  # CUDA asked for and absent
        raise ConfigError(f"train.device: {e}") from e
    except RuntimeError as e:  # torch.device() of an unknown string
        raise ConfigError(f"train.device: {preference!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device: {preference!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


@contextlib.contextmanager
def periodically(fn: Callable[[], bool | None], first_s: float, every_s: float, name: str) -> Iterator[None]:
    """While the body runs, ``fn()`` in a thread after ``first_s`` and then every ``every_s`` seconds, until
    the body ends or ``fn`` returns False: the progress lines of work that is otherwise silent."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        delay = first_s
        while not stop.wait(delay):
            delay = every_s
            if fn() is False:
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow/task run (unit tests, benchmarks)
        return log


class UiProgress:
    """A Prefect progress artifact, when running inside a flow; silently nothing otherwise."""

    def __init__(self, key: str, description: str) -> None:
        self.id = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() or TaskRunContext.get():
                self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        except Exception as e:  # the UI is a nicety; never fail training for it
            log.debug("no progress artifact: %s", e)

    def update(self, pct: float) -> None:
        if self.id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=pct)
        except Exception as e:
            log.debug("progress artifact update failed: %s", e)


# A line in the log (and Prefect's) at most this often within a long epoch: step, rate, time left.
STEP_LOG_EVERY_S = 30.0


def _threads_line(device: torch.device, n_threads: int, asked: int | None) -> str:
    """Where training runs; on the CPU, its threads and, when the machine is already busy, a hint."""
    if device.type != "cpu":
        return f"training on {device}"
    line = f"training on the CPU with {n_threads} torch thread{'s' if n_threads != 1 else ''}"
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this system
        return line
    if not asked and n_threads > 1 and load >= cores:
        line += (f" (load average {load:.1f} on {cores} cores: where other work shares the cores, "
                 "--set train.threads=1 can be many times faster)")
    return line


class _StepMeter:
    """Within-epoch progress for the log: every ``STEP_LOG_EVERY_S``, the step, steps per second and about
    how long the epochs left take at that rate (epochs are an upper bound: early stopping may end sooner)."""

    def __init__(self, label: str, budget: int, done: int, emit: Callable[..., None]) -> None:
        self.label, self.budget, self.epoch, self.emit = label, budget, done, emit
        self.t0 = self.last = time.monotonic()
        self.steps_done = 0
        self.epoch_steps = 0

    def epoch_done(self, epoch: int) -> None:
        self.epoch = epoch
        self.steps_done += self.epoch_steps
        self.epoch_steps = 0

    def step(self, step: int, steps: int) -> None:
        self.epoch_steps = step
        now = time.monotonic()
        if now - self.last < STEP_LOG_EVERY_S or step == steps:
            return
        self.last = now
        rate = (self.steps_done + step) / max(now - self.t0, 1e-9)
        left = ((self.budget - self.epoch - 1) * steps + steps - step) / max(rate, 1e-9)
        self.emit("%s epoch %d/%d: step %d/%d (%.0f%%), %.3g steps/s, about %s left at this rate",
                  self.label, self.epoch + 1, self.budget, step, steps, 100.0 * step / steps, rate, _duration(left))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {round(seconds % 3600 / 60)} min"


def train_model(
    model: nn.Module,
    train_x: np.ndarray | torch.Tensor | BatchSource,
    val_x: np.ndarray | torch.Tensor | BatchSource,
    cfg: TrainConfig,
    *,
    run: RunDir | None,
    loss_fn: LossFn = reconstruction_loss,
    label: str = "training",
    show_progress: bool = True,
) -> TrainResult:
    """Train with per-epoch checkpoints in ``run`` and resume from an existing checkpoint.

    Args:
        model: A freshly built model (its weights are replaced on resume).
        train_x / val_x: Samples (numpy or tensors) or batch sources (e.g. the
            ``tasks.streaming.ParquetStream`` pair of :func:`tasks.streaming.training_streams`).
        cfg: Optimiser, batch, epochs, patience, seed, device, compile, checkpoints.
        run: The run directory receiving ``checkpoint/`` (None: no checkpoints).
        loss_fn: ``loss_fn(model, batch, generator)``.
        label: Shown on the progress bar and the UI artifact.
    """
    resolve_device(cfg.device)  # a bad device is one configuration error, never a traceback from the loop
    settings = settings_from(cfg)
    logger = run_logger()
    resume = None
    if run is not None:
        try:
            saved = run.load_checkpoint()
        except CheckpointError as e:  # torn or damaged (e.g. power loss): never block the run for good
            logger.warning("discarding a damaged checkpoint, training starts over: %s", e)
            run.remove(CHECKPOINT_DIR)
            saved = None
        if saved is not None:
            try:
                resume = TrainState.from_flat(*saved)
                model.load_state_dict(resume.model)  # shape check before the loop
                logger.info("resuming %s from the checkpoint of epoch %d in %s", label, resume.epoch, run.uri)
            except Exception as e:  # a checkpoint of another architecture: start over
                logger.warning("ignoring incompatible checkpoint in %s: %s", run.uri, e)
                resume = None

    ui = UiProgress(key=f"{(run.app if run else 'aeflow')}-training".lower(), description=f"{label}: epochs done / budget")
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[train]:.4g} val {task.fields[val]:.4g}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress or not console.is_terminal,
        transient=False,
    )
    task_id = progress.add_task(label, total=settings.epochs, train=float("nan"), val=float("nan"))
    if resume is not None:
        progress.update(task_id, completed=resume.epoch)

    def on_epoch(stats: Any, budget: int) -> None:
        progress.update(task_id, completed=stats.epoch, train=stats.train_loss, val=stats.val_loss)
        ui.update(100.0 * stats.epoch / budget)
        if stats.epoch == 1 or stats.epoch % 10 == 0:
            logger.info(
                "%s epoch %d/%d: train %.5g, val %.5g (best %.5g)",
                label, stats.epoch, budget, stats.train_loss, stats.val_loss, stats.best_val_loss,
            )

    def on_checkpoint(state: TrainState) -> None:
        if run is not None:
            run.save_checkpoint(*state.to_flat())

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    logger.info("%s: %s", label, _threads_line(resolve_device(cfg.device), torch.get_num_threads(), cfg.threads))
    meter = _StepMeter(label, settings.epochs, resume.epoch if resume is not None else 0, logger.info)

    def on_epoch_and_meter(stats: Any, budget: int) -> None:
        meter.epoch_done(stats.epoch)
        on_epoch(stats, budget)

    def on_batch(step: int, steps: int) -> None:
        progress.update(task_id, completed=meter.epoch + step / steps)
        meter.step(step, steps)

    try:
        with progress:
            result = fit(
                model,
                train_x,
                val_x,
                settings,
                loss_fn=loss_fn,
                resume=resume,
                on_epoch=on_epoch_and_meter,
                on_batch=on_batch,
                on_checkpoint=on_checkpoint if run is not None else None,
            )
    except FloatingPointError as e:  # models.training.fit's divergence (pure torch: no aeflow errors there)
        raise TrainingDiverged(f"{label}: training diverged: {e} (train.lr = {cfg.lr:g}: e.g. --lr {cfg.lr / 10:g})") \
            from None
    finally:
        torch.set_num_threads(threads)
    ui.update(100.0)
    logger.info(
        "%s done: %d epochs (best %d, val loss %.5g) in %.1fs on %s, %.0f samples/s (batch %d, lr %.3g, compiled: %s)%s",
        label, result.epochs_run, result.best_epoch, result.best_val_loss, result.seconds,
        result.device, result.train_samples_per_s, result.batch_size, result.lr, result.compiled,
        f"; resumed after epoch {result.resumed_from_epoch}: time and rate are this session's" if result.resumed else "",
    )
    sys.stderr.flush()
    return result
