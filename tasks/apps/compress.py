"""compress: a learned image codec that writes real entropy-coded .aec files, compared with JPEG and WebP.

Trains (or reuses --model) a variable-rate learned codec on random crops of the
input images, then compresses every image of --apply-to (default: the input):
codes/<relpath>.aec and decoded/<relpath>.png. Metrics per image and overall:
bits per pixel from the file sizes, PSNR, MS-SSIM, encode/decode time; every
quality level and Pillow JPEG/WebP quality sweeps on the same images give the
rate-distortion plot and the BD-rate vs JPEG and WebP.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from models.codec import CodecBase
from models.codec_train import make_loss_fn
from models.dense import seeded
from models.image_ops import rgb_patches_streamed
from models.metrics import PSNR_MAX_DB, bd_rate_why
from tasks.apps.base import FIT_ONLY, ApplyProgress, Evaluation, Fitted, on_worker, register
from tasks.apps.images_base import ImageApp
from tasks.apps.kinds import ImageContext
from tasks.codec import (
    JPEG_QUALITIES,
    WEBP_QUALITIES,
    LoadedCodec,
    check_quality,
    check_refine_steps,
    code_image,
    codec_from_files,
    encode_png,
    from_chw,
    new_codec,
    pillow_point,
)
from tasks.config import AppConfig, RunConfig, TrainConfig
from tasks.images import (
    ImageLoadConfig,
    ImageSet,
    Mode,
    iter_images,
    shard_images,
    shard_rels,
)
from tasks.storage import RunDir, join_uri
from tasks.train import run_logger, train_model


class CompressConfig(AppConfig):
    """Settings of the compress application."""

    name: ClassVar[str] = "compress"
    quality: int | None = Field(
        None, ge=0, description="Quality level of the written codes/ and decoded/ (0 = lowest rate; default: the middle level)."
    )
    codec: Literal["factorized", "hyperprior"] = Field(
        "factorized", description="Codec to train: factorized prior, or mean-scale hyperprior (fewer bits, slower to train).")
    channels: int = Field(64, ge=4, le=512, description="Hidden width N of the analysis/synthesis transforms.")
    latent_channels: int = Field(192, ge=4, le=1024, description="Latent width M (its channels bound the quality at high rates).")
    lambdas: tuple[float, ...] = Field(
        (0.0006, 0.0025, 0.006, 0.015, 0.04, 0.1, 0.35),
        description="Rate-distortion trade-off of each quality level, lowest rate first (about 0.1 to 1.2 bpp on photographs).",
    )
    refine_steps: int = Field(
        0, ge=0, le=10000,
        description="Encoder-side latent refinement steps per image and level (0: the analysis transform alone; "
                    "about 100: fewer bits and higher PSNR, a few hundred times slower encoding; decoding unchanged).",
    )
    patch_size: int = Field(64, ge=16, le=512, description="Training crop size (a multiple of 16).")
    patches: int = Field(2048, ge=8, description="Random training crops per epoch (drawn once, seeded).")
    rd_sweep: bool = Field(True, description="Code images at every quality level and run the JPEG/WebP sweeps (rd.parquet, the RD plot, BD-rates).")
    rd_images: int = Field(
        16, ge=0, description="Images in the rate-distortion sweep: an even sample of the coded images, first and last "
                              "included (0: all of them). Every image is still coded at --quality.")
    jpeg_qualities: tuple[int, ...] = Field(JPEG_QUALITIES, description="Pillow JPEG qualities of the baseline sweep.")
    webp_qualities: tuple[int, ...] = Field(WEBP_QUALITIES, description="Pillow WebP qualities of the baseline sweep.")

    @field_validator("lambdas")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(x <= 0 for x in v) or list(v) != sorted(v):
            raise ValueError(f"lambdas must be positive and increasing, got {list(v)}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _multiple(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"patch_size must be a multiple of 16, got {v}")
        return v

    @model_validator(mode="after")
    def _refinable(self) -> CompressConfig:
        # Before training, not after it (the codes are written after the codec is trained).
        if self.refine_steps and self.codec == "hyperprior":
            raise ValueError(f"refine_steps {self.refine_steps}: latent refinement is implemented for the factorized "
                             "codec only (use --refine-steps 0 with --codec hyperprior)")
        return self


class CompressLoadConfig(ImageLoadConfig):
    """Image loading for the codec: the shared Dask loader, modes kept (L or RGB), transparency refused."""

    mode: Mode = Field("keep", description="keep (grayscale stays 1 channel, colour is RGB; palette, CMYK and 16-bit "
                       "images are converted, counted in the run's notes), gray or rgb.")
    alpha: Literal["white", "refuse"] = Field(
        "refuse", description="Images with transparency: refuse them (the codec has no alpha plane) or composite on white."
    )


class CompressRunConfig(RunConfig):
    """One run of compress (the flow's parameter)."""

    load: CompressLoadConfig = CompressLoadConfig()
    app: CompressConfig = CompressConfig()
    # CPU-friendly defaults: a variable-rate codec needs many steps; reuse a trained run with --model.
    train: TrainConfig = TrainConfig(epochs=20, default_batch_size=8, lr=5e-4, patience=5)
    UNUSED: ClassVar[dict[str, str]] = {
        "model": "the codec's architecture is app.codec, its rates app.lambdas",
        "preprocess": "the codec trains on every input image: it has no validation split or scaling",
        "train.stream": "the codec trains on crops drawn from every input image",
        "train.memory_mb": "the codec trains on crops drawn from every input image",
    }

    @model_validator(mode="after")
    def _quality_of_the_codec_to_train(self) -> CompressRunConfig:
        # A codec trained here has one level per lambda: a --quality beyond them fails now, not after training
        # (with --model, the model's own levels are checked when it is loaded: Compress.check_fitted).
        q, levels = self.app.quality, len(self.app.lambdas)
        if self.model_run is None and q is not None and q >= levels:
            raise ValueError(f"app.quality {q}: the codec to train has {levels} quality levels, so --quality must be "
                             f"in 0..{levels - 1} (one level per app.lambdas)")
        return self


def codec_of(fitted: Fitted) -> LoadedCodec:
    """The fitted codec as the coding functions of ``tasks/codec.py`` take it (model, identity, source)."""
    return LoadedCodec(model=fitted.model, identity=bytes.fromhex(fitted.state["codec_id"]),
                       source=fitted.source_run or "")


class _EncodeProgress:
    """Refined encoding is slow: a log line per image and a progress artifact in the UI (nothing when fast)."""

    def __init__(self, refine_steps: int, total: int, what: str) -> None:
        from tasks.train import UiProgress, run_logger

        self.active = refine_steps > 0 and total > 0
        self.total, self.count, self.what = total, 0, what
        if self.active:
            self.log = run_logger()
            self.ui = UiProgress(key="compress-encoding", description=f"{what}: refined encodings done")

    def done(self, label: str) -> None:
        self.done_many(1, label)

    def done_many(self, n: int, label: str = "") -> None:
        if not self.active:
            return
        self.count += n
        self.log.info("%s: %d/%d refined encodings%s", self.what, self.count, self.total, f" ({label})" if label else "")
        self.ui.update(100.0 * self.count / self.total)


def decoded_name(rel: str) -> str:
    """Where image ``rel`` is written decoded, below ``decoded/``: its path with ``.png`` for its extension."""
    return f"{rel.rsplit('.', 1)[0]}.png"


def _code_shard(index: int, *, app: CompressApp, ctx: ImageContext, fitted: Fitted) -> list[dict[str, Any]]:
    """One shard of images through the codec on a Dask worker: their .aec files, decoded PNGs and metrics."""
    ctx, fitted = on_worker(app, ctx, fitted)
    q, a = app.quality(ctx.config, fitted), ctx.config.app
    target, codec = app.target(ctx), codec_of(fitted)
    rows = []
    for rel, chw in zip(shard_rels(target, index), shard_images(target, index), strict=True):
        img, mode = from_chw(chw)
        coded = code_image(codec, img, mode, q, join_uri(target.source_uri, rel), a.refine_steps)
        ctx.run.write_bytes(f"codes/{rel}.aec", coded.data)
        ctx.run.write_bytes(f"decoded/{decoded_name(rel)}", encode_png(coded.decoded))
        h, w = img.shape[:2]
        rows.append({
            "image": rel, "width": w, "height": h, "mode": mode, "quality": q, "bytes": len(coded.data),
            "bpp": coded.bpp, "psnr": coded.psnr, "ms_ssim": coded.ms_ssim,
            "encode_s": coded.encode_s, "decode_s": coded.decode_s,
            "payload_bits": coded.payload_bits, "estimate_bits": coded.estimate_bits,
        })
    return rows


def equal_rate_baseline(fmt: str, bpp: float, curve: pd.DataFrame) -> tuple[dict[str, float | None], str | None]:
    """A baseline's quality at aeflow's rate, interpolated along its (bpp-sorted) RD ``curve``. Outside the
    rates its sweep reached there is nothing to interpolate (``np.interp`` would silently give the curve's
    end, e.g. WebP's quality 95 as if reached at a higher rate): None, and a note saying why."""
    inside = len(curve) > 0 and float(curve.bpp.min()) <= bpp <= float(curve.bpp.max())
    row: dict[str, float | None] = {
        "bpp": bpp if inside else None,  # not reached: no rate to show as if measured there
        "psnr": float(np.interp(bpp, curve.bpp, curve.psnr)) if inside else None,
        "ms_ssim": float(np.interp(bpp, curve.bpp, curve.ms_ssim)) if inside else None,
    }
    note = None
    if not inside and len(curve):
        note = (f"{fmt} at aeflow's {bpp:.3g} bpp: outside the rates its quality sweep reached "
                f"({float(curve.bpp.min()):.3g}-{float(curve.bpp.max()):.3g} bpp), not extrapolated (None).")
    return row, note


def sweep_sample(n: int, k: int) -> list[int]:
    """Indices of ``k`` of ``n`` images spread evenly over them, the first and the last included (all when ``k`` is 0 or >= ``n``)."""
    if k == 0 or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _sweep_shard(item: tuple[int, list[int]], *, app: CompressApp, ctx: ImageContext, fitted: Fitted) -> list[dict[str, Any]]:
    """The rate-distortion sweep of some images of one shard on a Dask worker: every level of the
    codec, then Pillow JPEG and WebP at each of their qualities."""
    index, picks = item
    ctx, fitted = on_worker(app, ctx, fitted)
    a, target, codec = ctx.config.app, app.target(ctx), codec_of(fitted)
    rows: list[dict[str, Any]] = []
    for k, (rel, chw) in enumerate(zip(shard_rels(target, index), shard_images(target, index), strict=True)):
        if k not in picks:
            continue
        img, mode = from_chw(chw)
        for level in range(fitted.model.config.levels):
            c = code_image(codec, img, mode, level, join_uri(target.source_uri, rel), a.refine_steps)
            rows.append({"codec": "aeflow", "setting": level, "image": rel, "bpp": c.bpp, "psnr": c.psnr,
                         "ms_ssim": c.ms_ssim})
        for fmt, qs in (("jpeg", a.jpeg_qualities), ("webp", a.webp_qualities)):
            for qual in qs:
                rows.append({"codec": fmt, "setting": qual, "image": rel, **pillow_point(img, fmt, qual)})
    return rows


@register
class CompressApp(ImageApp):
    """The compress application: fit (train the codec), apply (code every image), evaluate, report."""

    name = "compress"
    Config = CompressConfig
    RunConfig = CompressRunConfig
    model_kind = "codec"
    model_kinds = ("codec", "hyperprior")
    self_contained = True  # a run's files decode with the codec saved in the run itself
    headlines = (("psnr", True), ("bd_rate_vs_jpeg_pct", False), ("bd_rate_vs_webp_pct", False))
    # the codec to train (a reused one has its own; --quality and --refine-steps are checked against it)
    fit_only = FIT_ONLY + tuple(f"app.{k}" for k in ("codec", "channels", "latent_channels", "lambdas", "patch_size",
                                                      "patches"))
    # The common `aeflow run` options that apply (no table columns, no validation split option).
    common_options = ("input", "apply_to", "model", "output", "epochs", "batch_size", "lr", "patience", "seed",
                      "device", "dask_address", "run_id")
    option_help: ClassVar[dict[str, str]] = {
        "device": "Training device: auto (cuda if present, else cpu), cpu, cuda, cuda:N; coding always runs on the CPU.",
    }
    cli_options = (
        ("--quality", "app.quality", int, ("Quality level of the written codes: 0 (lowest rate) to the codec's last, "
                                           f"{len(CompressConfig.model_fields['lambdas'].default) - 1} with the "
                                           "default app.lambdas (default: the middle level).")),
        ("--codec", "app.codec", str, "Codec to train: factorized or hyperprior."),
        ("--channels", "app.channels", int, "Hidden width of the codec's transforms."),
        ("--latent-channels", "app.latent_channels", int, "Latent width of the codec."),
        ("--refine-steps", "app.refine_steps", int, "Latent refinement steps per image at encoding (0 = off; ~100: fewer bits, much slower; factorized codec only)."),
        ("--patch-size", "app.patch_size", int, "Training crop size (multiple of 16)."),
        ("--patches", "app.patches", int, "Random training crops per epoch."),
        ("--rd-images", "app.rd_images", int, "Images in the rate-distortion sweep: an even sample (default 16; 0 = all)."),
        ("--skip-bad", "load.skip_bad", bool, ("Leave out files that are not PNG/JPEG, do not decode or have "
                                               "transparent pixels (load.alpha=refuse, the default; a fully "
                                               "opaque alpha channel is dropped and the image kept) instead of "
                                               "failing (named in a warning and the run's notes; listed in the "
                                               "manifest).")),
    )

    def device_for(self, config: RunConfig) -> torch.device:
        # Coding runs on the CPU: the decoder must reproduce the encoder's numbers (training uses train.device).
        super().device_for(config)  # a bad --device is still a configuration error
        return torch.device("cpu")

    # Validation uses held-out crops (random_patches with another seed), so one image can train a codec.
    min_train_images: ClassVar[int] = 1

    def check_data(self, ctx: ImageContext) -> None:
        """Any image size works (padded to the codec's stride and cropped back); two images that would
        decode to one ``decoded/<relpath>.png`` (``photo.jpg`` and ``photo.png``) are refused, naming both,
        before anything is trained or written (the check of ``aeflow compress``: :func:`plan_outputs`)."""
        from tasks.codec_files import plan_outputs

        target = self.target(ctx)
        name_of = {target.path_of(k): decoded_name(rel) for k, rel in enumerate(target.rel)}
        plan_outputs(list(name_of), "decoded", name_of.__getitem__,
                     remedy="rename one, or apply the model to them in separate runs")

    def min_side(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> int:
        return 1  # any decoded image: padded to the codec's stride and cropped back

    def too_small_for(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> str:
        return f"the {self._codec_name(config, fitted)} codec, which downsamples images by {self.factor(config, fitted)}"

    def size_setting_minimum(self, config: RunConfig, role: str, fitted: Fitted | None = None) -> tuple[int, str]:
        """A ``load.size`` resizes every image: below the codec's downsampling (16, the hyperprior 64) every
        image would be mostly padding (3 px: 145 bits per pixel, PSNR 4.7 dB)."""
        return self.factor(config, fitted), self.too_small_for(config, role, fitted)

    def size_setting_refusal(self, setting: str, size: int, role: str, need: int, why: str) -> str:
        # Images of any size are coded (1x1 too): the minimum is not the codec's but that of a resize worth
        # making; it said "input images need at least 64x64", which unresized images do not.
        return (f"{setting} {size}: images resized to {size}x{size} would be mostly padding for {why} (it codes "
                f"blocks of {need}x{need}), so {setting} must be at least {need}; without it, images of any size "
                f"are coded at their own size")

    @staticmethod
    def factor(config: RunConfig, fitted: Fitted | None = None) -> int:
        """The codec's total downsampling: the reused one's, else that of the codec to train."""
        if fitted is not None:
            return int(fitted.model.factor)
        from models import HyperpriorCodec, ImageCodec

        return (HyperpriorCodec if config.app.codec == "hyperprior" else ImageCodec).factor  # type: ignore[attr-defined]

    @staticmethod
    def _codec_name(config: RunConfig, fitted: Fitted | None = None) -> str:
        kind = fitted.model.kind if fitted is not None else config.app.codec  # type: ignore[attr-defined]
        return "factorized" if kind == "codec" else kind

    def check_fitted(self, config: RunConfig, fitted: Fitted) -> None:
        self.quality(config, fitted)  # a bad --quality fails before any work
        check_refine_steps(codec_of(fitted), config.app.refine_steps)  # and --refine-steps the model cannot do

    @staticmethod
    def target(ctx: ImageContext) -> ImageSet:
        """The images that are coded: --apply-to, else the input."""
        return ctx.target if ctx.target is not None else ctx.train

    # -- fit ---------------------------------------------------------------------------------
    def build_model(self, ctx: ImageContext) -> CodecBase:
        a = ctx.config.app
        return new_codec(a.codec, channels=a.channels, latent_channels=a.latent_channels, lambdas=tuple(a.lambdas))

    def fit(self, ctx: ImageContext) -> Fitted:
        """Train the codec on random crops of the training images; validation on held-back crops."""
        assert ctx.train is not None
        a, seed = ctx.config.app, ctx.config.train.seed
        # The crops are planned from the images' sizes and cut as each image is decoded: one shard
        # in memory at a time, not the whole training set.
        shapes = [(h, w) for _, h, w in ctx.train.shapes]
        train_x, val_x = rgb_patches_streamed(shapes, (from_chw(chw)[0] for chw in iter_images(ctx.train)),
                                              [(a.patches, seed), (max(8, a.patches // 10), seed + 1)], a.patch_size)
        with seeded(seed):  # initial weights from the seed: the same in every process
            model = self.build_model(ctx)
        result = train_model(model, train_x, val_x, ctx.config.train, run=ctx.run, loss_fn=make_loss_fn(model),
                             label="compress codec")
        model.to("cpu").eval()
        model.update_tables()
        return Fitted(model=model, state={"codec_id": model.identity().hex()}, train=result)

    def save(self, run: RunDir, fitted: Fitted) -> None:
        model = fitted.model
        train = {k: v for k, v in (fitted.train.to_dict() if fitted.train else {}).items() if k != "history"}
        run.save_model(model.kind, model.config.to_dict(), model.state_dict(),
                       {"codec_id": fitted.state["codec_id"], "train": train})

    def from_files(self, meta: dict[str, Any], state_dict: dict[str, Any], uri: str, device: torch.device) -> Fitted:
        codec = codec_from_files(meta, state_dict, uri)
        return Fitted(model=codec.model, state={"codec_id": codec.identity_hex}, source_run=uri,
                      weights_hash=meta.get("weights"))

    def quality(self, config: CompressRunConfig, fitted: Fitted) -> int:
        """The level for codes/ and decoded/: ``--quality`` checked against the model, or its middle level."""
        q = config.app.quality
        return check_quality(codec_of(fitted), fitted.model.config.levels // 2 if q is None else q)

    # -- apply --------------------------------------------------------------------------------
    def apply(self, ctx: ImageContext, fitted: Fitted) -> dict[str, str]:
        """Code every target image at the chosen quality: codes/<rel>.aec, decoded/<rel>.png, per-image metrics.

        One Dask task per shard of images (the codec shipped once per worker); coding is on the CPU."""
        target = self.target(ctx)
        tracker = _EncodeProgress(ctx.config.app.refine_steps, len(target), "codes")
        progress = ApplyProgress("compress apply", len(target), target.megapixels * 1e6, items="images", unit="MP",
                                 scale=1e6, digits=1)

        def on_done(rows: list[dict[str, Any]]) -> None:
            tracker.done_many(len(rows))
            progress.done(sum(r["width"] * r["height"] for r in rows), len(rows))

        shards = self.map_shards(ctx, fitted, _code_shard, list(range(len(target.shards))), on_done=on_done)
        table = pd.DataFrame([row for rows in shards for row in rows])
        with ctx.run.open("per_image.parquet", "wb") as f:
            table.to_parquet(f, index=False)
        ctx.cache["per_image"] = table
        return {"codes": "codes", "decoded": "decoded", "per_image": "per_image.parquet"}

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, ctx: ImageContext, fitted: Fitted) -> Evaluation:
        """Overall metrics at the chosen quality; RD sweep (a sample of the images) of every level and of
        JPEG/WebP; BD-rates."""
        a = ctx.config.app
        per_image: pd.DataFrame = ctx.cache["per_image"]
        target = self.target(ctx)
        px = (per_image["width"] * per_image["height"]).sum()
        metrics: dict[str, float | int | None] = {
            "images": len(per_image),
            "quality": int(per_image["quality"].iloc[0]),
            "refine_steps": a.refine_steps,
            "bpp": float(8 * per_image["bytes"].sum() / px),
            "psnr": float(per_image["psnr"].mean()),
            "ms_ssim": float(per_image["ms_ssim"].mean()),
            "encode_mpx_s": float(px / 1e6 / per_image["encode_s"].sum()),
            "decode_mpx_s": float(px / 1e6 / per_image["decode_s"].sum()),
            "payload_vs_estimate_pct": float(100 * (per_image["payload_bits"].sum() / per_image["estimate_bits"].sum() - 1)),
        }
        if fitted.source_run is not None:
            trained_on = f"the codec of {fitted.source_run}, not trained in this run"
        elif ctx.target is None:  # no --apply-to: the input images are trained on and coded
            trained_on = "the codec was trained in this run on crops of these images (a codec is fitted to what it codes)"
        else:
            trained_on = "the codec was trained in this run on --input's images, not these"
        notes = [
            f"metrics on the {len(per_image)} coded image{'s' if len(per_image) != 1 else ''}; {trained_on}.",
            "bpp is measured from the .aec file sizes (header and checksum included); "
            f"PSNR on 0..255 pixels, at most {PSNR_MAX_DB:g} dB per image (an image coded without loss scores "
            f"{PSNR_MAX_DB:g}, for aeflow and the baselines alike), MS-SSIM in [0, 1], means over images.",
        ]
        rd_rows: list[dict[str, Any]] = []
        if a.rd_sweep:
            # One Dask task per shard holding sampled images, as apply: the sweep codes each of them
            # at every level, so on a large input it is a sample (app.rd_images), not every image.
            picks = sweep_sample(len(target), a.rd_images)
            starts = np.cumsum((0, *target.counts))
            items = [(i, [p - int(starts[i]) for p in picks if starts[i] <= p < starts[i + 1]])
                     for i in range(len(target.shards))]
            items = [it for it in items if it[1]]
            if picks:
                # The sweep is the run's longest stage on large images (each sampled image coded once per level and
                # per JPEG/WebP quality, each scored with MS-SSIM: minutes for one 6 MP photograph on a core): say
                # what it does and how to shorten it, rather than nothing until it ends.
                mp = sum(target.shapes[p][1] * target.shapes[p][2] for p in picks) / 1e6
                run_logger().info(
                    "rate-distortion sweep: %d image%s (%.2f MP) at each of the codec's %d quality levels and %d JPEG "
                    "+ %d WebP qualities (--rd-images N sweeps fewer images; --set app.rd_sweep=false skips it)",
                    len(picks), "" if len(picks) == 1 else "s", mp, fitted.model.config.levels,
                    len(a.jpeg_qualities), len(a.webp_qualities))
            tracker = _EncodeProgress(a.refine_steps, len(picks) * fitted.model.config.levels, "rate-distortion sweep")
            parts = self.map_shards(ctx, fitted, _sweep_shard, items,
                                    on_done=lambda rows: tracker.done_many(sum(r["codec"] == "aeflow" for r in rows)))
            rd_rows = [row for rows in parts for row in rows]
            metrics["rd_images"] = len(picks)
            if len(picks) < len(target):
                notes.append(f"The rate-distortion sweep (rd.parquet, the BD-rates, the RD plot) coded an even sample of "
                             f"{len(picks)} of the {len(target)} images (app.rd_images; 0: all).")
        rd = pd.DataFrame(rd_rows, columns=["codec", "setting", "image", "bpp", "psnr", "ms_ssim"])
        baselines: dict[str, dict[str, float | int | None]] = {}
        compared: dict[str, tuple[float, str]] = {}
        if len(rd):
            curves = rd.groupby(["codec", "setting"], as_index=False)[["bpp", "psnr", "ms_ssim"]].mean()
            ours = curves[curves.codec == "aeflow"].sort_values("bpp")
            # The baselines are measured on the swept images only: when those are a sample, aeflow is compared on
            # them too (its sweep point at --quality, the same codes), not by its means over every coded image.
            swept, rate = rd["image"].nunique(), float(metrics["bpp"])
            if swept < len(per_image):
                point = ours[ours.setting == metrics["quality"]].iloc[0]
                rate = float(point.bpp)
                compared["psnr"] = (float(point.psnr), f"on the {swept} swept images, the baselines' "
                                                       f"({float(metrics['psnr']):.4g} over all {len(per_image)})")
            for fmt in ("jpeg", "webp"):
                base = curves[curves.codec == fmt].sort_values("bpp")
                for name, quality in ((f"bd_rate_vs_{fmt}_pct", "psnr"), (f"bd_rate_msssim_vs_{fmt}_pct", "ms_ssim")):
                    metrics[name], why = bd_rate_why(base.bpp, base[quality], ours.bpp, ours[quality])
                    if why:
                        notes.append(f"{name} None: {why}.")
                # The baseline at the same rate as ours (interpolated along its curve): equal-bpp quality.
                baselines[fmt], note = equal_rate_baseline(fmt, rate, base)
                if note:
                    notes.append(note)
            if swept < len(per_image):
                notes.append(f"jpeg/webp psnr and ms_ssim: at aeflow's {rate:.4g} bpp on the {swept} swept images "
                             f"(its mean bpp there at quality {metrics['quality']}), interpolated along their mean "
                             f"rate-distortion curves over those images; the verdict compares aeflow's PSNR on the "
                             f"same {swept} images, not its mean over the {len(per_image)} coded ones.")
            else:
                notes.append(f"jpeg/webp psnr and ms_ssim: at aeflow's bpp, interpolated along their mean "
                             f"rate-distortion curves over the {swept} swept image(s); aeflow's: means over the "
                             f"{len(per_image)} coded image{'s' if len(per_image) != 1 else ''}.")
            notes.append("BD-rate: negative means aeflow needs fewer bits than the baseline at equal PSNR "
                         "(or MS-SSIM), over the PSNR range both curves cover; None when it cannot be computed "
                         "(a note above says why).")
            with ctx.run.open("rd.parquet", "wb") as f:
                rd.to_parquet(f, index=False)
        ctx.cache["rd"] = rd
        return Evaluation(metrics=metrics, baselines=baselines, notes=notes, compared=compared)

    # -- report --------------------------------------------------------------------------------
    def report(self, ctx: ImageContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        from tasks.report import pyplot, save_figure

        plt = pyplot()
        outputs = super().report(ctx, fitted, evaluation)
        rd: pd.DataFrame = ctx.cache.get("rd", pd.DataFrame())
        if len(rd):
            curves = rd.groupby(["codec", "setting"], as_index=False)[["bpp", "psnr", "ms_ssim"]].mean()
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for codec, style in (("aeflow", "o-"), ("jpeg", "s--"), ("webp", "^--")):
                c = curves[curves.codec == codec].sort_values("bpp")
                axes[0].plot(c.bpp, c.psnr, style, label=codec)
                axes[1].plot(c.bpp, c.ms_ssim, style, label=codec)
            axes[0].set_ylabel("PSNR (dB)")
            axes[1].set_ylabel("MS-SSIM")
            for ax in axes:
                ax.set_xlabel("bits per pixel (file size)")
                ax.grid(alpha=0.3)
                ax.legend()
            fig.suptitle(f"Rate-distortion on {rd['image'].nunique()} image(s)")
            outputs["rd_plot"] = save_figure(ctx.run, "report/rd.png", fig)
            outputs["rd"] = "rd.parquet"
        return outputs
