"""Image quality metrics: PSNR and MS-SSIM (Wang et al. 2003), pure PyTorch.

Images are float tensors (B, C, H, W) in [0, 1] or uint8 numpy arrays (H, W[, C]).
MS-SSIM uses the standard 11x11 Gaussian window (σ = 1.5) and the five scale
weights of the paper; images too small for five scales use as many as fit, with
the weights renormalised (noted, so small-image numbers are not compared with
published ones). PSNR is capped at :data:`PSNR_MAX_DB` (an image coded without
loss, e.g. a flat or a 1x1 image that JPEG reproduces exactly, would otherwise
score infinity and make every mean over images infinite).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_K1, _K2 = 0.01, 0.03
# The cap of psnr(): the usual remedy for lossless images (their MSE is 0), applied to every codec alike.
# 100 dB is an error of 0.0026 in 0..255 units, far above what lossy coding of a photograph reaches (30-50 dB).
PSNR_MAX_DB = 100.0


def to_tensor(img: np.ndarray | Tensor) -> Tensor:
    """uint8 (H, W) / (H, W, C) numpy, or a float tensor -> float (1, C, H, W) in [0, 1]."""
    if isinstance(img, Tensor):
        return img if img.dim() == 4 else img.unsqueeze(0)
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float()
    return (t / 255.0 if a.dtype == np.uint8 else t).unsqueeze(0)


def psnr(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """PSNR in dB of two images on the 0..255 scale, at most :data:`PSNR_MAX_DB` (100 dB, also when identical)."""
    ta, tb = to_tensor(a).double(), to_tensor(b).double()
    mse = float(((ta - tb) ** 2).mean()) * 255.0**2
    return PSNR_MAX_DB if mse == 0 else min(PSNR_MAX_DB, 10 * math.log10(255.0**2 / mse))


def _gaussian(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> Tensor:
    """The normalised 1-D Gaussian; the 2-D window is its outer product (applied as two 1-D passes)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(t: Tensor, g: Tensor, dim: int) -> Tensor:
    """``t`` filtered along ``dim`` with the 1-D kernel ``g`` ('valid': k - 1 shorter), as k shifted
    multiply-adds into one buffer: 1.6x faster on one CPU thread than the depthwise 11x11 convolution
    (which oneDNN runs slowly) and than a 1-D depthwise one; equal to it within float rounding."""
    k, n = len(g), t.shape[dim]
    out = torch.mul(t.narrow(dim, 0, n - k + 1), float(g[0]))
    for i in range(1, k):
        out.add_(t.narrow(dim, i, n - k + 1), alpha=float(g[i]))
    return out


def _ssim_parts(x: Tensor, y: Tensor, win: Tensor) -> tuple[Tensor, Tensor]:
    """SSIM and its contrast-structure term per image. ``win`` is a 1-D Gaussian (the separable 11x11
    window: a row pass then a column pass, 2·11 instead of 121 multiply-adds per pixel) or a 2-D (H, W) box."""
    c = x.shape[1]
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    if win.dim() == 1:
        filtered = _blur(_blur(moments, win, -1), win, -2)
    else:
        filtered = F.conv2d(moments, win.expand(5 * c, 1, *win.shape), groups=5 * c)
    mu_x, mu_y, exx, eyy, exy = filtered.split(c, dim=1)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    c1, c2 = _K1**2, _K2**2
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim(a: np.ndarray | Tensor, b: np.ndarray | Tensor, win_size: int = 11) -> float:
    """Multi-scale SSIM of two images (data range 1.0 after scaling to [0, 1])."""
    x, y = to_tensor(a).float(), to_tensor(b).float()
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    side = min(x.shape[-2:])
    levels = max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(side / win_size))) + 1)) if side >= win_size else 0
    if levels == 0:  # smaller than the window: plain SSIM over the whole image as one window
        win = torch.full(x.shape[-2:], 1.0 / (x.shape[-2] * x.shape[-1]), dtype=x.dtype)
        s, _ = _ssim_parts(x, y, win)
        return float(s.mean())
    weights = torch.tensor(MS_SSIM_WEIGHTS[:levels], dtype=x.dtype)
    weights = weights / weights.sum()
    win = _gaussian(win_size, 1.5, x.dtype)
    vals = []
    for i in range(levels):
        s, cs = _ssim_parts(x, y, win)
        vals.append(s if i == levels - 1 else cs)
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2, ceil_mode=True), F.avg_pool2d(y, 2, ceil_mode=True)
    stack = torch.stack([v.clamp_min(1e-12) for v in vals], dim=0)
    return float(torch.prod(stack ** weights[:, None], dim=0).mean())


def bd_rate(rate_a: list[float], psnr_a: list[float], rate_b: list[float], psnr_b: list[float]) -> float | None:
    """Bjøntegaard delta rate of curve B relative to curve A, in percent (negative: B needs fewer bits).

    Cubic fit of log-rate as a function of PSNR (or any quality), integrated over the overlapping
    quality interval (VCEG-M33). Returns None when it cannot be computed: :func:`bd_rate_why` says why.
    """
    return bd_rate_why(rate_a, psnr_a, rate_b, psnr_b)[0]


def bd_rate_why(rate_a: list[float], psnr_a: list[float], rate_b: list[float],
                psnr_b: list[float]) -> tuple[float | None, str | None]:
    """:func:`bd_rate` and, when it is None, why (a phrase to put after "BD-rate None: ").

    Points with a non-finite or non-positive rate or a non-finite quality are left out (an infinite
    PSNR would reach LAPACK as inf: polyfit then fails with "SVD did not converge" after LAPACK printed
    an error on stdout). A cubic needs 4 distinct quality values per curve (tiny images reach few:
    JPEG's qualities can all give the same pixels), and the curves must overlap.
    """
    curves = []
    for name, rate, quality in (("the baseline's", rate_a, psnr_a), ("aeflow's", rate_b, psnr_b)):
        r, q = np.asarray(rate, float), np.asarray(quality, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = np.isfinite(r) & np.isfinite(q) & (r > 0)
        r, q = r[ok], q[ok]
        distinct = len(np.unique(q))
        if distinct < 4:
            return None, (f"{name} rate-distortion curve has {distinct} distinct quality value(s) (finite points), "
                          "fewer than the 4 a cubic fit needs")
        curves.append((np.log(r), q))
    (ra, pa), (rb, pb) = curves
    lo, hi = max(pa.min(), pb.min()), min(pa.max(), pb.max())
    if not hi > lo:
        return None, "the two curves do not overlap in quality"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.RankWarning)
            fa, fb = np.polyfit(pa, ra, 3), np.polyfit(pb, rb, 3)
    except (np.linalg.LinAlgError, np.exceptions.RankWarning) as e:
        return None, f"the cubic fit failed ({e})"
    ia, ib = np.polyint(fa), np.polyint(fb)
    avg_a = (np.polyval(ia, hi) - np.polyval(ia, lo)) / (hi - lo)
    avg_b = (np.polyval(ib, hi) - np.polyval(ib, lo)) / (hi - lo)
    value = float((np.exp(avg_b - avg_a) - 1) * 100)
    if not math.isfinite(value):
        return None, "the fitted curves give a non-finite average rate difference"
    return value, None
