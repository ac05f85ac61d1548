"""The GPU side of training: autocast, the device's bf16 peak, the automatic batch size, torch.compile.

The batch, when not given, is chosen to fill the device for the model at hand
(:func:`auto_batch_size`: FLOP and activation memory measured on two small probe batches of the
real model and loss). Pure PyTorch.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.batches import BatchSource, DeviceGenerator
from models.train_state import LossFn

log = logging.getLogger("aeflow.training")

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


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def _compile(model: nn.Module, mode: str) -> nn.Module:
    return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]
