"""gpu_train: aeflow's training loop on a GPU vs a tuned bare loop, side by side in one process.

Imports only torch, numpy, safetensors and ``models/`` (no Prefect, Dask or pandas), so it runs
on a bare GPU machine from the repository root:

    python -m benchmarks.gpu_train --out OUT_DIR            # CUDA: ~2 min on an H200
    python -m benchmarks.gpu_train --out OUT_DIR --cpu-smoke  # CPU, tiny sizes, ~25 s on 2 cores

Measured, in order of importance (each row in its own try: a failure is recorded and the rest
still runs; rows that would end past ``--budget-s`` are skipped and say so):

1. the device's bf16 matmul peak (8192^3 on CUDA);
2. ``models.training.fit`` on the dense 3000-1500-200 autoencoder over 262,144 device-resident
   rows: the default settings (automatic batch and learning rate, compile=auto), and fixed
   batches of 4,096 and 32,768; the same batches in a tuned bare loop (permutation and gather
   on the device, fused Adam, bf16 autocast). Samples/s are steady-state (the last epochs,
   after any compilation); MFU = samples/s x 6 x parameters over the measured peak
   (57.6 MFLOP per sample, as in issue 16);
3. with ``torch.compile`` at the automatic batch: fit (compile=on) and the bare loop (compiled in
   the mode fit picked);
4. patches/s of the denoise conv model (48x48 patches, the denoise app's model and loss) and of
   every codec class in ``models/codec*.py`` (64x64 RGB patches, the module's ``make_loss_fn``),
   at the applications' CPU defaults (32 and 8) and at the automatic GPU batch;
5. the batch-size check: validation loss after the same number of samples seen at the
   automatic GPU batch (with its learning-rate rule) vs at batch 256 (stated margin:
   CHECK_MARGIN), and the automatic batch trained for the batch-256 run's wall time;
6. ``fit`` with batches gathered in pinned host memory (what a stream delivers);
7. fit and the bare loop compiled at 32,768 and 4,096 (when the budget allows).

Writes ``OUT_DIR/gpu_train.json`` (everything) and ``OUT_DIR/gpu_train.md`` (the table).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import models
from models.conv import ConvAEConfig, ConvAutoencoder
from models.dense import DenseAEConfig, DenseAutoencoder
from models.noise import DenoisingLoss, NoiseConfig
from models.training import (
    CUDA_GRAPH_STEP_S,
    PROBE_END,
    TensorSource,
    TrainResult,
    TrainSettings,
    fit,
    measure_step_cost,
    reconstruction_loss,
)

SIZES: dict[str, dict[str, Any]] = {
    "gpu": dict(features=3000, hidden=1500, latent=200, rows=262_144, val_rows=16_384, batches=(4096, 32768),
                host_rows=65_536, conv_patches=4096, conv_patch=48, codec_patches=1024, codec_patch=64,
                check_rows=65_536, check_epochs=30, measure_epochs=2, min_epochs=3, peak_n=8192,
                codec_train_patch=256, codec_train_steps=15, codec_warmup=3, profile_steps=5),
    "cpu": dict(features=96, hidden=48, latent=8, rows=2048, val_rows=256, batches=(256, 512),
                host_rows=1024, conv_patches=64, conv_patch=16, codec_patches=16, codec_patch=16,
                check_rows=1024, check_epochs=2, measure_epochs=1, min_epochs=2, peak_n=512,
                codec_train_patch=16, codec_train_steps=2, codec_warmup=1, profile_steps=2),
}
# Rough cost of one torch.compile (s) on a fresh machine, to skip compiled rows that would overrun.
COMPILE_COST_S = 50.0
# The batch-size check's stated margin: validation loss at the automatic batch / at batch 256 after
# the same number of samples (the loss of the weights fit returns: the best epoch's; the last epoch's
# is reported beside it).
CHECK_MARGIN = 1.10


class Bench:
    """Runs rows in order within a time budget; keeps every result (or its error) for the JSON."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def row(self, name: str, fn: Callable[[], dict[str, Any]], *, needs_s: float = 0.0, **info: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"name": name, **info}
        if self.left() < needs_s:
            rec["skipped"] = f"time budget ({self.left():.0f} s left, ~{needs_s:.0f} s needed)"
        else:
            t = time.perf_counter()
            try:
                rec.update(fn())
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc(limit=6)
            rec["wall_s"] = round(time.perf_counter() - t, 2)
        self.rows.append(rec)
        status = rec.get("error") or rec.get("skipped") or f"{rec.get('samples_per_s', 0):,.0f}/s"
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {name}: {status}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return rec


