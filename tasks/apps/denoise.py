"""denoise: a convolutional denoising autoencoder for images, with classical baselines.

Training (``aeflow run denoise --input clean_dir``): random patches of the clean
images (each colour channel is a grayscale sample), corrupted on the fly with
seeded Gaussian noise (sigma in 0..255 units), salt-and-pepper or random masking;
the network is a U-Net-style conv autoencoder that predicts the correction. The
run reports PSNR/SSIM on held-out images with synthetic Gaussian noise of the
training sigma, for the noisy input, ours and the baselines.

Applying (``--model RUN --apply-to noisy_dir``): every image is denoised at full
resolution (tiled, no seams) into ``denoised/<relative path>``, same size and
format as the input, grayscale or RGB as it was read (an image converted at the door,
e.g. a palette or 16-bit PNG or one with transparency, is counted in the run's notes). With ``--clean-reference DIR`` (same relative paths),
PSNR/SSIM before and after are reported per image (``report/per_image.csv``)
together with scikit-image's TV (Chambolle), wavelet (BayesShrink) and
NL-means, and BM3D, on the same images; ``report/side_by_side.png`` shows
noisy / ours / best baseline / clean.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator

from models.dense import seeded
from models.image_ops import random_patches_streamed, tiled_apply
from models.noise import NOISE_KINDS, DenoisingLoss, NoiseConfig
from tasks.apps.base import FIT_ONLY, ApplyProgress, Evaluation, Fitted, on_worker, register
from tasks.apps.images_base import ConvModelConfig, ImageApp, ImageRunConfig
from tasks.apps.kinds import ImageContext
from tasks.config import AppConfig, PreprocessConfig, TrainConfig
from tasks.errors import InputError
from tasks.images import (
    ImageLoadConfig,
    ImageSet,
    encode_like,
    images_of,
    iter_images,
    shard_images,
    shard_rels,
)
from tasks.report import pyplot, save_figure
from tasks.train import train_model

BASELINES = ("tv", "wavelet", "nl_means", "bm3d")


class Config(AppConfig):
    """Settings of the denoise application."""

    name = "denoise"
    noise: tuple[str, ...] = Field(("gaussian",), description=f"Corruptions to train with, any of {list(NOISE_KINDS)}.")
    sigma: float = Field(25.0, ge=0, le=255, description="Gaussian noise sigma in 0..255 units (training and held-out evaluation).")
    sigma_max: float | None = Field(None, ge=0, le=255, description="Train on sigma drawn from [sigma, sigma_max] (blind denoising).")
    salt_pepper: float = Field(0.05, ge=0, lt=1, description="Fraction of salt-and-pepper pixels.")
    mask: float = Field(0.2, ge=0, lt=1, description="Fraction of masked (zeroed) pixels.")
    patch_size: int = Field(48, ge=8, le=1024, description="Side of the random training patches.")
    patches: int = Field(8000, ge=16, description="Training patches drawn from the clean images (augmented and re-noised each epoch).")
    tile: int = Field(384, ge=32, description="Tile side for full-resolution inference.")
    overlap: int = Field(32, ge=0, description="Overlap of neighbouring tiles, blended without seams.")
    noise_sigma: float | None = Field(
        None, ge=0, le=255, description="Sigma of the applied images' noise for NL-means/BM3D (None: estimated)."
    )
    eval_images: int = Field(16, ge=1, description="Images (at most) scored with ours and the baselines.")
    baselines: tuple[str, ...] = Field(BASELINES, description=f"Classical denoisers to compare with, any of {list(BASELINES)}.")
    side_by_side: int = Field(3, ge=0, le=16, description="Images shown in report/side_by_side.png.")

    @field_validator("noise")
    @classmethod
    def _kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [k for k in v if k not in NOISE_KINDS]
        if not v or bad:
            raise ValueError(f"noise must be a non-empty subset of {list(NOISE_KINDS)}, got {list(v)}")
        return v

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [k for k in v if k not in BASELINES]
        if bad:
            raise ValueError(f"baselines must be a subset of {list(BASELINES)}, got {list(v)}")
        return v

    def noise_config(self) -> NoiseConfig:
        return NoiseConfig(kinds=self.noise, sigma=self.sigma, sigma_max=self.sigma_max, salt_pepper=self.salt_pepper, mask=self.mask)


class DenoiseRunConfig(ImageRunConfig):
    """A run of denoise: the flow's parameter."""

    app: Config = Config()
    load: ImageLoadConfig = ImageLoadConfig(mode="keep")
    # The configuration measured in benchmarks/RESULTS.md (0.43 M parameters).
    model: ConvModelConfig = ConvModelConfig(channels=(32, 64, 128), latent_channels=64, blocks=1, skip=True, residual=True)
    preprocess: PreprocessConfig = PreprocessConfig(val_fraction=0.2)
    # The training budget measured in benchmarks/RESULTS.md: 8,000 patches x 10 epochs (~20 min on one CPU core).
    train: TrainConfig = TrainConfig(epochs=10, default_batch_size=32, lr=2e-3, patience=5)
    UNUSED: ClassVar[dict[str, str]] = {
        **ImageRunConfig.UNUSED,
        "train.stream": "denoise trains on patches drawn from every training image",
        "train.memory_mb": "denoise trains on patches drawn from every training image",
    }


