"""Train the benchmark codec on bundled photographs (the training split only).

    python -m benchmarks.train_codec --minutes 40 --out benchmarks/_work/codec

Random crops of the training photographs (fresh crops every step, flips), Adam,
the variable-rate R + λ·D loss over every quality level. Saves
``config.json`` + ``weights.safetensors`` (integer tables built) every
``--save-every`` seconds and at the end, and resumes from ``state.safetensors``
when run again with the same ``--out``. The held-out photographs of
:mod:`benchmarks.quality_compress` are never used here.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.codec import CodecConfig, ImageCodec, load_codec_state, make_loss_fn, random_patches
from tasks.sample_data import CODEC_HELDOUT_PHOTOS

# Bundled scikit-image photographs. The held-out set is never seen in training
# (skimage's `cat` is `chelsea`, so it is excluded too).
TRAIN_IMAGES = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass",
                "gravel", "moon", "coins", "clock", "text", "page", "cell")
HELDOUT_IMAGES = CODEC_HELDOUT_PHOTOS  # also written by `aeflow sample-data` as photos/codec-heldout/


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
    ap.add_argument("--save-every", type=float, default=120.0, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small shared machine: no spinning OpenMP barriers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    cfg = CodecConfig(channels=args.channels, latent_channels=args.latent,
                      lambdas=tuple(float(v) for v in args.lambdas.split(",")))
    model = ImageCodec(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    state_path = os.path.join(args.out, "state.safetensors")
    step = 0
    if os.path.exists(state_path):
        st = load_file(state_path)
        load_codec_state(model, {k[6:]: v for k, v in st.items() if k.startswith("model.")})
        step = int(st["step"])
        print(f"resuming at step {step}")
    images = training_images()
    loss_fn = make_loss_fn(model)
    gen = torch.Generator().manual_seed(args.seed + step)
    model.train()
    t_end = time.time() + args.minutes * 60
    t_save = time.time() + args.save_every
    log = []
    while time.time() < t_end:
        batch = torch.from_numpy(random_patches(images, args.batch, args.patch, seed=args.seed * 1_000_003 + step))
        loss = loss_fn(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append(float(loss.detach()))
        if step % 20 == 0:
            print(f"step {step} loss {np.mean(log[-20:]):.4f}", flush=True)
        if time.time() >= t_save:
            save_codec(model, args.out, step)
            save_file({**{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                       "step": torch.tensor(step)}, state_path)
            t_save = time.time() + args.save_every
            print(f"saved at step {step}", flush=True)
    save_codec(model, args.out, step)
    save_file({**{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, "step": torch.tensor(step)},
              state_path)
    print(f"done: {step} steps", flush=True)


if __name__ == "__main__":
    main()
