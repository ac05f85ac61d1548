"""codec_tiles: coding a large photograph with the codecs' transforms tiled (as shipped) vs whole, side by side.

Since 2026-11-30 the codecs run their analysis and synthesis transforms over a large image in
tiles with a receptive-field halo (``models.image_ops.map_tiles``). This measures what that
buys and costs on one synthetic photograph-like image (a bundled photograph upscaled, with
grain): peak resident memory and seconds to encode and to decode, with the shipped tiles and
with tiling off (tiles larger than the image, the code before), each in a fresh process on one
torch thread, in turn; and whether the decoded pixels agree (the hyperprior's exact synthesis:
bit for bit; the factorized codec's float32 one: up to rounding).

    python -m benchmarks.codec_tiles [--megapixels 6] [--quality 3] [--write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks._common import machine, md_table, update_section

CODECS = {"hyperprior": "benchmarks/weights/hyperprior", "factorized": "benchmarks/weights/codec"}


def photo(megapixels: float) -> np.ndarray:
    """skimage's astronaut upscaled to about ``megapixels`` (3:2), with seeded grain, uint8 (H, W, 3)."""
    import skimage.data
    from PIL import Image

    w = int(round((megapixels * 1e6 * 1.5) ** 0.5))
    h = int(round(w / 1.5))
    img = Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC)
    grain = np.random.default_rng(0).normal(0, 3, (h, w, 3))
    return (np.asarray(img).astype(np.float32) + grain).clip(0, 255).astype(np.uint8)


def child(folder: str, megapixels: float, quality: int, tiled: bool) -> dict:
    """One measurement in this (fresh) process: encode, then decode, with peak memory after each."""
    import torch

    from benchmarks.train_codec import load_codec

    torch.set_num_threads(1)
    model = load_codec(folder)
    if not tiled:
        model.analysis_tile = model.synthesis_tile = 1 << 30
    img = photo(megapixels)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    h, w = img.shape[:2]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    out = model.compress(x, quality)
    enc_s = time.perf_counter() - t0
    enc_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    x_hat = model.decompress(out["strings"], out["shape"], quality, (h, w))
    dec_s = time.perf_counter() - t0
    dec_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    pixels = (x_hat[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return {"megapixels": h * w / 1e6, "size": f"{w}x{h}", "bytes": len(out["strings"][0]),
            "encode_s": enc_s, "decode_s": dec_s, "rss_before_gb": base, "encode_peak_gb": enc_peak,
            "decode_peak_gb": dec_peak, "pixels_sha": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "payload_sha": hashlib.sha256(out["strings"][0]).hexdigest()}


def measure(folder: str, megapixels: float, quality: int, tiled: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.codec_tiles", "--child", folder, "--megapixels", str(megapixels),
           "--quality", str(quality)] + ([] if tiled else ["--untiled"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megapixels", type=float, default=6.0)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated: hyperprior, factorized")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--untiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.megapixels, args.quality, not args.untiled)))
        return
    rows, results = [], {}
    for name in args.codecs.split(","):
        r = {mode: measure(CODECS[name], args.megapixels, args.quality, mode == "tiled") for mode in ("untiled", "tiled")}
        results[name] = r
        print(name, json.dumps(r, indent=1), flush=True)
        if any("error" in v for v in r.values()):
            rows.append([name, *(v.get("error", "") for v in r.values()), "", "", "", ""])
            continue
        u, t = r["untiled"], r["tiled"]
        same = "bit for bit" if u["pixels_sha"] == t["pixels_sha"] else "differ (float rounding)"
        rows.append([
            name, f"{u['encode_peak_gb']:.2f} → {t['encode_peak_gb']:.2f} GB", f"{u['decode_peak_gb']:.2f} → {t['decode_peak_gb']:.2f} GB",
            f"{u['encode_s']:.1f} → {t['encode_s']:.1f} s ({t['encode_s'] / u['encode_s']:.2f}x)",
            f"{u['decode_s']:.1f} → {t['decode_s']:.1f} s ({t['decode_s'] / u['decode_s']:.2f}x)",
            "same bytes" if u["payload_sha"] == t["payload_sha"] else "differ", same,
        ])
    size = next((v["size"] for r in results.values() for v in r.values() if "size" in v), "?")
    table = md_table(["codec", "peak memory, encode (whole → tiled)", "peak memory, decode", "encode time", "decode time",
                      "payload", "decoded pixels"], rows)
    body = (f"`python -m benchmarks.codec_tiles --megapixels {args.megapixels:g} --quality {args.quality}` — "
            f"{machine()}. One {size} image (a bundled photograph upscaled, with grain), each case in a fresh "
            "process on one torch thread, in turn; peak resident memory of the process (the model and the image "
            "included). Whole = tiling off (the code before 2026-11-30); tiled = as shipped (analysis in 1024-pixel "
            "blocks, synthesis in 48-latent-pixel blocks, each with its receptive-field halo).\n\n" + table)
    print(body)
    if args.write:
        update_section("Codecs on a large image: tiled vs whole (codec_tiles.py)", body)


if __name__ == "__main__":
    main()
