"""models.metrics: MS-SSIM against independent references (scikit-image's SSIM; the textbook 2-D window form,
which benchmarks/metrics_speed.py times it against)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.metrics_speed import direct_ms_ssim
from models.metrics import ms_ssim, psnr


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
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6) and psnr(a, a) == math.inf
    assert 1.0 > ms_ssim(a, b) > ms_ssim(a, c)
    with pytest.raises(ValueError, match="differ in shape"):
        ms_ssim(a, a[:, :-1])
