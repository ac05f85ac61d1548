"""models.metrics: MS-SSIM against independent references (scikit-image's SSIM; the textbook 2-D window form,
which benchmarks/metrics_speed.py times it against)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.metrics_speed import direct_ms_ssim
from models.metrics import PSNR_MAX_DB, bd_rate, bd_rate_why, ms_ssim, psnr


def _pair(shape, seed=0, noise=20):
    """A smooth uint8 image (random pixels under a 5x5 box blur) and a noisy copy of it."""
    rng = np.random.default_rng(seed)
    chw = torch.from_numpy(rng.integers(0, 256, shape).astype(np.float32)).reshape(*shape[:2], -1).permute(2, 0, 1)
    a = F.avg_pool2d(chw[None], 5, 1, 2)[0].permute(1, 2, 0).numpy().astype(np.uint8).reshape(shape)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("shape", [(200, 300, 3), (97, 131), (40, 64, 3), (13, 17, 3)])
def test_ms_ssim_matches_the_direct_window(shape):
    a, b = _pair(shape)
    ours, ref = ms_ssim(a, b), direct_ms_ssim(a, b)
    assert 0.3 < ref < 0.999, "the pair is neither identical nor unrelated"
    assert ours == pytest.approx(ref, abs=2e-5)


def test_single_scale_equals_scikit_image_ssim():
    from skimage.metrics import structural_similarity

    a, b = _pair((20, 21, 3), seed=3)  # under 22 px: one scale, which is SSIM
    ref = structural_similarity(a.astype(np.float64) / 255, b.astype(np.float64) / 255, channel_axis=2, data_range=1.0,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ms_ssim(a, b) == pytest.approx(ref, abs=2e-5)


def test_identical_images_score_one_and_more_noise_scores_lower():
    a, b = _pair((128, 160, 3), noise=8)
    _, c = _pair((128, 160, 3), noise=40)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6) and psnr(a, a) == PSNR_MAX_DB
    assert 1.0 > ms_ssim(a, b) > ms_ssim(a, c)
    with pytest.raises(ValueError, match="differ in shape"):
        ms_ssim(a, a[:, :-1])


def test_psnr_is_capped_at_100_db_for_lossless_images():
    """A flat image JPEG reproduces exactly (MSE 0) scores 100 dB, not infinity that voids every mean over images;
    a tiny error on a large image is capped likewise, and ordinary values are untouched."""
    flat = np.full((64, 64), 128, np.uint8)
    assert PSNR_MAX_DB == 100.0 and psnr(flat, flat) == 100.0
    big = np.zeros((1000, 1000, 3), np.uint8)
    off = big.copy()
    off[0, 0, 0] = 1  # 10·log10(255²·3e6) = 112.9 dB uncapped
    assert psnr(big, off) == 100.0
    a, b = _pair((40, 64, 3))
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse)) and psnr(a, b) < 40


def test_bd_rate_with_lossless_and_repeated_points_is_none_or_a_number_without_lapack_noise(capfd):
    """A 1x1 image JPEG/WebP code without loss at most qualities: infinite PSNRs (and equal rates) in the curves
    made polyfit raise LinAlgError after LAPACK printed "On entry to DLASCL" on stdout (before --json output)."""
    rate, quality = [0.2, 0.4, 0.8, 1.6, 3.2], [30.0, 33.0, 36.0, 39.0, 42.0]
    inf = math.inf
    assert bd_rate([2288, 2288, 2296, 2296], [23.4, inf, inf, inf], rate, quality) is None
    value, why = bd_rate_why([448, 464, 464, 480], [38.8, inf, inf, inf], rate, quality)
    assert value is None and "1 distinct quality value(s)" in why and "the baseline's" in why
    # non-finite points are left out, the rest still fit: the same result as without them
    with_inf = bd_rate(rate + [3.3, 0.0, math.nan], quality + [inf, 44.0, 45.0], [r * 0.8 for r in rate], quality)
    assert with_inf == pytest.approx(bd_rate(rate, quality, [r * 0.8 for r in rate], quality)) == pytest.approx(-20.0)
    value, why = bd_rate_why(rate, quality, rate, [q + 50 for q in quality])
    assert value is None and why == "the two curves do not overlap in quality"
    assert capfd.readouterr().out == "", "nothing printed on stdout (it would corrupt --json)"
