"""Learned codec vs Pillow JPEG and WebP on held-out bundled photographs (issue 5).

    python -m benchmarks.quality_compress [--codec benchmarks/weights/codec] [--refine-steps 100] [--jobs 2] [--write]

The codec is trained by :mod:`benchmarks.train_codec` on crops of the training
photographs only; the trained weights are committed in ``benchmarks/weights/codec``
(13 MB). When ``--codec`` holds no model, it is trained first for ``--train-minutes``. Evaluation on the held-out photographs (chelsea, coffee,
rocket, camera), each coded for real at every quality level: bits per pixel
from the .aec file sizes, PSNR, MS-SSIM; Pillow JPEG (optimised Huffman, 4:2:0)
and WebP (method 4) quality sweeps on the same images; BD-rate (PSNR and
MS-SSIM) of ours vs each, on the mean curves; the payload's real bits against
the entropy model's estimate; encode/decode megapixels per second on CPU.
Everything is measured twice: with the fast encoder (the analysis transform)
and with ``--refine-steps`` of per-image latent refinement (the same decoder).
``--write`` replaces the ``## Compression (issue 5)`` section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch

from benchmarks.train_codec import HELDOUT_IMAGES, TRAIN_IMAGES, load_codec, load_images
from models.aec import OVERHEAD
from models.metrics import bd_rate
from tasks.codec import JPEG_QUALITIES, WEBP_QUALITIES, LoadedCodec, code_image, pillow_point

SECTION = "## Compression (issue 5)"


OURS = "aeflow"
REFINED = "aeflow-refined"


_WORKER: dict[str, LoadedCodec] = {}


def _init_worker(codec_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    model = load_codec(codec_dir)
    _WORKER["codec"] = LoadedCodec(model=model, identity=model.identity(), source=codec_dir)


def _code_one(task: tuple[str, str, int, int]) -> tuple[dict, dict]:
    """One image at one level with one encoder: (per-file row, rate-distortion row)."""
    name, label, steps, q = task
    codec = _WORKER["codec"]
    img = load_images((name,))[0]
    mode = "L" if img.ndim == 2 else "RGB"
    h, w = img.shape[:2]
    c = code_image(codec, img, mode, q, name, steps)
    print(f"{name} {label} level {q}: {c.bpp:.3f} bpp {c.psnr:.2f} dB", file=sys.stderr, flush=True)
    return ({"codec": label, "image": name, "level": q, "pixels": h * w, "bytes": len(c.data), "bpp": c.bpp,
             "psnr": c.psnr, "ms_ssim": c.ms_ssim, "encode_s": c.encode_s, "decode_s": c.decode_s,
             "payload_bits": c.payload_bits, "estimate_bits": c.estimate_bits},
            {"codec": label, "setting": q, "image": name, "bpp": c.bpp, "psnr": c.psnr, "ms_ssim": c.ms_ssim})


def evaluate(codec: LoadedCodec, names: tuple[str, ...], refine_steps: int = 0,
             jobs: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every held-out image at every level (fast encoder, and refined when ``refine_steps``), JPEG and WebP sweeps.

    ``jobs > 1`` codes the (image, encoder, level) cases in that many processes of one torch
    thread each (the codec reloaded from ``codec.source``); results are identical, and the
    timings are single-thread timings either way.
    """
    variants = [(OURS, 0)] + ([(REFINED, refine_steps)] if refine_steps else [])
    tasks = [(name, label, steps, q) for name in names for label, steps in variants
             for q in range(codec.model.config.levels)]
    tasks.sort(key=lambda t: -t[2])  # the slow refined cases first: better balance across processes
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(codec.source, 1)) as pool:
            results = list(pool.map(_code_one, tasks))
    else:
        _WORKER["codec"] = codec
        results = [_code_one(t) for t in tasks]
    order = {t: i for i, t in enumerate((n, lab, q) for n in names for lab, _ in variants
                                        for q in range(codec.model.config.levels))}
    results.sort(key=lambda r: order[(r[0]["image"], r[0]["codec"], r[0]["level"])])
    ours = [r[0] for r in results]
    rows = [r[1] for r in results]
    for name, img in zip(names, load_images(names), strict=True):
        for fmt, qs in (("jpeg", JPEG_QUALITIES), ("webp", WEBP_QUALITIES)):
            for qual in qs:
                rows.append({"codec": fmt, "setting": qual, "image": name, **pillow_point(img, fmt, qual)})
    return pd.DataFrame(rows), pd.DataFrame(ours)


