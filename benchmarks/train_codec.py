"""Train a benchmark codec (factorized or mean-scale hyperprior) on photographs shipped with installed packages.

    # the hyperprior, its transforms started from the committed factorized codec (the GPU recipe):
    python -m benchmarks.train_codec --save-images benchmarks/_work/codec_train.npz
    python -m benchmarks.train_codec --kind hyperprior --init benchmarks/weights/codec \\
        --images benchmarks/_work/codec_train.npz --device cuda --minutes 6.5 --out "$OUT/codec"
    # continue it later (several short runs add up): --resume DIR (a previous --out)
    # the factorized codec, as before:
    python -m benchmarks.train_codec --minutes 40 --out benchmarks/_work/codec

Random crops of the training photographs (:mod:`benchmarks.codec_data`: fresh crops every
step, flips, and a scale pyramid), Adam, the variable-rate ``R + λ·D`` loss over every
quality level. Writes into ``--out``, every ``--save-every`` seconds and at the end (so a
run killed by a time limit still leaves its latest state):

- ``config.json`` + ``weights.safetensors``: the model with its integer tables, ready for
  ``aeflow compress --model OUT`` and :mod:`benchmarks.quality_compress` (weights stored as
  float16 when float32 would pass 16 MB; the model computes in float32 either way);
  ``config.json`` records the training images (name, source, pixel hash) and the schedule;
- ``state-NN.safetensors``: the float32 weights, step count and history, in shards of at
  most 15 MB, from which ``--resume`` (or a rerun with the same ``--out``) continues. The
  optimizer's moments are not kept (they would double the state): a resumed run restarts
  Adam with a short warm-up.
- ``log.json``: the loss history, speed and (on CUDA) a cross-device check.

Needs torch, numpy and safetensors only with ``--images`` (what a lent GPU machine has; scikit-image
and Pillow to collect the images without it); never Prefect, Dask, pandas or constriction. The held-out photographs of
:mod:`benchmarks.quality_compress` are never used here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import threading
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.codec_data import (
    HELDOUT_IMAGES,
    TRAIN_IMAGES,  # noqa: F401  (re-exported: tests, quality_compress)
    colour_augment,
    load_images_file,
    load_skimage,
    pyramid,
    save_images,
    training_images,
)
from models.codec import CodecBase, CodecConfig, ImageCodec, load_codec_state
from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig
from models.codec_train import (
    calibrate_hyperprior,
    hyperprior_from_factorized,
    make_loss_fn,
    make_rate_loss_fn,
    transforms_in_bf16,
    widen_codec,
)
from models.image_ops import as_rgb, pad_to_multiple, rgb_patches

KINDS: dict[str, tuple[type[CodecConfig], type[CodecBase]]] = {
    "codec": (CodecConfig, ImageCodec), "hyperprior": (HyperpriorConfig, HyperpriorCodec)}
MAX_FILE = 15_000_000
WARMUP_STEPS = 100
load_images = load_skimage  # the held-out photographs, for benchmarks.quality_compress


# -- model files -------------------------------------------------------------------------------


def build(kind: str, config: dict) -> CodecBase:
    cfg_cls, model_cls = KINDS[kind]
    return model_cls(cfg_cls.from_dict(config))


def load_codec(path: str) -> CodecBase:
    """A trained codec of either kind from a folder with config.json + weights.safetensors."""
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    model = build(meta.get("kind", "codec"), meta["config"])
    load_codec_state(model, load_file(os.path.join(path, "weights.safetensors")))
    return model.eval()


def _atomic_json(path: str, obj: object) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def export_model(state: dict[str, torch.Tensor], kind: str, config: dict, out: str, meta: dict,
                 dtype: str = "auto") -> str:
    """Build the integer tables on a CPU copy and write config.json + weights.safetensors; returns the dtype.

    ``dtype="auto"``: float16 when the float32 file would pass 16 MB. The copy's weights are
    rounded to that precision *before* the tables are built, so tables, identity and the
    loaded model agree.
    """
    with torch.random.fork_rng(devices=[]):  # a fresh model's random init must not move the training's noise
        model = build(kind, config)
    load_codec_state(model, state)
    float_bytes = sum(v.numel() * 4 for v in model.state_dict().values() if v.dtype == torch.float32)
    half = dtype == "float16" or (dtype == "auto" and float_bytes > MAX_FILE)
    if half:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    model.eval()
    model.update_tables()
    sd = {k: (v.half() if half and v.dtype == torch.float32 else v).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "weights.safetensors")
    save_file(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
    if os.path.getsize(path) > 16 * 2**20:
        print(f"warning: {path} is {os.path.getsize(path) / 2**20:.1f} MiB, over the 16 MiB a GPU run returns", flush=True)
    with open(path, "rb") as f:  # verified by every loader of the folder (tasks/storage.py)
        digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    _atomic_json(os.path.join(out, "config.json"), {"kind": kind, "config": model.config.to_dict(),
                                                    "weights_dtype": "float16" if half else "float32", **meta,
                                                    "weights": digest})
    return "float16" if half else "float32"


def save_state(state: dict[str, torch.Tensor], info: dict, out: str) -> list[str]:
    """float32 weights in shards of at most 15 MB (``state-NN.safetensors``; ``info`` as metadata of shard 0)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        t = state[k].contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > MAX_FILE:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    names = []
    for i, part in enumerate(shards):
        name = os.path.join(out, f"state-{i:02d}.safetensors")
        save_file(part, name + ".tmp", metadata={"info": json.dumps(info), "shards": str(len(shards))} if i == 0 else {})
        os.replace(name + ".tmp", name)
        names.append(name)
    for old in _state_files(out)[len(shards):]:
        os.remove(old)
    return names