def _channels(imset: ImageSet, idx: np.ndarray) -> Iterator[np.ndarray]:
    """The images ``idx`` (increasing) of ``imset``, decoded one shard at a time, every colour channel
    as its own 1-channel image: the model is grayscale, applied per channel."""
    keep = {int(i) for i in idx}
    for i, im in enumerate(iter_images(imset)):
        if i in keep:
            yield from (im[c : c + 1] for c in range(im.shape[0]))


def _channel_shapes(imset: ImageSet, idx: np.ndarray) -> list[tuple[int, int]]:
    """(H, W) of every image :func:`_channels` yields, in order."""
    return [(h, w) for i in idx for c, h, w in [imset.shapes[int(i)]] for _ in range(c)]


@torch.inference_mode()
def denoise_array(fitted: Fitted, x: np.ndarray, device: torch.device, tile: int, overlap: int,
                  on_tile: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Denoise one float ``(C, H, W)`` image in [0, 1] (any size, any channels); returns float in [0, 1].
    ``on_tile(done, total)`` after each tile of an image larger than ``tile``."""
    model = fitted.model
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None].to(device)  # channels as a batch
    overlap = min(overlap, tile // 2)
    out = tiled_apply(lambda b: model(b).x_hat, t, tile=tile, overlap=overlap, on_tile=on_tile)
    return out[:, 0].clamp_(0, 1).cpu().numpy()


def baseline_fns(sigma: float) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The classical denoisers on an ``(H, W)`` float image in [0, 1]; ``sigma`` in [0, 1] units."""
    from skimage.restoration import (
        denoise_nl_means,
        denoise_tv_chambolle,
        denoise_wavelet,
    )

    def bm3d_(x: np.ndarray) -> np.ndarray:
        import bm3d

        return np.asarray(bm3d.bm3d(x, sigma_psd=max(sigma, 1e-4)), dtype=np.float64)

    return {
        # TV weight proportional to the noise level (skimage's default 0.1 suits sigma ~ 0.1).
        "tv": lambda x: denoise_tv_chambolle(x, weight=max(sigma, 1e-3)),
        "wavelet": lambda x: denoise_wavelet(x, method="BayesShrink", mode="soft", sigma=sigma, rescale_sigma=True),
        # The settings of scikit-image's NL-means example, with sigma known.
        "nl_means": lambda x: denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True),
        "bm3d": bm3d_,
    }


