"""Image helpers shared by the image models: padding to a stride, random training crops, RGB views.

Pure numpy/PyTorch. One implementation each, with the options that the callers differ in
spelled out (the convolutional autoencoders and the learned codecs used to carry their
own copies with slightly different behaviour):

- :func:`pad_to_multiple` — bottom/right padding of ``(N, C, H, W)`` tensors to a stride,
  ``mode="replicate"`` (the codecs: their bitstreams depend on it) or ``mode="reflect"``
  (the autoencoders: no artificial flat edge; replication where the image is too small to reflect).
- :func:`random_patches` — seeded crops of CHW images drawn in proportion to image area,
  optionally flipped; images smaller than the crop are padded (``pad_mode``).
- :func:`as_rgb` — grayscale/RGBA arrays as 3-channel RGB (how the codecs see images).
- Tiled inference on large images, memory bounded by a tile's, two ways:
  :func:`tiled_apply` blends overlapping tiles with a tapered window (the denoiser: a network
  whose reach exceeds any affordable overlap; no visible seams, close to the untiled output);
  :func:`map_tiles` keeps each tile's own part of the output, computed with a halo that covers
  the receptive field, at any up/down scale (the codecs: exactly the untiled output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PadMode = Literal["replicate", "reflect"]


def pad_to_multiple(x: Tensor, multiple: int, mode: PadMode = "replicate") -> tuple[Tensor, tuple[int, int]]:
    """Pad ``(N, C, H, W)`` on the bottom/right to a multiple of ``multiple``; returns (padded, (H, W)).

    Args:
        x: The batch.
        multiple: The stride the height and width must divide by.
        mode: ``"replicate"`` repeats the last row/column; ``"reflect"`` mirrors the image where
            it is larger than the padding (else replicates, as reflection needs the room).
    """
    if mode not in ("replicate", "reflect"):
        raise ValueError(f"pad mode must be 'replicate' or 'reflect', got {mode!r}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and not (ph < h and pw < w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def random_patches(images: list[np.ndarray], count: int, size: int, seed: int = 0, *, flips: bool = False,
                   pad_mode: Literal["edge", "reflect"] = "edge") -> np.ndarray:
    """``count`` random ``size x size`` crops of CHW images, as ``(count, C, size, size)``.

    Images are drawn in proportion to their (unpadded) area, so large photographs give
    more crops than small ones. The random stream is, per crop: the image, the top row,
    the left column and, with ``flips``, a left-right then an up-down coin.

    Args:
        images: CHW arrays with the same channel count and dtype.
        count: Number of crops.
        size: Crop side.
        seed: Seed of the draws (same seed, same crops).
        flips: Random horizontal and vertical flips (augmentation).
        pad_mode: How an image smaller than ``size`` is padded (bottom/right) first:
            ``"edge"`` (replicate) or ``"reflect"``.
    """
    shapes = [(im.shape[-2], im.shape[-1]) for im in images]
    return random_patches_streamed(shapes, images, [(count, seed)], size, flips=flips, pad_mode=pad_mode)[0]


def random_patches_streamed(shapes: list[tuple[int, int]], images: Iterable[np.ndarray], draws: list[tuple[int, int]],
                            size: int, *, flips: bool = False,
                            pad_mode: Literal["edge", "reflect"] = "edge") -> list[np.ndarray]:
    """:func:`random_patches` for each ``(count, seed)`` of ``draws``, from images that arrive one
    at a time, in order, with their ``(H, W)`` known beforehand (``shapes``): the same crops, with
    one image in memory at a time instead of all of them (training on a large image set).

    The crops are planned from the shapes alone (where they fall depends on nothing else),
    then cut from each image as it arrives.
    """
    if not shapes:
        raise ValueError("no images to draw patches from")
    areas = np.array([h * w for h, w in shapes], dtype=np.float64)
    padded = [(max(h, size), max(w, size)) for h, w in shapes]
    plans: list[list[list[tuple[int, int, int, bool, bool]]]] = []  # per draw, per image: (crop, top, left, lr, ud)
    for count, seed in draws:
        rng = np.random.default_rng(seed)
        which = rng.choice(len(shapes), size=count, p=areas / areas.sum())
        per_image: list[list[tuple[int, int, int, bool, bool]]] = [[] for _ in shapes]
        for i, j in enumerate(which):
            h, w = padded[j]
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            lr = bool(flips and rng.random() < 0.5)
            ud = bool(flips and rng.random() < 0.5)
            per_image[j].append((i, top, left, lr, ud))
        plans.append(per_image)
    outs: list[np.ndarray] = []
    seen = 0
    for j, im in enumerate(images):
        if j >= len(shapes) or im.shape[-2:] != tuple(shapes[j]):
            raise ValueError(f"image {j} has shape {im.shape[-2:]}, the plan expected {shapes[j] if j < len(shapes) else None}")
        if not outs:
            outs = [np.empty((count, im.shape[0], size, size), dtype=im.dtype) for count, _ in draws]
        h, w = shapes[j]
        if h < size or w < size:
            im = np.pad(im, ((0, 0), (0, max(0, size - h)), (0, max(0, size - w))), mode=pad_mode)
        for out, per_image in zip(outs, plans, strict=True):
            for i, top, left, lr, ud in per_image[j]:
                crop = im[:, top : top + size, left : left + size]
                if lr:
                    crop = crop[:, :, ::-1]
                if ud:
                    crop = crop[:, ::-1]
                out[i] = crop
        seen += 1
    if seen != len(shapes):
        raise ValueError(f"{seen} images arrived, {len(shapes)} were planned")
    return outs


def as_rgb(im: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 1|3|4) -> (H, W, 3); alpha dropped, gray replicated."""
    a = np.asarray(im)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    return a[:, :, :3]


