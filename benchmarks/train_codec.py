"""Train the benchmark codec on bundled photographs (the training split only).

    python -m benchmarks.train_codec --minutes 40 --out benchmarks/_work/codec
    python -m benchmarks.train_codec --device cuda --init benchmarks/weights/codec --widen 128 \
        --patch 256 --batch 16 --lr 1e-4 --decay-at 0.75 --minutes 7 --out /tmp/codec128

Random crops of the training photographs (fresh crops every step, flips), Adam,
the variable-rate R + λ·D loss over every quality level. Saves
``config.json`` + ``weights.safetensors`` (integer tables built) every
``--save-every`` seconds and at the end, and resumes from ``state.safetensors``
when run again with the same ``--out``. The held-out photographs of
:mod:`benchmarks.quality_compress` are never used here.

``--init DIR`` starts from a trained codec; with ``--widen N`` its hidden width
is first grown to ``N`` without changing what it computes (:func:`models.codec.widen_codec`).
``--images FILE.npz`` reads the training photographs from a file written by
``--save-images`` (for a machine without scikit-image's downloaded data, e.g. a GPU box).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.codec import CodecConfig, ImageCodec, load_codec_state
from models.codec_train import make_loss_fn, widen_codec
from models.image_ops import as_rgb, rgb_patches

# Bundled scikit-image photographs. The held-out set is never seen in training
# (skimage's `cat` is `chelsea`, so it is excluded too).
TRAIN_IMAGES = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass",
                "gravel", "moon", "coins", "clock", "text", "page", "cell")
# tasks.sample_data.CODEC_HELDOUT_PHOTOS, written by `aeflow sample-data` as photos/codec-heldout/
# (repeated so this script needs only torch, numpy and safetensors; a test checks they agree).
HELDOUT_IMAGES = ("chelsea", "coffee", "rocket", "camera")


def load_images(names: tuple[str, ...]) -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, n)()) for n in names]


def training_images() -> list[np.ndarray]:
    """The training photographs, plus half-size copies of the large ones (more detail per crop)."""
    from PIL import Image

    out = []
    for im in load_images(TRAIN_IMAGES):
        out.append(im)
        if min(im.shape[:2]) >= 800:
            pil = Image.fromarray(im)
            out.append(np.asarray(pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.LANCZOS)))
    return out


def save_codec(model: ImageCodec, out: str, steps: int | None = None) -> None:
    model.eval()
    model.update_tables()
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "weights.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"kind": model.kind, "config": model.config.to_dict(), "steps": steps}, f, indent=2)
    model.train()


def load_codec(path: str) -> ImageCodec:
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    model = ImageCodec(CodecConfig.from_dict(meta["config"]))
    load_codec_state(model, load_file(os.path.join(path, "weights.safetensors")))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/_work/codec")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--latent", type=int, default=192)
    ap.add_argument("--lambdas", default="0.0006,0.0025,0.006,0.015,0.04,0.1,0.35")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--decay-at", type=float, default=1.0,
                    help="fraction of --minutes after which the step size drops to --final-lr")
    ap.add_argument("--final-lr", type=float, default=1e-5)
    ap.add_argument("--save-every", type=float, default=120.0, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small shared machine: no spinning OpenMP barriers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init", default=None, help="start from this trained codec (config.json + weights)")
    ap.add_argument("--widen", type=int, default=None, help="with --init: grow the hidden width to this")
    ap.add_argument("--images", default=None, help="training photographs from this .npz (see --save-images)")
    ap.add_argument("--state", default=None, help="resumable training state (default: OUT/state.safetensors)")
    ap.add_argument("--save-images", default=None, help="write the training photographs to this .npz and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.save_images:
        ims = training_images()
        np.savez_compressed(args.save_images, **{f"im{i:02d}": im for i, im in enumerate(ims)})
        print(f"wrote {len(ims)} images to {args.save_images}")
        return
    if args.images:
        with np.load(args.images) as z:
            images = [z[k] for k in sorted(z.files)]
    else:
        images = training_images()
    images = [np.ascontiguousarray(as_rgb(im)) for im in images]  # once, not per batch

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    state_path = args.state or os.path.join(args.out, "state.safetensors")
    if args.init and not os.path.exists(state_path):
        model = load_codec(args.init).train()
        if args.widen:
            model = widen_codec(model, args.widen, seed=args.seed)
        print(f"initialised from {args.init} (N={model.config.channels}, M={model.config.latent_channels})")
    else:
        model = ImageCodec(CodecConfig(channels=args.widen or args.channels, latent_channels=args.latent,
                                       lambdas=tuple(float(v) for v in args.lambdas.split(","))))
    step = 0
    if os.path.exists(state_path):
        st = load_file(state_path)
        load_codec_state(model, {k[6:]: v for k, v in st.items() if k.startswith("model.")})
        step = int(st["step"])
        print(f"resuming at step {step}")
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = make_loss_fn(model)
    gen = torch.Generator().manual_seed(args.seed + step)
    model.train()
    t0 = time.time()
    t_end = t0 + args.minutes * 60
    t_decay = t0 + args.decay_at * args.minutes * 60
    t_save = t0 + args.save_every
    log = []

    def save() -> None:
        cpu = model.to("cpu")
        save_codec(cpu, args.out, step)
        save_file({**{f"model.{k}": v.contiguous() for k, v in cpu.state_dict().items()},
                   "step": torch.tensor(step)}, state_path)
        model.to(dev)

    while time.time() < t_end:
        if time.time() >= t_decay and opt.param_groups[0]["lr"] != args.final_lr:
            for group in opt.param_groups:
                group["lr"] = args.final_lr
            print(f"step {step}: lr {args.final_lr}", flush=True)
        batch = torch.from_numpy(rgb_patches(images, args.batch, args.patch, seed=args.seed * 1_000_003 + step))
        loss = loss_fn(model, batch.to(dev, non_blocking=True), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append(loss.detach())
        if step % 200 == 0:
            print(f"step {step} loss {float(torch.stack(log[-200:]).mean()):.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            log = log[-200:]
        if time.time() >= t_save:
            save()
            t_save = time.time() + args.save_every
            print(f"saved at step {step}", flush=True)
    save()
    print(f"done: {step} steps", flush=True)


if __name__ == "__main__":
    main()