def _psnr_ssim(clean: np.ndarray, est: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    c, e = clean.transpose(1, 2, 0), np.clip(est, 0, 1).transpose(1, 2, 0)
    psnr = float(peak_signal_noise_ratio(c, e, data_range=1.0))
    ssim = float(structural_similarity(c, e, data_range=1.0, channel_axis=2))
    return psnr, ssim


def _denoise_shard(index: int, *, app: Denoise, ctx: ImageContext, fitted: Fitted) -> dict[str, int]:
    """One shard of the applied images on a Dask worker: ``denoised/<relative path>`` for each; the
    tiles of a large image are reported as they are done (a 6 MP photograph takes ~50 s on a CPU)."""
    from tasks.dask_client import report_progress

    ctx, fitted = on_worker(app, ctx, fitted)
    cfg: Config = ctx.config.app  # type: ignore[assignment]
    rels = shard_rels(ctx.target, index)
    pixels = 0
    for rel, img in zip(rels, shard_images(ctx.target, index), strict=True):
        area = img.shape[1] * img.shape[2]

        def on_tile(done: int, total: int, rel: str = rel, before: int = pixels, area: int = area) -> None:
            report_progress({"item": index, "done": before + area * done / total,
                             "detail": f"denoised tile {done}/{total} of {rel}"})

        out = denoise_array(fitted, img.astype(np.float32) / 255.0, ctx.device, cfg.tile, cfg.overlap, on_tile)
        ctx.run.write_bytes(f"denoised/{rel}", encode_like(np.round(out * 255.0).astype(np.uint8), rel))
        pixels += area
    return {"item": index, "images": len(rels), "pixels": pixels}


def _scored(total: int, cfg: Config, seed: int) -> list[int]:
    """Which of ``total`` applied images are scored against the clean reference (with the baselines):
    app.eval_images of them, a seeded sample when there are more (the first ones were all from one class
    folder), in their order."""
    if total <= cfg.eval_images:
        return list(range(total))
    return sorted(np.random.default_rng(seed + 4321).choice(total, cfg.eval_images, replace=False).tolist())


def _reference_pairs(target: ImageSet, reference: ImageSet, chosen: list[int]) -> list[int]:
    """The reference image of each chosen applied image (same relative path, same size and channels).

    Raises:
        InputError: one is missing or differs in shape, named.
    """
    ref = dict(zip(reference.rel, range(len(reference)), strict=True))
    out = []
    for i in chosen:
        rel = target.rel[i]
        if rel not in ref:
            raise InputError(f"clean reference {reference.source_uri} has no image {rel!r} to compare denoised/{rel} with")
        (c, h, w), (rc, rh, rw) = target.shapes[i], reference.shapes[ref[rel]]
        if (rc, rh, rw) != (c, h, w):
            raise InputError(f"{reference.path_of(ref[rel])} is {rw}x{rh}x{rc} but the noisy image is {w}x{h}x{c} "
                             "(width x height x channels)")
        out.append(ref[rel])
    return out


@register
class Denoise(ImageApp):
    name = "denoise"
    Config = Config
    RunConfig = DenoiseRunConfig
    headlines = (("psnr", True), ("ssim", True))
    # the training noise and patches (with --model there are no held-out images to add --sigma's noise to)
    fit_only = FIT_ONLY + tuple(f"app.{k}" for k in ("noise", "sigma", "sigma_max", "salt_pepper", "mask", "patch_size",
                                                      "patches"))
    # A training run denoises nothing unless --apply-to names images (its input is clean); not "default: the input"
    option_help: ClassVar[dict[str, str]] = {
        "apply_to": ("Noisy images to denoise (a folder of PNG/JPEG, local or s3://): denoised/<relative path> in the "
                     "run. Without it a training run applies nothing and scores held-out images with synthetic "
                     "noise; with --model, --input is applied when --apply-to is not given."),
    }
    cli_options = ImageApp.cli_options + (
        ("--clean-reference", "load.reference", str, "Clean images with the same relative paths as --apply-to: PSNR/SSIM and baselines."),
        ("--sigma", "app.sigma", float, "Gaussian noise sigma in 0..255 units (training, held-out evaluation)."),
        ("--noise-sigma", "app.noise_sigma", float, "Sigma of the applied images' noise for NL-means/BM3D, in 0..255 units (default: estimated)."),
        ("--patch-size", "app.patch_size", int, "Side of the random training patches."),
        ("--patches", "app.patches", int, "Number of training patches."),
    )

    def min_side(self, config, role: str, fitted: Fitted | None = None) -> int:
        if role == "input":
            return max(config.app.patch_size, self.factor(config, fitted))
        return self.factor(config, fitted)

    def too_small_for(self, config, role: str, fitted: Fitted | None = None) -> str:
        if role == "input":
            return f"the network's {config.app.patch_size}x{config.app.patch_size} training patches (--patch-size)"
        return super().too_small_for(config, role, fitted)

    def check_data(self, ctx: ImageContext) -> None:
        """The clean reference of every applied image that will be scored, from the listings and decoded
        shapes (the images' sizes were checked as they were decoded): before training and applying, not after
        them (a missing or resized reference ended a run at its evaluation, after training had run and with its
        checkpoint left behind)."""
        if ctx.target is not None and ctx.reference is not None:
            _reference_pairs(ctx.target, ctx.reference, _scored(len(ctx.target), ctx.config.app, ctx.config.train.seed))

    # -- fit ------------------------------------------------------------------------------
    def fit(self, ctx: ImageContext) -> Fitted:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        tr_idx, va_idx = ctx.split()
        seed = ctx.config.train.seed
        # Crops planned from the images' sizes and cut as each image is decoded (one shard in memory
        # at a time, not the whole training set); every colour channel is an image of its own.
        train_p = random_patches_streamed(_channel_shapes(ctx.train, tr_idx), _channels(ctx.train, tr_idx),
                                          [(cfg.patches, seed)], cfg.patch_size)[0]
        val_p = (
            random_patches_streamed(_channel_shapes(ctx.train, va_idx), _channels(ctx.train, va_idx),
                                    [(max(64, cfg.patches // 8), seed + 1)], cfg.patch_size)[0]
            if len(va_idx)
            else train_p[:0]
        )
        with seeded(seed):  # initial weights from the seed: the same in every process
            model = ctx.config.model.build(in_channels=1)  # type: ignore[attr-defined]
        result = train_model(
            model, train_p, val_p, ctx.config.train, run=ctx.run, loss_fn=DenoisingLoss(cfg.noise_config()),
            label="denoise autoencoder",
        )
        model.to(ctx.device).eval()
        state = {"noise": cfg.noise_config().to_dict(), "patch_size": cfg.patch_size,
                 "train_images": len(tr_idx), "val_images": len(va_idx)}
        return Fitted(model=model, state=state, train=result)

    # -- apply ----------------------------------------------------------------------------
    def apply(self, ctx: ImageContext, fitted: Fitted) -> dict[str, str]:
        if ctx.target is None:
            return {}
        target = ctx.target
        progress = ApplyProgress("denoise apply", len(target), target.megapixels * 1e6, items="images", unit="MP",
                                 scale=1e6, digits=1)
        self.map_shards(ctx, fitted, _denoise_shard, list(range(len(target.shards))),
                        on_done=lambda r: progress.done(r["pixels"], r["images"], item=r["item"]),
                        on_progress=progress.progress)
        return {"denoised": "denoised"}

    # -- evaluate -------------------------------------------------------------------------
    def _pairs(self, ctx: ImageContext, cfg: Config) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], float, str]:
        """(name, noisy, clean) float images, the noise sigma in [0, 1] units, and where they come from."""
        if ctx.target is not None and ctx.reference is not None:
            total = len(ctx.target)
            chosen = _scored(total, cfg, ctx.config.train.seed)
            ref_idx = _reference_pairs(ctx.target, ctx.reference, chosen)  # checked again: they were before training
            rels = [ctx.target.rel[i] for i in chosen]
            refs = images_of(ctx.reference, ref_idx)  # only these are read
            pairs = []
            for rel, img, clean in zip(rels, images_of(ctx.target, chosen), refs, strict=True):
                pairs.append((rel, img.astype(np.float32) / 255.0, clean.astype(np.float32) / 255.0))
            if cfg.noise_sigma is not None:
                sigma = cfg.noise_sigma / 255.0
            else:
                from skimage.restoration import estimate_sigma

                sigma = float(np.mean([np.mean(estimate_sigma(n, channel_axis=0)) for _, n, _ in pairs]))
            of = (f"{len(pairs)} of the {total} applied images (a seeded sample: app.eval_images={cfg.eval_images})"
                  if total > len(pairs) else f"{len(pairs)} applied image{'s' if len(pairs) != 1 else ''}")
            return pairs, sigma, f"{of} against the clean reference"
        if ctx.train is None:
            return [], 0.0, "no clean reference (pass --clean-reference DIR to score the denoised images)"
        tr_idx, va_idx = ctx.split()
        idx = va_idx if len(va_idx) else tr_idx
        where = ("held-out" if len(va_idx) else
                 f"training (no held-out images: preprocess.val_fraction={ctx.config.preprocess.val_fraction:g})")
        rng = np.random.default_rng(ctx.config.train.seed + 12345)
        sigma = cfg.sigma / 255.0
        pairs = []
        for i, img in zip(idx[: cfg.eval_images], images_of(ctx.train, idx[: cfg.eval_images]), strict=True):
            clean = img.astype(np.float32) / 255.0
            noisy = (clean + rng.normal(0.0, sigma, clean.shape)).astype(np.float32)
            pairs.append((ctx.train.rel[i], noisy, clean))
        return pairs, sigma, f"{len(pairs)} {where} images with Gaussian noise sigma={cfg.sigma:g}/255"

    def evaluate(self, ctx: ImageContext, fitted: Fitted) -> Evaluation:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        ev = Evaluation()
        size, fit = ctx.config.load.size, ctx.config.load.fit
        if size:  # the outputs are not at the files' own sizes: said, as the README's "same size" assumes
            ev.notes.append(f"load.size {size}: every image was {'resized' if fit == 'resize' else 'cropped at its centre'}"
                            f" to {size}x{size} before denoising, so denoised/ holds them at that size, not at the "
                            "files' own (leave load.size unset to denoise each image at its own size)")
        pairs, sigma, where = self._pairs(ctx, cfg)
        if not pairs:
            ev.notes.append(where)
            return ev
        mp = sum(n.shape[1] * n.shape[2] for _, n, _ in pairs) / 1e6
        rows: list[dict[str, object]] = []
        outputs: dict[str, list[np.ndarray]] = {"ours": []}
        t_ours = 0.0
        fns = baseline_fns(sigma)
        t_base = dict.fromkeys(cfg.baselines, 0.0)
        for b in cfg.baselines:
            outputs[b] = []
        for rel, noisy, clean in pairs:
            row: dict[str, object] = {"image": rel, "width": noisy.shape[2], "height": noisy.shape[1], "channels": noisy.shape[0]}
            row["psnr_noisy"], row["ssim_noisy"] = _psnr_ssim(clean, noisy)
            t0 = time.perf_counter()
            ours = denoise_array(fitted, noisy, ctx.device, cfg.tile, cfg.overlap)
            t_ours += time.perf_counter() - t0
            outputs["ours"].append(ours)
            row["psnr"], row["ssim"] = _psnr_ssim(clean, ours)
            for b in cfg.baselines:
                t0 = time.perf_counter()
                est = np.stack([fns[b](noisy[c].astype(np.float64)) for c in range(noisy.shape[0])]).astype(np.float32)
                t_base[b] += time.perf_counter() - t0
                outputs[b].append(est)
                row[f"psnr_{b}"], row[f"ssim_{b}"] = _psnr_ssim(clean, est)
            rows.append(row)

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in rows]))

        ev.metrics = {
            "psnr": mean("psnr"),
            "ssim": mean("ssim"),
            "psnr_noisy": mean("psnr_noisy"),
            "ssim_noisy": mean("ssim_noisy"),
            "psnr_gain": mean("psnr") - mean("psnr_noisy"),
            "seconds_per_mp": t_ours / mp,
            "n_images": len(rows),
        }
        for b in cfg.baselines:
            ev.baselines[b] = {"psnr": mean(f"psnr_{b}"), "ssim": mean(f"ssim_{b}"), "seconds_per_mp": t_base[b] / mp}
        # the sigma is an input of NL-means and BM3D only: said when one of them ran
        given = [name for b, name in (("nl_means", "NL-means"), ("bm3d", "BM3D")) if b in cfg.baselines]
        ev.notes.append(f"PSNR (dB) and SSIM on {where}" + (
            f"; noise sigma for {'/'.join(given)} {sigma * 255:.1f}/255" if given else ""))
        import pandas as pd

        buf = io.StringIO()
        pd.DataFrame(rows).to_csv(buf, index=False, float_format="%.4f")
        ctx.run.write_bytes("report/per_image.csv", buf.getvalue().encode())
        ctx.artifacts["per_image"] = "report/per_image.csv"
        if cfg.side_by_side:
            best = max(cfg.baselines, key=lambda b: ev.baselines[b]["psnr"]) if cfg.baselines else None
            ctx.artifacts["side_by_side"] = _side_by_side(ctx, pairs, outputs, best, rows, cfg.side_by_side)
        return ev