def rgb_patches(images: list[np.ndarray], count: int, size: int, seed: int = 0) -> np.ndarray:
    """The codecs' training crops: HWC/gray uint8 images as RGB, flipped at random, small ones reflected.

    ``(count, 3, size, size)`` uint8; :func:`random_patches` with ``flips=True, pad_mode="reflect"``.
    """
    return rgb_patches_streamed([im.shape[:2] for im in images], images, [(count, seed)], size)[0]


def rgb_patches_streamed(shapes: list[tuple[int, int]], images: Iterable[np.ndarray], draws: list[tuple[int, int]],
                         size: int) -> list[np.ndarray]:
    """:func:`rgb_patches` for each ``(count, seed)`` of ``draws``, the images arriving one at a time
    (:func:`random_patches_streamed`)."""
    chw = (as_rgb(im).transpose(2, 0, 1) for im in images)
    return random_patches_streamed(shapes, chw, draws, size, flips=True, pad_mode="reflect")


def map_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, halo: int, up: int = 1, down: int = 1) -> Tensor:
    """``fn(x)`` for ``x`` (N, C, H, W), computed tile by tile: each ``tile`` x ``tile`` block of
    ``x`` is read with ``halo`` more pixels on every side (where the image has them) and only the
    block's own part of ``fn``'s output is kept.

    The result equals ``fn(x)`` when ``halo`` covers how far ``fn`` reaches (its receptive field
    in pixels of ``x``, :func:`models.codec_layers.receptive_halo`) and ``fn`` commutes with shifts
    by multiples of ``down``: exactly for integer arithmetic (the codecs' exact synthesis), up to
    float rounding otherwise. Peak memory is one tile's instead of the whole image's. An ``x`` of
    at most ``tile`` in both dimensions is a single call.

    Args:
        fn: Maps (N, C, h, w) to (N, C', h * up / down, w * up / down).
        tile, halo: Sizes in pixels of ``x``, multiples of ``down``.
        up, down: ``fn``'s resolution factor (a synthesis transform up-samples, an analysis one
            down-samples; ``x``'s height and width must divide by ``down``).
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    if tile % down or halo % down or h % down or w % down or tile < 1 or halo < 0:
        raise ValueError(f"tile {tile}, halo {halo} and the size {h}x{w} must be multiples of {down}")
    out: Tensor | None = None
    for y0 in range(0, h, tile):
        y1, ya = min(h, y0 + tile), max(0, y0 - halo)
        yb = min(h, y1 + halo)
        for x0 in range(0, w, tile):
            x1, xa = min(w, x0 + tile), max(0, x0 - halo)
            xb = min(w, x1 + halo)
            part = fn(x[..., ya:yb, xa:xb])
            if out is None:
                out = part.new_empty((*part.shape[:-2], h * up // down, w * up // down))
            oy, ox = (y0 - ya) * up // down, (x0 - xa) * up // down
            th, tw = (y1 - y0) * up // down, (x1 - x0) * up // down
            out[..., y0 * up // down: y0 * up // down + th, x0 * up // down: x0 * up // down + tw] = \
                part[..., oy: oy + th, ox: ox + tw]
    assert out is not None
    return out


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


@torch.inference_mode()
def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    tile: int = 256,
    overlap: int = 32,
    on_tile: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Apply an image-to-image ``fn`` to ``x`` ``(N, C, H, W)`` in overlapping tiles.

    Each tile is processed with its context, and neighbouring tiles are blended
    across their ``overlap``: each tile's outer quarter of the overlap (where it
    lacks context) gets no weight and the middle half a linear ramp, weights are
    normalised to sum to one everywhere, so there is no seam, and memory is
    bounded by the tile size.
    Images no larger than ``tile`` go through ``fn`` whole. ``on_tile(done, total)`` is called after
    each tile of a larger image (progress: a photograph is hundreds of tiles).
    """
    n, c, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    if not 0 <= overlap < tile // 2 + 1:
        raise ValueError(f"overlap must be in [0, tile/2], got {overlap} for tile {tile}")
    step = tile - overlap
    ys, xs = _starts(h, tile, step), _starts(w, tile, step)
    out: Tensor | None = None
    weight = torch.zeros(1, 1, h, w, device=x.device)
    for yi, y0 in enumerate(ys):
        th = min(tile, h)
        for xi, x0 in enumerate(xs):
            tw = min(tile, w)
            patch = fn(x[..., y0 : y0 + th, x0 : x0 + tw]).float()
            if out is None:
                out = torch.zeros(n, patch.shape[1], h, w, device=x.device)
            # Overlap with the neighbour may exceed `overlap` for the last tile; ramp over the real overlap.
            oy_lead = (ys[yi - 1] + th - y0) if yi > 0 else 0
            oy_trail = (y0 + th - ys[yi + 1]) if yi + 1 < len(ys) else 0
            ox_lead = (xs[xi - 1] + tw - x0) if xi > 0 else 0
            ox_trail = (x0 + tw - xs[xi + 1]) if xi + 1 < len(xs) else 0
            wy = _taper_two(th, oy_lead, oy_trail)
            wx = _taper_two(tw, ox_lead, ox_trail)
            win = (wy[:, None] * wx[None, :]).to(x.device)
            out[..., y0 : y0 + th, x0 : x0 + tw] += patch * win
            weight[..., y0 : y0 + th, x0 : x0 + tw] += win
            if on_tile is not None:
                on_tile(yi * len(xs) + xi + 1, len(ys) * len(xs))
    assert out is not None
    return out / weight


def _taper_two(n: int, lead: int, trail: int) -> Tensor:
    """Weights of one tile along one axis: zero over the outer quarter of each overlap (the
    pixels a tile sees with the least context), then a linear ramp to one."""
    w = torch.ones(n)
    for length, flip in ((lead, False), (trail, True)):
        if length <= 0:
            continue
        t = torch.arange(length, dtype=torch.float32) + 0.5
        ramp = ((t - length / 4) / (length / 2)).clamp(1e-4, 1.0)
        if flip:
            w[n - length :] = torch.minimum(w[n - length :], ramp.flip(0))
        else:
            w[:length] = torch.minimum(w[:length], ramp)
    return w