def transform_ceiling(codec: LoadedCodec, names: tuple[str, ...]) -> float:
    """Mean PSNR at the top level with the latent left unrounded: the best the transforms can do at any rate."""
    from models.image_ops import as_rgb, pad_to_multiple
    from models.metrics import psnr

    model, top, out = codec.model, codec.model.config.levels - 1, []
    for img in load_images(names):
        rgb = as_rgb(img)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            g, ig = model._gains(torch.tensor([top]))
            xp, (h, w) = pad_to_multiple(x, model.stride)
            x_hat = model.g_s(model.g_a(xp) * g * ig)[..., :h, :w].clamp(0, 1)
        rec = (x_hat[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if img.ndim == 2:  # grayscale is decoded back to one channel
            rec = rec.mean(-1).round().astype(np.uint8)
        out.append(psnr(img, rec))
    return float(np.mean(out))


def summarise(rd: pd.DataFrame, ours: pd.DataFrame, label: str = OURS) -> dict[str, object]:
    """BD-rates, equal-rate PSNR gaps, payload vs estimate and speeds of one of our variants."""
    curves = rd.groupby(["codec", "setting"], as_index=False)[["bpp", "psnr", "ms_ssim"]].mean()
    mine = curves[curves.codec == label].sort_values("bpp")
    ours = ours[ours.codec == label]
    out: dict[str, object] = {"curves": curves}
    for fmt in ("jpeg", "webp"):
        base = curves[curves.codec == fmt].sort_values("bpp")
        out[f"bd_psnr_{fmt}"] = bd_rate(base.bpp, base.psnr, mine.bpp, mine.psnr)
        out[f"bd_msssim_{fmt}"] = bd_rate(base.bpp, base.ms_ssim, mine.bpp, mine.ms_ssim)
        per_image = {}
        for name, g in rd.groupby("image"):
            b = g[g.codec == fmt].sort_values("bpp")
            o = g[g.codec == label].sort_values("bpp")
            per_image[name] = bd_rate(b.bpp, b.psnr, o.bpp, o.psnr)
        out[f"bd_psnr_{fmt}_per_image"] = per_image
        # When the PSNR ranges do not overlap BD-rate is undefined; the gap at equal rate still says how far off.
        inside = mine[(mine.bpp >= base.bpp.min()) & (mine.bpp <= base.bpp.max())]
        gaps = inside.psnr.to_numpy() - np.interp(inside.bpp, base.bpp, base.psnr)
        out[f"psnr_gap_{fmt}"] = (float(gaps.min()), float(gaps.max())) if len(gaps) else None
    out["payload_vs_estimate_pct"] = 100 * (ours.payload_bits.sum() / ours.estimate_bits.sum() - 1)
    out["worst_payload_vs_estimate_pct"] = float((100 * (ours.payload_bits / ours.estimate_bits - 1)).abs().max())
    out["encode_mpx_s"] = ours.pixels.sum() / 1e6 / ours.encode_s.sum()
    out["decode_mpx_s"] = ours.pixels.sum() / 1e6 / ours.decode_s.sum()
    return out


def _fmt(v: object) -> str:
    if v is None:
        return "n/a (curves do not overlap)"
    return f"{v:+.1f}%" if isinstance(v, float) else str(v)


def _gap(v: object) -> str:
    return "n/a" if v is None else f"{v[0]:+.2f} to {v[1]:+.2f} dB"  # type: ignore[index]


def _goal(bd: object) -> str:
    if bd is None:
        return "not measurable, the PSNR ranges do not overlap (missed)"
    if bd <= -20:  # type: ignore[operator]
        return f"**met** ({bd:+.1f}%, {-20 - bd:.1f} percentage points inside the goal)"  # type: ignore[operator]
    return f"**missed** by {bd + 20:.1f} percentage points ({bd:+.1f}%)"  # type: ignore[operator]


def _verdict(fast: dict[str, object], refined: dict[str, object] | None, steps: int, curves: pd.DataFrame) -> str:
    mine = curves[curves.codec == OURS]
    text = f"Goal BD-rate vs JPEG ≤ −20% (PSNR): fast encoder {_goal(fast['bd_psnr_jpeg'])}"
    if refined is not None:
        text += (f"; with {steps} refinement steps per image {_goal(refined['bd_psnr_jpeg'])}, at "
                 f"{refined['encode_mpx_s']:.3f} MP/s encoding instead of {fast['encode_mpx_s']:.2f}")
    text += (f". Our levels span {mine.bpp.min():.2f}–{mine.bpp.max():.2f} bpp and "
             f"{mine.psnr.min():.1f}–{mine.psnr.max():.1f} dB (fast encoder). With the latent left unrounded the top "
             f"level reaches only {fast['ceiling_psnr']:.1f} dB: the transforms (N={fast['n']}, M={fast['m']}, this "
             "little training), not the quantisation or the entropy coding, cap the quality, so the top levels spend "
             "bits for little PSNR and BD-rate suffers at the high end. Refinement (stochastic Gumbel annealing of "
             "each image's latent against the fixed decoder, Yang et al. 2020) closes part of the encoder's "
             "amortisation gap; decoding and the file format are the same. "
             "The coding itself is exact and near-optimal for the model (payload within "
             f"{abs(fast['payload_vs_estimate_pct']):.2f}% of the entropy model's estimate).")  # type: ignore[arg-type]
    return text


def markdown(fast: dict[str, object], refined: dict[str, object] | None, steps: int, codec: LoadedCodec,
             train_info: str, seconds: float, jobs: int = 1) -> str:
    curves: pd.DataFrame = fast["curves"]  # type: ignore[assignment]
    cfg = codec.model.config
    variants = [("fast encoder", fast)] + ([(f"refined ({steps} steps)", refined)] if refined is not None else [])

    def row(metric: str, fmt, key: str, goal: str = "") -> str:
        return f"| {metric} | " + " | ".join(fmt(v[key]) for _, v in variants) + f" | {goal} |"

    def pct(v: object) -> str:
        return f"{v:+.2f}%"  # type: ignore[str-format]

    lines = [
        SECTION, "",
        f"`python -m benchmarks.quality_compress --write` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s) per process, {jobs} process(es), CPU only; evaluation took "
        f"{seconds:.0f} s.",
        "",
        f"Codec: factorized prior (Ballé 2017) with GDN, N={cfg.channels}, M={cfg.latent_channels}, "
        f"{cfg.levels} quality levels by per-level channel gains (λ = {', '.join(f'{l:g}' for l in cfg.lambdas)}); "
        f"{train_info}",
        f"Trained on crops of: {', '.join(TRAIN_IMAGES)}. Held out (evaluated): {', '.join(HELDOUT_IMAGES)}.",
        "Two encoders of the same model and file format: the fast one (the analysis transform, `aeflow compress` "
        f"by default) and one that refines each image's latent for {steps} steps before coding "
        f"(`--refine-steps {steps}`).",
        "",
        "| metric | " + " | ".join(n for n, _ in variants) + " | goal |",
        "|---|" + "---|" * len(variants) + "---|",
        row("BD-rate vs JPEG (PSNR)", _fmt, "bd_psnr_jpeg", "≤ −20%"),
        row("BD-rate vs WebP (PSNR)", _fmt, "bd_psnr_webp", "reported"),
        row("BD-rate vs JPEG (MS-SSIM)", _fmt, "bd_msssim_jpeg", "reported"),
        row("BD-rate vs WebP (MS-SSIM)", _fmt, "bd_msssim_webp", "reported"),
        row("PSNR of ours − JPEG at equal bpp (range over our levels)", _gap, "psnr_gap_jpeg"),
        row("PSNR of ours − WebP at equal bpp (range over our levels)", _gap, "psnr_gap_webp"),
        "| per-image BD-rate vs JPEG (PSNR) | "
        + " | ".join(", ".join(f"{k} {_fmt(x)}" for k, x in v["bd_psnr_jpeg_per_image"].items())  # type: ignore[union-attr]
                     for _, v in variants) + " | |",
        row("payload bits vs entropy-model estimate (all files)", pct, "payload_vs_estimate_pct", "within 2%"),
        row("worst file, payload vs estimate", lambda v: f"{v:.2f}%", "worst_payload_vs_estimate_pct", "within 2%"),
        row("encode speed (CPU, incl. entropy coding and .aec I/O in memory)", lambda v: f"{v:.3g} MP/s",
            "encode_mpx_s", "reported"),
        row("decode speed", lambda v: f"{v:.3g} MP/s", "decode_mpx_s", "reported"),
        "",
        _verdict(fast, refined, steps, curves),
        "",
        "GPU training (2026-11-27, one H200 lent for 15 minutes): continuing the CPU-trained codec (N=64, "
        "fast encoder −1.5%) on 256×256 crops instead of 64×64 for 7.8 min, three runs sharing the GPU "
        "(BD-rate vs JPEG, fast encoder, same held-out images): N=64 as it was −5.4%; widened to N=128 "
        "(`--widen 128`, function-preserving) with batch 16 at lr 1e-4 −5.0%, with batch 32 at lr 2e-4 −6.1% "
        "(the unrounded top level 31.6 → 32.6 dB); the last, 3.4 min more alone on the GPU: −7.3%, the codec "
        "committed here. Larger crops and width lift the high-rate end; more GPU time would go on.",
        "",
        "Refinement settings (sweep of 2026-11-27 with the previous, N=64 codec; same images, BD-rate vs JPEG from "
        "the entropy model's bits): "
        "100 steps at step size 0.005 −15.2%, 0.0075 −16.7%, **0.01 −17.4%** (the default), 0.015 −12.8%, "
        "0.02 −15.0%, 0.03 +14.8% (large steps inflate the lowest levels' rate); 200 steps at 0.01 −17.1%. "
        "Additive-noise rate with straight-through rounding instead of Gumbel annealing: −24% on chelsea alone, "
        "where annealing gives −31%.",
        "",
        "Mean rate–distortion points over the held-out images (bpp from file sizes, .aec header and CRC "
        f"included: {OVERHEAD} bytes per file):",
        "",
        "| codec | setting | bpp | PSNR (dB) | MS-SSIM |",
        "|---|---|---|---|---|",
    ]
    for r in curves.sort_values(["codec", "bpp"]).itertuples():
        if r.codec not in (OURS, REFINED) and not (0.05 <= r.bpp <= 2.5):
            continue
        lines.append(f"| {r.codec} | {r.setting} | {r.bpp:.3f} | {r.psnr:.2f} | {r.ms_ssim:.4f} |")
    lines.append("")
    return "\n".join(lines)


def write_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="benchmarks/weights/codec",
                    help="folder with config.json + weights.safetensors (the committed benchmark codec by default)")
    ap.add_argument("--train-minutes", type=float, default=45.0, help="training budget when --codec holds no model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes (one torch thread each) coding the images and levels in parallel")
    ap.add_argument("--refine-steps", type=int, default=100,
                    help="also evaluate the refining encoder with this many steps per image and level (0: fast encoder only)")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.codec, "weights.safetensors")):
        subprocess.run([sys.executable, "-m", "benchmarks.train_codec", "--out", args.codec,
                        "--minutes", str(args.train_minutes)], check=True)
    model = load_codec(args.codec)
    codec = LoadedCodec(model=model, identity=model.identity(), source=args.codec)
    import json

    steps = json.load(open(os.path.join(args.codec, "config.json"))).get("steps") or "?"
    state = os.path.join(args.codec, "state.safetensors")
    if steps == "?" and os.path.exists(state):
        from safetensors.torch import load_file

        steps = str(int(load_file(state)["step"]))
    schedule = json.load(open(os.path.join(args.codec, "config.json"))).get("schedule")
    train_info = (f"trained for {schedule}" if schedule else
                  f"trained for {steps} Adam steps (batch 8 of 64×64 crops)") + \
        " — a very short schedule for a learned codec (published ones train for about a million steps on a GPU)."
    t0 = time.perf_counter()
    rd, ours = evaluate(codec, HELDOUT_IMAGES, args.refine_steps, args.jobs)
    fast = summarise(rd, ours, OURS)
    fast.update(ceiling_psnr=transform_ceiling(codec, HELDOUT_IMAGES), n=model.config.channels,
                m=model.config.latent_channels)
    refined = summarise(rd, ours, REFINED) if args.refine_steps else None
    text = markdown(fast, refined, args.refine_steps, codec, train_info, time.perf_counter() - t0, args.jobs)
    print(text)
    if args.write:
        write_section(os.path.join(os.path.dirname(__file__), "RESULTS.md"), text)


if __name__ == "__main__":
    main()
