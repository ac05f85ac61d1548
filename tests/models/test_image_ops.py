"""models.image_ops: the one padding and the one crop sampler, with the options their callers differ in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.codec_layers import (
    analysis_transform,
    conv_specs,
    receptive_halo,
    synthesis_transform,
)
from models.image_ops import (
    as_rgb,
    map_tiles,
    pad_to_multiple,
    random_patches,
    random_patches_streamed,
    rgb_patches,
    rgb_patches_streamed,
)

pytestmark = [pytest.mark.models]


def test_pad_to_multiple_modes():
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).view(1, 2, 3, 5)
    rep, (h, w) = pad_to_multiple(x, 4)
    assert rep.shape[-2:] == (4, 8) and (h, w) == (3, 5)
    torch.testing.assert_close(rep[..., :3, :5], x)
    torch.testing.assert_close(rep[..., 3, :5], x[..., 2, :]), "replicate: the last row again"
    ref, _ = pad_to_multiple(x, 4, "reflect")
    torch.testing.assert_close(ref[..., 3, :5], x[..., 1, :]), "reflect: mirrored about the last row"
    torch.testing.assert_close(ref[..., :3, 5], x[..., 3])
    # Too small to reflect (padding >= size): replicated instead of failing.
    tiny = torch.rand(1, 1, 3, 5)
    p, _ = pad_to_multiple(tiny, 8, "reflect")
    assert p.shape[-2:] == (8, 8)
    torch.testing.assert_close(p[..., 7, 4], tiny[..., 2, 4])
    assert pad_to_multiple(x[..., :4, :4], 4)[0] is not None and pad_to_multiple(x[..., :2, :4], 2)[0].shape[-2:] == (2, 4)
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_multiple(x, 4, "zeros")  # type: ignore[arg-type]


def test_random_patches_seeded_sized_and_options():
    imgs = [np.arange(1, 40 * 50 + 1, dtype=np.int32).reshape(1, 40, 50), np.zeros((1, 10, 12), np.int32)]
    a = random_patches(imgs, 20, 16, seed=3)
    assert a.shape == (20, 1, 16, 16) and a.dtype == np.int32
    np.testing.assert_array_equal(a, random_patches(imgs, 20, 16, seed=3))
    assert not np.array_equal(a, random_patches(imgs, 20, 16, seed=4))
    # Crops of the ramp image are windows of it: columns increase by 1, rows by 50 (no flips by default).
    ramp = [p[0] for p in a if p[0].max() > 0]
    assert ramp and all(np.all(np.diff(p, axis=1) == 1) and np.all(np.diff(p, axis=0) == 50) for p in ramp)
    flipped = random_patches(imgs[:1], 40, 16, seed=3, flips=True)
    dirs = {(int(np.sign(np.diff(p[0], axis=1)[0, 0])), int(np.sign(np.diff(p[0], axis=0)[0, 0]))) for p in flipped}
    assert dirs == {(1, 1), (-1, 1), (1, -1), (-1, -1)}, "both flips, independently"
    small = [np.arange(6, dtype=np.uint8).reshape(1, 2, 3)]
    edge = random_patches(small, 1, 4, seed=0, pad_mode="edge")[0, 0]
    refl = random_patches(small, 1, 4, seed=0, pad_mode="reflect")[0, 0]
    assert edge[3, 0] == small[0][0, 1, 0] and refl[2, 0] == small[0][0, 0, 0]
    with pytest.raises(ValueError, match="no images"):
        random_patches([], 1, 4)


def test_rgb_patches_and_as_rgb():
    gray = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    rgba = np.dstack([gray, gray // 2, gray // 3, np.full_like(gray, 7)])
    assert as_rgb(gray).shape == (30, 40, 3) and as_rgb(rgba).shape == (30, 40, 3)
    np.testing.assert_array_equal(as_rgb(rgba)[..., 2], gray // 3)
    p = rgb_patches([gray], 5, 16, seed=1)
    assert p.shape == (5, 3, 16, 16)
    np.testing.assert_array_equal(p[:, 0], p[:, 2]), "gray: three equal channels"


def test_map_tiles_gives_the_untiled_result_of_the_codec_transforms():
    """Large images go through the codecs' transforms in tiles with a halo: same output, a tile's memory."""
    torch.manual_seed(0)
    g_a, g_s = analysis_transform(3, 8, 6).eval(), synthesis_transform(6, 8, 3).eval()
    halo_a, halo_s = receptive_halo(conv_specs(g_a), multiple=16), receptive_halo(conv_specs(g_s))
    assert halo_a == 32, "four stride-2 5x5 convolutions reach 2 + 4 + 8 + 16 = 30 pixels; rounded up to the stride"
    assert halo_s == 4, "the transposed mirror reaches under 4 latent pixels"
    x, y = torch.rand(1, 3, 96, 80), torch.randn(1, 6, 7, 5)
    with torch.no_grad():
        for fn, inp, kw in ((g_a, x, {"tile": 32, "halo": halo_a, "down": 16}),
                            (g_s, y, {"tile": 2, "halo": halo_s, "up": 16})):
            whole = fn(inp)
            tiled = map_tiles(fn, inp, **kw)
            assert tiled.shape == whole.shape
            torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
            seams = map_tiles(fn, inp, **{**kw, "halo": 0})
            assert float((seams - whole).abs().max()) > 1e-3, "without the halo the tiles' seams show"
        assert map_tiles(lambda t: t * 2, x, 96, 0) is not None, "an input within one tile is a single call"
    with pytest.raises(ValueError, match="multiples of 16"):
        map_tiles(g_a, x, 24, halo_a, down=16)


def _reference_patches(images, count, size, seed, flips, pad_mode):
    """The documented random stream, all images in memory (the implementation before streaming)."""
    rng = np.random.default_rng(seed)
    areas = np.array([im.shape[-2] * im.shape[-1] for im in images], dtype=np.float64)
    out = []
    for j in rng.choice(len(images), size=count, p=areas / areas.sum()):
        im = images[j]
        h, w = im.shape[-2:]
        im = np.pad(im, ((0, 0), (0, max(0, size - h)), (0, max(0, size - w))), mode=pad_mode)
        top, left = int(rng.integers(0, im.shape[-2] - size + 1)), int(rng.integers(0, im.shape[-1] - size + 1))
        crop = im[:, top : top + size, left : left + size]
        if flips and rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        if flips and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(crop)
    return np.stack(out)


def test_streamed_patches_are_the_in_memory_ones_one_image_at_a_time():
    """Training crops planned from the sizes and cut as each image arrives (a generator, read once):
    the same crops as with every image in memory, so training on a large image set gives the same model."""
    rng = np.random.default_rng(5)
    chw = [rng.integers(0, 255, (3, h, w), dtype=np.uint8) for h, w in ((40, 60), (10, 70), (33, 12), (100, 100))]
    shapes = [im.shape[-2:] for im in chw]
    for flips, pad in ((False, "edge"), (True, "reflect")):
        ref = _reference_patches(chw, 50, 24, 7, flips, pad)
        np.testing.assert_array_equal(random_patches(chw, 50, 24, 7, flips=flips, pad_mode=pad), ref)
        a, b = random_patches_streamed(shapes, iter(chw), [(50, 7), (9, 8)], 24, flips=flips, pad_mode=pad)
        np.testing.assert_array_equal(a, ref)
        np.testing.assert_array_equal(b, _reference_patches(chw, 9, 24, 8, flips, pad))
    hwc = [np.moveaxis(im, 0, -1) for im in chw] + [rng.integers(0, 255, (50, 30), dtype=np.uint8)]
    one, two = rgb_patches_streamed([im.shape[:2] for im in hwc], (im for im in hwc), [(30, 1), (5, 2)], 32)
    np.testing.assert_array_equal(one, rgb_patches(hwc, 30, 32, 1))
    np.testing.assert_array_equal(two, rgb_patches(hwc, 5, 32, 2))
    with pytest.raises(ValueError, match="plan expected"):
        random_patches_streamed(shapes[::-1], iter(chw), [(5, 0)], 8)
    with pytest.raises(ValueError, match="3 images arrived, 4 were planned"):
        random_patches_streamed(shapes, iter(chw[:3]), [(5, 0)], 8)
