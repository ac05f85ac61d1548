"""metrics_speed: MS-SSIM of ``models.metrics`` vs the same metric written out with 2-D windows.

The compress evaluation scores every image of its rate-distortion sweep with MS-SSIM (29 calls per
image: the codec's levels and 11 JPEG + 11 WebP qualities), which on a large photograph was most of
the sweep's time. ``models.metrics.ms_ssim`` filters the five local moments with the separable window
(two 1-D passes of shifted multiply-adds); the baseline is the textbook form it replaced, a depthwise
11x11 convolution per moment, in the same float32. Same images, same process, one torch thread,
alternating repeats, best of each; the two values are printed side by side.

    python -m benchmarks.metrics_speed [--quick]   (writes its RESULTS.md section unless --quick)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import machine, md_table, update_section
from models.metrics import MS_SSIM_WEIGHTS, ms_ssim


def direct_ms_ssim(a: np.ndarray, b: np.ndarray, dtype: torch.dtype = torch.float64) -> float:
    """MS-SSIM written out directly: the full 11x11 Gaussian window as a 2-D convolution per moment."""
    def t(img: np.ndarray) -> torch.Tensor:
        img = img[:, :, None] if img.ndim == 2 else img
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(dtype) / 255.0

    x, y = t(a), t(b)
    c = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=dtype) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()
    levels = min(5, math.floor(math.log2(min(x.shape[-2:]) / 11)) + 1)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], dtype=torch.float64)
    weights = weights / weights.sum()
    vals = []
    for i in range(levels):
        mx, my = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
        sxx = F.conv2d(x * x, win, groups=c) - mx**2
        syy = F.conv2d(y * y, win, groups=c) - my**2
        sxy = F.conv2d(x * y, win, groups=c) - mx * my
        cs = (2 * sxy + 0.03**2) / (sxx + syy + 0.03**2)
        lum = (2 * mx * my + 0.01**2) / (mx**2 + my**2 + 0.01**2)
        vals.append(float((lum * cs).mean()) if i == levels - 1 else float(cs.mean()))
        x, y = F.avg_pool2d(x, 2, ceil_mode=True), F.avg_pool2d(y, 2, ceil_mode=True)
    return float(np.prod([max(v, 1e-12) ** float(w) for v, w in zip(vals, weights, strict=True)]))


def photo_pair(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image (random pixels under a 5x5 box blur) and a noisy copy (as a codec's output)."""
    rng = np.random.default_rng(seed)
    chw = torch.from_numpy(rng.integers(0, 256, (3, h, w)).astype(np.float32))
    a = F.avg_pool2d(chw[None], 5, 1, 2)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Small images, one repeat (a smoke run; RESULTS.md is left alone).")
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = [(64, 96), (256, 384)] if args.quick else [(512, 768), (1024, 1536), (2000, 3000)]
    repeats = 1 if args.quick else 3
    rows = []
    for h, w in sizes:
        a, b = photo_pair(h, w)
        best = {"ours": math.inf, "direct": math.inf}
        vals = {}
        for _ in range(repeats):
            for name, fn in (("ours", ms_ssim), ("direct", lambda x, y: direct_ms_ssim(x, y, torch.float32))):
                t = time.perf_counter()
                vals[name] = fn(a, b)
                best[name] = min(best[name], time.perf_counter() - t)
        rows.append([f"{w}x{h} ({h * w / 1e6:.2f} MP)", f"{best['direct']:.3f}", f"{best['ours']:.3f}",
                     f"{best['direct'] / best['ours']:.2f}x", f"{vals['direct']:.6f} / {vals['ours']:.6f}"])
        print(" | ".join(rows[-1]), flush=True)
    table = md_table(["RGB image", "2-D windows (s)", "models.metrics (s)", "speed-up", "MS-SSIM (2-D / ours)"], rows)
    if args.quick:
        print(table)
        return
    update_section("MS-SSIM speed (metrics_speed.py)",
                   f"Machine: {machine()}. One torch thread; best of {repeats} alternating repeats; a smooth random "
                   "image against a noisy copy.\n\n" + table)


if __name__ == "__main__":
    main()