def _crop(a: np.ndarray, size: int = 256) -> np.ndarray:
    _, h, w = a.shape
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    a = np.clip(a[:, y : y + size, x : x + size], 0, 1)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _side_by_side(ctx, pairs, outputs, best, rows, n: int) -> str:
    plt = pyplot()

    n = min(n, len(pairs))
    cols = [("noisy", None), ("aeflow", "ours")] + ([(best, best)] if best else []) + [("clean", None)]
    fig, axes = plt.subplots(n, len(cols), figsize=(3 * len(cols), 3 * n), squeeze=False)
    for i in range(n):
        rel, noisy, clean = pairs[i]
        for j, (title, key) in enumerate(cols):
            img = noisy if title == "noisy" else clean if title == "clean" else outputs[key][i]
            psnr = rows[i]["psnr_noisy"] if title == "noisy" else rows[i]["psnr"] if key == "ours" else rows[i].get(f"psnr_{key}")
            ax = axes[i][j]
            ax.imshow(_crop(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}" + (f" {psnr:.2f} dB" if psnr is not None and title != "clean" else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel(rel, fontsize=8)
    fig.suptitle("noisy / aeflow / best baseline / clean (centre crop)", fontsize=10)
    return save_figure(ctx.run, "report/side_by_side.png", fig)