# ---------------------------------------------------------------------------------------
# Data


def structured_rows(n_train: int, n_val: int, d: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on a 32-dimensional nonlinear manifold plus noise (an autoencoder has something to learn)."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(32, 64, generator=g, device=device) / math.sqrt(32)
    b = torch.randn(64, d, generator=g, device=device) / math.sqrt(64)

    def rows(n: int) -> torch.Tensor:
        out = torch.empty((n, d), device=device)
        for s in range(0, n, 16384):
            k = min(16384, n - s)
            z = torch.randn(k, 32, generator=g, device=device)
            out[s : s + k] = F.gelu(z @ a) @ b * 2 + 0.1 * torch.randn(k, d, generator=g, device=device)
        return out

    return rows(n_train), rows(n_val)


def smooth_patches(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 patches of smooth random images (bicubic upsampled noise), on the host."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, max(2, size // 8), max(2, size // 8), generator=g)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.05 * torch.rand(n, channels, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------
# Measurements


def matmul_peak(device: torch.device, n: int) -> float:
    """Best FLOP/s of an n^3 matmul (bf16 on CUDA, float32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_rate(result: TrainResult, epochs: int) -> float:
    """Samples/s over the last ``epochs`` epochs (steps only: no validation, after any compilation)."""
    tail = result.history[-epochs:]
    seconds = sum(h.train_seconds for h in tail)
    return sum(h.samples for h in tail) / seconds if seconds > 0 else 0.0


def fit_row(make_model: Callable[[], nn.Module], train: Any, val: Any, *, batch: int | None, default_batch: int,
            compile: str, loss_fn: Any, sz: dict[str, Any], device: torch.device, lr: float = 1e-3,
            flops_per_sample: float, peak: float) -> dict[str, Any]:
    n = len(train)
    steps = max(1, n // (batch or max(default_batch, n // 16)))  # automatic: at most n / 16 (MIN_STEPS_PER_EPOCH)
    # enough epochs for the compile probe (PROBE_END steps), the compiling epoch, and the measured ones
    epochs = max(sz["min_epochs"], math.ceil((PROBE_END + 1) / steps) + 1 + sz["measure_epochs"]) if compile != "off" \
        else sz["min_epochs"]
    torch.manual_seed(0)
    model = make_model()
    settings = TrainSettings(epochs=epochs, batch_size=batch, default_batch_size=default_batch, lr=lr, patience=10**6,
                             seed=0, device=str(device), compile=compile)  # type: ignore[arg-type]
    r = fit(model, train, val, settings, loss_fn=loss_fn)
    rate = steady_rate(r, sz["measure_epochs"])
    return {"batch": r.batch_size, "lr": r.lr, "compiled": r.compiled, "epochs": epochs, "samples_per_s": rate,
            "mfu": rate * flops_per_sample / peak, "final_val_loss": r.history[-1].val_loss}


def bare_loop(make_model: Callable[[], nn.Module], data: torch.Tensor, *, batch: int, steps: int, warmup: int,
              compile_mode: str | None, device: torch.device, flops_per_sample: float, peak: float) -> dict[str, Any]:
    """A tuned minimal loop: device permutation and gather, fused Adam, bf16 autocast, optional compile."""
    torch.manual_seed(0)
    model = make_model().to(device)
    cuda = device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if cuda else {}))

    def mse(xb: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(xb).x_hat.float(), xb.float())

    step_loss = torch.compile(mse, mode=compile_mode, dynamic=False) if compile_mode else mse  # the loss in the graph
    n = len(data)
    per_epoch = n // batch
    g = torch.Generator(device=data.device).manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    perm = torch.randperm(n, generator=g, device=data.device)

    def run(k: int, start: int) -> int:
        nonlocal perm
        for i in range(start, start + k):
            j = i % per_epoch
            if j == 0:
                perm = torch.randperm(n, generator=g, device=data.device)
            xb = data.index_select(0, perm[j * batch : (j + 1) * batch])
            with autocast:
                loss = step_loss(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return start + k

    pos = run(warmup, 0)
    _sync(device)
    t = time.perf_counter()
    run(steps, pos)
    _sync(device)
    seconds = time.perf_counter() - t
    rate = steps * batch / seconds
    return {"batch": batch, "compiled": compile_mode or "off", "samples_per_s": rate, "step_ms": 1e3 * seconds / steps,
            "mfu": rate * flops_per_sample / peak}


class HostSource(TensorSource):
    """Rows kept in host memory whatever the device: batches gathered into pinned memory, as a stream delivers them."""

    def prepare(self, device: torch.device) -> None:
        self._pin = device.type == "cuda"


def codec_classes() -> list[tuple[str, Any, type]]:
    """(import name, module, class) of every ``*Codec`` module class in ``models/codec*.py`` with a ``make_loss_fn``."""
    found = []
    for info in pkgutil.iter_modules(models.__path__):
        if not info.name.startswith("codec"):
            continue
        mod = importlib.import_module(f"models.{info.name}")
        for name, obj in vars(mod).items():
            if (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__
                    and name.endswith("Codec") and hasattr(mod, "make_loss_fn")):
                found.append((f"{mod.__name__}.{name}", mod, obj))
    return found


def build_codec(mod: Any, cls: type) -> nn.Module:
    """``cls(Config())`` with the config class named by its ``config`` parameter's annotation."""
    ann = inspect.signature(cls.__init__).parameters["config"].annotation
    cfg_cls = getattr(mod, ann) if isinstance(ann, str) else ann
    return cls(cfg_cls())


# The codec training step as benchmarks/train_codec.py runs it, per variant: (label, batch, channels-last,
# bf16 transforms). The first is the recipe the earlier GPU runs used; benchmarks.gpu_session picks the
# hyperprior's training settings from these rows.
CODEC_VARIANTS = (("batch 16 (recipe)", 16, False, False), ("batch 16, channels-last", 16, True, False),
                  ("batch 16, bf16 transforms", 16, False, True), ("batch 16, channels-last, bf16 transforms", 16, True, True),
                  ("batch 32", 32, False, False), ("batch 64", 64, False, False))


def codec_train_speed(bench: Bench, sz: dict[str, Any], device: torch.device) -> None:
    """Steps/s of the hyperprior's training step (``train_codec.py``: Adam with two step sizes, gradient
    clipping, TF32 and cuDNN autotuning on CUDA) at ``codec_train_patch`` crops, per :data:`CODEC_VARIANTS`,
    each variant's first loss compared with the recipe's (same weights, same batch, same noise); then a
    profile of the recipe's step (what the device and the host spend it on)."""
    from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig
    from models.codec_train import make_loss_fn, transforms_in_bf16

    cuda = device.type == "cuda"
    patch, steps = sz["codec_train_patch"], sz["codec_train_steps"]
    data = smooth_patches(max(b for _, b, _, _ in CODEC_VARIANTS), 3, patch, seed=4).to(device)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if cuda:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    first_loss: dict[int, float] = {}
    rows: list[dict[str, Any]] = []

    def setup(batch: int, channels_last: bool, bf16: bool) -> tuple[Any, Callable[[], torch.Tensor]]:
        torch.manual_seed(0)
        model = HyperpriorCodec(HyperpriorConfig()).to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if bf16:
            transforms_in_bf16(model, device.type)
        hyper = ("h_a.", "h_s.", "log_hyper_gain", "log_inv_hyper_gain", "z_priors.")
        named = list(model.named_parameters())
        opt = torch.optim.Adam([{"params": [p for n, p in named if not n.startswith(hyper)], "lr": 1e-4},
                                {"params": [p for n, p in named if n.startswith(hyper)], "lr": 1e-3}])
        loss_fn = make_loss_fn(model)
        gen = torch.Generator().manual_seed(0)
        xb = data[:batch].contiguous(memory_format=torch.channels_last) if channels_last else data[:batch]

        def step() -> torch.Tensor:
            loss = loss_fn(model, xb, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.detach()

        return (model, loss_fn, xb), step

    def one(label: str, batch: int, channels_last: bool, bf16: bool) -> dict[str, Any]:
        (model, loss_fn, xb), step = setup(batch, channels_last, bf16)
        torch.manual_seed(1)  # the same noise for every variant's first loss
        with torch.no_grad():
            loss0 = float(loss_fn(model, xb, torch.Generator().manual_seed(0)))
        first_loss.setdefault(batch, loss0)
        for _ in range(sz["codec_warmup"]):  # cuDNN picks its algorithms
            step()
        _sync(device)
        t = time.perf_counter()
        losses = [step() for _ in range(steps)]
        _sync(device)
        seconds = time.perf_counter() - t
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        rec = {"batch": batch, "patch": patch, "channels_last": channels_last, "bf16_transforms": bf16,
               "steps_per_s": steps / seconds, "samples_per_s": steps * batch / seconds, "finite": finite,
               "first_loss": loss0, "first_loss_rel_diff": abs(loss0 / first_loss[batch] - 1)}
        rows.append({"label": label, **rec})
        return rec

    try:
        for label, batch, channels_last, bf16 in CODEC_VARIANTS:
            bench.row(f"hyperprior training step {patch}px, {label}", lambda a=(label, batch, channels_last, bf16): one(*a),
                      needs_s=5, model="hyperprior train step", loop="train_codec")

        def profile() -> dict[str, Any]:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            _, step = setup(16, False, False)
            for _ in range(sz["codec_warmup"]):
                step()
            _sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            n = sz["profile_steps"]
            with torch_profile(activities=acts) as prof:
                for _ in range(n):
                    step()
                _sync(device)
            ev = prof.key_averages()
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            syncs = {e.key: e.count for e in ev if "Synchronize" in e.key or "Memcpy" in e.key or e.key == "aten::item"}
            return {"profile_device": ev.table(sort_by=key, row_limit=18, max_name_column_width=60),
                    "profile_host": ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
                    "ops_per_step": sum(e.count for e in ev) / n, "sync_calls": syncs, "steps": n}

        prof = bench.row(f"hyperprior training step {patch}px, profile of the recipe ({sz['profile_steps']} steps)", profile, needs_s=10,
                         model="hyperprior train step", loop="profile")
        bench.extra["codec_profile"] = {k: prof.get(k) for k in ("profile_device", "profile_host", "ops_per_step",
                                                                  "sync_calls", "steps", "error")}
    finally:
        bench.extra["codec_speed"] = rows
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# ---------------------------------------------------------------------------------------
# The benchmark


def run(out: Path, cpu_smoke: bool, budget_s: float) -> dict[str, Any]:
    device = torch.device("cpu" if cpu_smoke or not torch.cuda.is_available() else "cuda")
    sz = SIZES["cpu" if device.type == "cpu" else "gpu"]
    cuda = device.type == "cuda"
    bench = Bench(budget_s)
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "sizes": sz, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"gpu_train on {info['device']}, torch {info['torch']}", flush=True)
    peak_rec = bench.row("bf16 matmul peak" if cuda else "fp32 matmul peak",
                         lambda: {"flops": matmul_peak(device, sz["peak_n"])})
    peak = peak_rec.get("flops") or 1.0
    print(f"peak {peak / 1e12:.3g} TFLOP/s", flush=True)

    d, h, k = sz["features"], sz["hidden"], sz["latent"]
    dense_cfg = DenseAEConfig(d, k, hidden=(h,))

    def dense() -> nn.Module:
        return DenseAutoencoder(dense_cfg)

    params = sum(p.numel() for p in dense().parameters())
    dense_flops = 6.0 * params
    name = f"dense {d}-{h}-{k}"
    train, val = structured_rows(sz["rows"], sz["val_rows"], d, device)
    common = dict(device=device, flops_per_sample=dense_flops, peak=peak)
    fit_kw = dict(default_batch=256, loss_fn=reconstruction_loss, sz=sz, **common)

    def dense_eager() -> tuple[int | None, dict[int, float]]:
        """The default fit row, then fit and the bare loop at the fixed batches; returns the default's
        (automatic) batch and the bare loop's seconds per step by batch."""
        default = bench.row(f"{name} fit, default (auto batch, compile=auto)",
                            lambda: fit_row(dense, train, val, batch=None, compile="auto", **fit_kw), model=name,
                            loop="fit", default=True)
        step_s: dict[int, float] = {}
        for b in sz["batches"]:
            bench.row(f"{name} fit, batch {b}", lambda b=b: fit_row(dense, train, val, batch=b, compile="off", **fit_kw),
                      model=name, loop="fit")
            rec = bench.row(f"{name} bare loop, batch {b}",
                            lambda b=b: bare_loop(dense, train, batch=b, steps=max(20, 3 * len(train) // b), warmup=5,
                                                  compile_mode=None, **common), model=name, loop="bare")
            step_s[b] = rec.get("step_ms", 10.0) / 1e3
        return default.get("batch"), step_s

    def dense_compiled(b: int | None, bare_batch: int | None) -> None:
        """fit with compile=on at batch ``b`` (None: automatic), then the bare loop compiled at ``bare_batch``."""
        label = "default (auto batch)" if b is None else f"batch {b}"
        rec = bench.row(f"{name} fit, {label}, compile=on",
                        lambda: fit_row(dense, train, val, batch=b, compile="on", **fit_kw), needs_s=COMPILE_COST_S,
                        model=name, loop="fit", default=b is None)
        if bare_batch is not None:  # the mode fit picked (CUDA graphs for short steps); the graphs are cached by now
            bb = bare_batch
            mode = rec.get("compiled") if rec.get("compiled") in ("default", "reduce-overhead") else (
                "reduce-overhead" if bare_step_s.get(bb, 1.0) < CUDA_GRAPH_STEP_S else "default")
            bench.row(f"{name} bare loop, batch {bb}, compiled ({mode})",
                      lambda: bare_loop(dense, train, batch=bb, steps=max(20, 3 * len(train) // bb), warmup=10,
                                        compile_mode=mode, **common),
                      needs_s=COMPILE_COST_S / 2, model=name, loop="bare")

    def host_rows() -> None:
        """Batches from host memory (pinned gather + non-blocking copy): the streaming path's device side."""
        host = train[: sz["host_rows"]].cpu()
        bench.row(f"{name} fit, host-resident rows, batch {sz['batches'][0]}",
                  lambda: fit_row(dense, HostSource(host), val, batch=sz["batches"][0], compile="off", **fit_kw),
                  needs_s=5, model=name, loop="fit (host rows)")

    def conv_models() -> None:
        """The applications' CPU default batch vs the automatic GPU batch."""
        patches = smooth_patches(sz["conv_patches"], 1, sz["conv_patch"])
        val_p = smooth_patches(max(8, sz["conv_patches"] // 8), 1, sz["conv_patch"], seed=1)
        den_cfg = ConvAEConfig(1, (32, 64, 128), 64, blocks=1, skip=True, residual=True)
        den_loss = DenoisingLoss(NoiseConfig(kinds=("gaussian",), sigma=25.0))

        def denoiser() -> nn.Module:
            return ConvAutoencoder(den_cfg)

        den_flops = measure_step_cost(denoiser(), den_loss, patches[:32], torch.device("cpu")).flops
        for batch, label in ((32, "batch 32 (app default, as shipped)"), (None, "default (auto batch)")):
            bench.row(f"denoise conv {sz['conv_patch']}px, {label}",
                      lambda batch=batch: fit_row(denoiser, patches, val_p, batch=batch, default_batch=32, compile="off",
                                                  loss_fn=den_loss, sz=sz, device=device, lr=2e-3,
                                                  flops_per_sample=den_flops, peak=peak),
                      needs_s=8, model="denoise conv", loop="fit", default=batch is None)

        codec_p = smooth_patches(sz["codec_patches"], 3, sz["codec_patch"], seed=2)
        codec_val = smooth_patches(max(8, sz["codec_patches"] // 8), 3, sz["codec_patch"], seed=3)
        try:
            codecs = codec_classes()
        except Exception as e:  # noqa: BLE001
            codecs = []
            bench.extra["codec_discovery_error"] = f"{type(e).__name__}: {e}"
        for cname, mod, cls in codecs:
            try:
                probe_model = build_codec(mod, cls)
                c_flops = measure_step_cost(probe_model, mod.make_loss_fn(probe_model), codec_p[:8],
                                            torch.device("cpu")).flops
            except Exception as e:  # noqa: BLE001
                bench.rows.append({"name": cname, "error": f"{type(e).__name__}: {e}"})
                continue
            for batch, label in ((8, "batch 8 (app default, as shipped)"), (None, "default (auto batch)")):
                def one(batch=batch, mod=mod, cls=cls, c_flops=c_flops):
                    holder: dict[str, Any] = {}

                    def make() -> nn.Module:
                        holder["m"] = build_codec(mod, cls)
                        return holder["m"]

                    def loss(m, x, g):  # the module's loss, built for the model fit trains
                        return holder.setdefault("loss", mod.make_loss_fn(holder["m"]))(m, x, g)

                    return fit_row(make, codec_p, codec_val, batch=batch, default_batch=8, compile="off", loss_fn=loss,
                                   sz=sz, device=device, lr=5e-4, flops_per_sample=c_flops, peak=peak)

                bench.row(f"{cname} {sz['codec_patch']}px, {label}", one, needs_s=8, model=cname, loop="fit",
                          default=batch is None)

    def batch_check() -> None:
        """Same samples seen: automatic batch (lr rule) vs 256; then the automatic batch for as long
        (wall time) as the batch-256 run took, which is how a GPU user meets it."""
        ctrain, cval = structured_rows(sz["check_rows"], sz["val_rows"], d, device, seed=7)
        epochs = sz["check_epochs"]
        check: dict[str, Any] = {}
        for label, batch in (("batch 256", 256), ("auto batch", None)):
            check[label] = bench.row(f"{name} batch check ({len(ctrain):,} rows), {label}, {epochs} epochs",
                                     lambda batch=batch: _check(dense, ctrain, cval, batch, epochs, device),
                                     needs_s=20 if batch == 256 else 5, model=name, loop="batch check")
        small, auto = check["batch 256"], check["auto batch"]
        if "final_val_loss" in small and "final_val_loss" in auto:
            same_time = max(1, min(20 * epochs, int(small["seconds"] / (auto["seconds"] / epochs))))
            timed = bench.row(f"{name} batch check, auto batch, {same_time} epochs (the batch-256 run's time)",
                              lambda: _check(dense, ctrain, cval, None, same_time, device), needs_s=small["seconds"],
                              model=name, loop="batch check")
            bench.extra["batch_check"] = {
                "rows": len(ctrain), "epochs": epochs, "samples_seen": small["samples_seen"],
                "val_loss_256": small["best_val_loss"], "val_loss_auto": auto["best_val_loss"],
                "final_val_loss_256": small["final_val_loss"], "final_val_loss_auto": auto["final_val_loss"],
                "auto_batch": auto["batch"], "auto_lr": auto["lr"],
                "ratio": auto["best_val_loss"] / small["best_val_loss"], "margin": CHECK_MARGIN,
                "seconds_256": small["seconds"], "seconds_auto": auto["seconds"],
                "same_time_epochs": same_time, "val_loss_auto_same_time": timed.get("best_val_loss"),
            }

    # In order of importance: later rows are skipped when the time budget runs out.
    auto_batch, bare_step_s = dense_eager()
    bench.extra["auto_batch"] = auto_batch  # the compiled rows compare fit and the bare loop at this batch
    if cuda:  # the automatic batch compiled, fit and the bare loop at the same batch
        dense_compiled(None, auto_batch)
    codec_train_speed(bench, sz, device)
    batch_check()
    conv_models()
    host_rows()
    if cuda:
        for b in reversed(sz["batches"]):
            dense_compiled(b, b)
    else:
        bench.rows.append({"name": "compiled rows", "skipped": "CPU: torch.compile is measured on CUDA only"})

    result = {"info": info, "peak_flops": peak, "rows": bench.rows, **bench.extra,
              "goals": goals(bench.rows, bench.extra), "total_s": round(time.perf_counter() - bench.t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    (out / "gpu_train.md").write_text(table + "\n")
    print(table, flush=True)
    return result


def _check(make_model: Callable[[], nn.Module], train: torch.Tensor, val: torch.Tensor, batch: int | None, epochs: int,
           device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = make_model()
    r = fit(model, train, val, TrainSettings(epochs=epochs, batch_size=batch, default_batch_size=256, lr=1e-3,
                                             patience=10**6, seed=0, device=str(device), compile="off"))
    return {"batch": r.batch_size, "lr": r.lr, "final_val_loss": r.history[-1].val_loss, "best_val_loss": r.best_val_loss,
            "samples_seen": sum(h.samples for h in r.history), "steps": sum(h.samples for h in r.history) // r.batch_size,
            "samples_per_s": r.train_samples_per_s, "seconds": r.seconds}


def goals(rows: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Issue 16's goals from the rows: fit/bare at the same batch, MFU at the default, conv speed-ups."""
    ok = [r for r in rows if "samples_per_s" in r]
    out: dict[str, Any] = {"fit_over_bare": {}}
    for r in ok:
        if r.get("loop") != "bare":
            continue
        twin = [f for f in ok if f.get("loop") == "fit" and f.get("batch") == r["batch"] and f.get("model") == r.get("model")
                and (f.get("compiled", "off") == "off") == (r["compiled"] == "off")]
        if twin:
            out["fit_over_bare"][f"batch {r['batch']}, {r['compiled']}"] = twin[0]["samples_per_s"] / r["samples_per_s"]
    dense_default = [r for r in ok if r.get("default") and str(r.get("model", "")).startswith("dense")]
    if dense_default:
        out["dense_default_mfu_best"] = max(r["mfu"] for r in dense_default)
    for model, base_batch in (("denoise conv", 32),) + tuple((r["model"], 8) for r in ok if ".codec" in str(r.get("model"))):
        base = [r for r in ok if r.get("model") == model and r.get("batch") == base_batch and not r.get("default")]
        auto = [r for r in ok if r.get("model") == model and r.get("default")]
        if base and auto:
            out[f"{model} speed-up at default"] = auto[0]["samples_per_s"] / base[0]["samples_per_s"]
    if "batch_check" in extra:
        c = extra["batch_check"]
        out["batch_check_val_loss_ratio"] = c["ratio"]
        out["batch_check_within_margin"] = c["ratio"] <= c["margin"]
    return out


def markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    lines = [
        f"Device: {info['device']}, torch {info['torch']} (CUDA {info['cuda']}), {info['time']}; "
        f"matmul peak {result['peak_flops'] / 1e12:.3g} TFLOP/s (bf16 on CUDA). Total {result['total_s']} s.",
        "",
        "| run | batch | lr | compile | samples/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "samples_per_s" in r:
            lr = f"{r['lr']:.2g}" if "lr" in r else ""
            lines.append(f"| {r['name']} | {r.get('batch', '')} | {lr} | {r.get('compiled', 'off')} "
                         f"| {r['samples_per_s']:,.0f} | {100 * r.get('mfu', 0):.1f}% |")
        elif "flops" not in r:
            lines.append(f"| {r['name']} | | | | {r.get('error') or r.get('skipped', '')} | |")
    if result.get("codec_speed"):
        lines += ["", ("Hyperprior training step (`train_codec.py`'s: Adam, gradient clipping; TF32 and cuDNN autotuning "
                       "on CUDA), first loss compared with the recipe's on the same weights, batch and noise:"), "",
                  "| variant | batch | patch | steps/s | crops/s | finite | first loss vs recipe |", "|---|---|---|---|---|---|---|"]
        for r in result["codec_speed"]:
            lines.append(f"| {r['label']} | {r['batch']} | {r['patch']} | {r['steps_per_s']:.1f} | {r['samples_per_s']:,.0f} "
                         f"| {'yes' if r['finite'] else 'NO'} | {100 * r['first_loss_rel_diff']:.2f}% |")
    prof = result.get("codec_profile") or {}
    if prof.get("profile_device"):
        lines += ["", (f"Profile of the recipe's step ({prof['ops_per_step']:.0f} profiler events per step; "
                       f"synchronising calls in {prof['steps']} steps: {prof['sync_calls']}):"), "", "```",
                  prof["profile_device"].rstrip(), "```"]
    g = result["goals"]
    lines += ["", "Goals (issue 16):"]
    for k, v in g.get("fit_over_bare", {}).items():
        lines.append(f"- fit / bare loop at {k}: {v:.3f} (goal >= 0.9)")
    if "dense_default_mfu_best" in g:
        lines.append(f"- dense MFU at its default GPU batch (best row): {100 * g['dense_default_mfu_best']:.1f}% (goal >= 40% for 3000-1500-200)")
    for k, v in g.items():
        if k.endswith("speed-up at default"):
            lines.append(f"- {k}: {v:.2f}x (goal >= 3x)")
    if "batch_check" in result:
        c = result["batch_check"]
        lines.append(f"- batch check ({c['rows']:,} rows, {c['epochs']} epochs = {c['samples_seen']:,} samples): val "
                     f"loss (best epoch) {c['val_loss_auto']:.4g} at the automatic batch {c['auto_batch']} (lr {c['auto_lr']:.2g}, "
                     f"{c['seconds_auto']:.1f} s) vs {c['val_loss_256']:.4g} at 256 ({c['seconds_256']:.1f} s): ratio "
                     f"{c['ratio']:.3f} (stated margin <= {c['margin']:.2f}: {'met' if c['ratio'] <= c['margin'] else 'missed'})")
        if c.get("val_loss_auto_same_time") is not None:
            lines.append(f"- in the batch-256 run's time the automatic batch trains {c['same_time_epochs']} epochs: val "
                         f"loss {c['val_loss_auto_same_time']:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_train_out", help="folder for gpu_train.json and gpu_train.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI smoke test, ~25 s on 2 cores)")
    ap.add_argument("--budget-s", type=float, default=110.0, help="skip the remaining rows that would end past this many seconds")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        torch.set_num_threads(1)
    return run(Path(args.out), args.cpu_smoke, args.budget_s)


if __name__ == "__main__":
    main(sys.argv[1:])