def _state_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith("state-") and f.endswith(".safetensors"))


def load_state(folder: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state saved by :func:`save_state` in ``folder`` (or an older single ``state.safetensors``), or None."""
    from safetensors import safe_open

    files = _state_files(folder)
    if files:
        with safe_open(files[0], "pt") as f:
            meta = f.metadata() or {}
        if int(meta.get("shards", len(files))) != len(files):
            raise ValueError(f"{folder}: {len(files)} state shards, the first says {meta.get('shards')}")
        state: dict[str, torch.Tensor] = {}
        for p in files:
            state.update(load_file(p))
        return state, json.loads(meta["info"])
    legacy = os.path.join(folder, "state.safetensors")
    if os.path.exists(legacy):  # the factorized script's earlier format: "model.*" tensors and "step"
        st = load_file(legacy)
        with open(os.path.join(folder, "config.json")) as f:
            meta_json = json.load(f)
        return ({k[6:]: v for k, v in st.items() if k.startswith("model.")},
                {"kind": "codec", "config": meta_json["config"], "step": int(st["step"]), "seconds": 0.0})
    return None


# -- data ----------------------------------------------------------------------------------------


class Batches:
    """Seeded crops of the training images (batch ``i`` depends only on seed and ``i``), prepared in a thread."""

    def __init__(self, images: list[np.ndarray], batch: int, patch: int, seed: int, start: int, pin: bool,
                 colour: float = 0.0) -> None:
        self.images, self.batch, self.patch, self.seed, self.pin, self.colour = images, batch, patch, seed, pin, colour
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.step = start
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        step = self.step
        while not self.stop:
            crops = rgb_patches(self.images, self.batch, self.patch, seed=self.seed * 1_000_003 + step)
            b = torch.from_numpy(colour_augment(crops, self.colour, seed=self.seed * 1_000_003 + step + 1))
            self.q.put(b.pin_memory() if self.pin else b)
            step += 1

    def next(self) -> torch.Tensor:
        return self.q.get()

    def close(self) -> None:
        self.stop = True
        while self.thread.is_alive():
            try:
                self.q.get_nowait()
            except queue.Empty:
                time.sleep(0.01)


class LatentCrops:
    """``--entropy-only``: the analysis transform's latents of every training image and of its mirror
    image, computed once (the transforms do not train, so they never change), and seeded crops of
    them: batch ``i`` depends only on seed and ``i``, a crop of ``patch // stride`` latent elements
    a side is a ``patch`` × ``patch`` crop of the image."""

    def __init__(self, model: HyperpriorCodec, images: list[np.ndarray], batch: int, patch: int, seed: int,
                 start: int, device: torch.device) -> None:
        self.size = max(1, patch // model.stride)
        self.batch, self.seed, self.step = batch, seed, start
        self.latents: list[torch.Tensor] = []
        with torch.no_grad():
            for im in images:
                rgb = as_rgb(im)
                for a in (rgb, rgb[:, ::-1]):
                    x = torch.from_numpy(np.ascontiguousarray(a).transpose(2, 0, 1).copy()).to(device)
                    y = model.g_a(pad_to_multiple(x.float().div(255).unsqueeze(0), model.stride)[0])[0]
                    if min(y.shape[-2:]) >= self.size:
                        self.latents.append(y)
        if not self.latents:
            raise SystemExit(f"no training image gives a latent of {self.size}x{self.size}: lower --patch")

    def next(self) -> torch.Tensor:
        rng = np.random.default_rng(self.seed * 1_000_003 + self.step)
        self.step += 1
        crops = []
        for _ in range(self.batch):
            y = self.latents[int(rng.integers(len(self.latents)))]
            i = int(rng.integers(y.shape[1] - self.size + 1))
            j = int(rng.integers(y.shape[2] - self.size + 1))
            crops.append(y[:, i:i + self.size, j:j + self.size])
        return torch.stack(crops)

    def close(self) -> None:
        pass


# -- the run ---------------------------------------------------------------------------------------


def make_model(args: argparse.Namespace, resumed: tuple[dict, dict] | None,
               images: list[np.ndarray]) -> tuple[CodecBase, dict]:
    """The model to train (resumed, initialised from --init, or fresh) and the run's info."""
    lambdas = tuple(float(v) for v in args.lambdas.split(",")) if args.lambdas else None
    if resumed is not None:
        state, info = resumed
        model = build(info["kind"], info["config"])
        load_codec_state(model, state)
        print(f"resuming a {info['kind']} codec at step {info['step']}", flush=True)
        return model, info
    info = {"kind": args.kind, "step": 0, "seconds": 0.0, "runs": [], "history": []}
    if args.init:
        init = load_codec(args.init).train()
        if init.kind == args.kind:
            model = widen_codec(init, args.widen, seed=args.seed) if args.widen else init  # type: ignore[arg-type]
            with open(os.path.join(args.init, "config.json")) as f:
                prior = json.load(f)
            if prior.get("runs"):  # a model this script trained: its lineage (runs, steps, origin) carries on
                info.update(step=int(prior.get("steps", 0)), seconds=float(prior.get("train_seconds", 0.0)),
                            runs=list(prior["runs"]), continued_from=args.init)
                if prior.get("init"):
                    info["init"] = prior["init"]
        elif init.kind == "codec" and args.kind == "hyperprior":
            cfg = HyperpriorConfig(channels=init.config.channels, latent_channels=init.config.latent_channels,
                                   hyper_channels=args.hyper_channels, lambdas=lambdas or init.config.lambdas)
            model = hyperprior_from_factorized(init, cfg, seed=args.seed)  # type: ignore[arg-type]
            if args.calibrate:
                x = torch.from_numpy(rgb_patches(images, 16, args.patch, seed=args.seed + 7)).float() / 255
                info["calibration"] = calibrate_hyperprior(model, x, z_scale=args.z_scale)  # type: ignore[arg-type]
                print(f"hyper-synthesis started at a per-channel Gaussian: {info['calibration']}", flush=True)
        else:
            raise SystemExit(f"--init {args.init} holds a {init.kind} codec; cannot start a {args.kind} from it")
        info.setdefault("init", f"{args.init} ({init.kind}, N={init.config.channels}, M={init.config.latent_channels})")
        print(f"initialised from {args.init} ({init.kind}, N={init.config.channels}, M={init.config.latent_channels})"
              + (f", continuing its {len(info['runs'])} run(s) and {info['step']} steps" if info.get("continued_from") else ""),
              flush=True)
    else:
        cfg_cls, model_cls = KINDS[args.kind]
        fields = {"channels": args.channels, "latent_channels": args.latent}
        if lambdas:
            fields["lambdas"] = lambdas
        if args.kind == "hyperprior":
            fields["hyper_channels"] = args.hyper_channels
        model = model_cls(cfg_cls(**fields))
    info["config"] = model.config.to_dict()
    return model, info


def param_groups(model: CodecBase, lr: float, hyper_lr: float | None) -> list[dict]:
    """Transforms and gains at ``lr``; the hyperprior's own parts (new when started from a factorized codec) at ``hyper_lr``."""
    hyper_prefixes = ("h_a.", "h_s.", "log_hyper_gain", "log_inv_hyper_gain", "z_priors.")
    base, hyper = [], []
    for name, p in model.named_parameters():
        (hyper if name.startswith(hyper_prefixes) else base).append(p)
    groups = [{"params": base, "lr": lr, "peak": lr}]
    if hyper:
        groups.append({"params": hyper, "lr": hyper_lr or lr, "peak": hyper_lr or lr})
    return groups


def device_check(model: CodecBase, images: list[np.ndarray]) -> dict:
    """On CUDA: do the integer hyper-synthesis and the integer synthesis transform give the same integers
    (and so the same decoded pixels) on the GPU as on the CPU?"""
    if not isinstance(model, HyperpriorCodec) or not torch.cuda.is_available():
        return {}
    model = model.eval()
    x = torch.from_numpy(rgb_patches(images, 1, 256, seed=123)).float() / 255
    q = model.config.levels - 1
    lat = model.analyse(x, q)
    mean, _, index = model.hyper_decode(lat.z, q, tuple(lat.y.shape[-2:]))
    a = torch.round(lat.z.double().unsqueeze(0) * model.inv_hyper_gain_table[q].cpu().view(1, -1, 1, 1)
                    * float(1 << model.config.act_bits))
    cpu_out = model.h_s_int(a)
    gpu_out = model.h_s_int(a, device="cuda").cpu()
    px = {}
    for dev in ("cpu", "cuda"):
        model.to(dev)
        px[dev] = torch.round(model._synthesise(lat.y, mean, q, (256, 256)).cpu() * 255)
    model.to("cpu")
    diff = (px["cpu"] - px["cuda"]).abs()
    return {"integer_hyper_synthesis_equal_on_cuda_float64": bool(torch.equal(cpu_out, gpu_out)),
            "pixels_differing_cpu_vs_cuda": float((diff > 0).float().mean()), "max_pixel_diff": float(diff.max()),
            "table_indices": int(index.numel())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="codec")
    ap.add_argument("--out", default="benchmarks/_work/codec")
    ap.add_argument("--resume", default=None, help="continue from the state in this folder (default: --out's, if any)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training time (startup and the last save excluded)")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--latent", type=int, default=192)
    ap.add_argument("--hyper-channels", type=int, default=None, help="hyperprior: z channels (default: --channels)")
    ap.add_argument("--lambdas", default=None, help="comma-separated, increasing (default: the model's or --init's)")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--hyper-lr", type=float, default=None, help="step size of the hyperprior's h_a, h_s, z priors")
    ap.add_argument("--decay-at", type=float, default=1.0, help="fraction of --minutes after which the step sizes drop 10x")
    ap.add_argument("--calibrate", type=int, default=1,
                    help="with --init of a factorized codec: start the hyper-synthesis at a per-channel Gaussian "
                         "fitted to the latents of 16 crops (1) or from its random initialisation (0)")
    ap.add_argument("--z-scale", type=float, default=1.0,
                    help="with --calibrate: scale of the hyper-analysis' output layer at the start (below 1: z starts small)")
    ap.add_argument("--hyper-only", type=float, default=0.0,
                    help="fraction of --minutes at the start during which only the hyperprior's own parts train "
                         "(the transforms wait for a useful entropy model; with --init of a factorized codec)")
    ap.add_argument("--entropy-only", action="store_true",
                    help="hyperprior (--init or --resume of one): train only its entropy side (h_a, h_s, the z priors, "
                         "the hyper gains; at --hyper-lr, else --lr) on the analysis transform's latents of the training "
                         "images, computed once. The transforms and gains stay as they are, so the distortion does not "
                         "move and the rate is what drops; a step costs a small fraction of a full one (CPU-friendly)")
    ap.add_argument("--scales", default="1", help="scale pyramid of the training images, e.g. 1,0.7,0.5")
    ap.add_argument("--colour-aug", type=float, default=0.0,
                    help="share of crops with their channels permuted and saturation raised (1-3x): saturated colours "
                         "the training photographs lack (0: none, as the committed codecs were trained)")
    ap.add_argument("--save-every", type=float, default=60.0, help="seconds")
    ap.add_argument("--weights-dtype", choices=("auto", "float32", "float16"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true", help="the model and batches in channels-last memory (speed)")
    ap.add_argument("--bf16-transforms", action="store_true",
                    help="g_a and g_s under bf16 autocast, the entropy models in float32 (speed; weights stay float32)")
    ap.add_argument("--init", default=None, help="start from this trained codec folder (a factorized one can start a hyperprior)")
    ap.add_argument("--widen", type=int, default=None, help="with --init of the same kind: grow the hidden width to this")
    ap.add_argument("--images", default=None, help="training photographs from this file (see --save-images)")
    ap.add_argument("--save-images", default=None, help="write the training photographs to this .npz and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.save_images:
        ims = training_images()
        size = save_images(args.save_images, ims)
        print(f"wrote {len(ims)} images ({size / 1e6:.1f} MB) to {args.save_images}")
        return
    sources = load_images_file(args.images) if args.images else training_images()
    scales = tuple(float(s) for s in args.scales.split(","))
    images = pyramid([np.ascontiguousarray(as_rgb(t.pixels)) for t in sources], scales, args.patch // 2)
    images = [np.ascontiguousarray(im) for im in images]

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    resumed = load_state(args.resume or args.out)
    model, info = make_model(args, resumed, images)
    kind = info["kind"]
    model.to(dev).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.bf16_transforms:
        transforms_in_bf16(model, dev.type)
    groups = param_groups(model, args.lr, args.hyper_lr)
    if args.entropy_only:
        if not isinstance(model, HyperpriorCodec):
            raise SystemExit(f"--entropy-only trains a hyperprior's entropy side; this is a {kind} codec")
        groups = groups[-1:]  # the hyperprior's own parts; nothing else gets a gradient
        train_ids = {id(p) for p in groups[0]["params"]}
        for p in model.parameters():
            p.requires_grad_(id(p) in train_ids)
    opt = torch.optim.Adam(groups)
    loss_fn = make_rate_loss_fn(model) if args.entropy_only else make_loss_fn(model)  # type: ignore[arg-type]
    step0 = step = int(info["step"])
    gen = torch.Generator().manual_seed(args.seed + step)
    run = {"device": str(dev), "minutes": args.minutes, "batch": args.batch, "patch": args.patch, "lr": args.lr,
           "hyper_lr": args.hyper_lr, "decay_at": args.decay_at, "hyper_only": args.hyper_only, "scales": list(scales), "start_step": step,
           **({"channels_last": True} if args.channels_last else {}), **({"bf16_transforms": True} if args.bf16_transforms else {}),
           **({"entropy_only": True} if args.entropy_only else {}),
           **({"colour_aug": args.colour_aug} if args.colour_aug and not args.entropy_only else {})}
    lineage = [t.lineage() for t in sources]
    if args.entropy_only:
        t_lat = time.time()
        batches: Batches | LatentCrops = LatentCrops(model, images, args.batch, args.patch, args.seed, step, dev)  # type: ignore[arg-type]
        print(f"latents of {len(images)} images and their mirror images in {time.time() - t_lat:.0f} s "
              f"({len(batches.latents)} of them at least {batches.size} x {batches.size})", flush=True)
    else:
        batches = Batches(images, args.batch, args.patch, args.seed, step, pin=dev.type == "cuda",
                          colour=args.colour_aug)
    t0 = time.time()
    t_end, t_decay, t_save = t0 + args.minutes * 60, t0 + args.decay_at * args.minutes * 60, t0 + args.save_every
    recent: list[torch.Tensor] = []
    parts: list[dict] = []

    def save(final: bool = False) -> None:
        cpu_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        seconds = info["seconds"] + time.time() - t0
        record = {**run, "steps": step - step0, "seconds": round(time.time() - t0, 1)}
        meta = {"steps": step, "train_seconds": round(seconds, 1), "training_images": lineage,
                "heldout_images": list(HELDOUT_IMAGES), "runs": [*info.get("runs", []), record],
                **({"init": info["init"]} if "init" in info else {}),
                **({"continued_from": info["continued_from"]} if "continued_from" in info else {})}
        dtype = export_model(cpu_state, kind, info["config"], args.out, meta, args.weights_dtype)
        history = [*info.get("history", []), *parts]
        save_state(cpu_state, {**info, "step": step, "seconds": seconds, "runs": meta["runs"], "history": history},
                   args.out)
        _atomic_json(os.path.join(args.out, "log.json"), {"history": history,
                                                          "run": record, "weights_dtype": dtype,
                                                          "steps_per_s": round((step - step0) / max(1e-9, time.time() - t0), 2)})
        print(f"saved at step {step} ({time.time() - t0:.0f} s){' (final)' if final else ''}", flush=True)

    decayed = False
    t_joint = t0 + args.hyper_only * args.minutes * 60
    while time.time() < t_end:
        if not decayed and time.time() >= t_decay:
            decayed = True
            print(f"step {step}: step sizes / 10", flush=True)
        warm = min(1.0, (step - step0 + 1) / WARMUP_STEPS)
        joint = time.time() >= t_joint or len(opt.param_groups) == 1
        for i, g in enumerate(opt.param_groups):
            g["lr"] = g["peak"] * warm * (0.1 if decayed else 1.0) * (1.0 if joint or i > 0 else 0.0)
        batch = batches.next().to(dev, non_blocking=True)
        if args.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent.append(loss.detach())
        if step % 100 == 0:
            mean = float(torch.stack(recent).mean())
            recent = []
            parts.append({"step": step, "loss": round(mean, 4), "t": round(time.time() - t0, 1)})
            print(f"step {step} loss {mean:.4f} ({time.time() - t0:.0f} s)", flush=True)
        if time.time() >= t_save:
            save()
            t_save = time.time() + args.save_every
    batches.close()
    save(final=True)
    if dev.type == "cuda":
        check = device_check(load_codec(args.out), images)
        log_path = os.path.join(args.out, "log.json")
        with open(log_path) as f:
            log = json.load(f)
        _atomic_json(log_path, {**log, "device_check": check})
        print(f"device check: {check}", flush=True)
    print(f"done: {step - step0} steps this run, {step} in all", flush=True)


if __name__ == "__main__":
    main()
