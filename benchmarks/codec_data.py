"""Training photographs of the benchmark codecs: only images that ship inside installed packages.

- scikit-image's bundled ``skimage.data`` images that are on disk without a download
  (:data:`TRAIN_IMAGES`; ``stereo_motorcycle`` gives two photographs, its left and right views);
- scikit-learn's sample images (``china.jpg``, ``flower.jpg``, read from the package folder);
- matplotlib's sample photograph ``grace_hopper.jpg``.

Never the held-out evaluation photographs (:data:`HELDOUT_IMAGES`, =
``tasks.sample_data.CODEC_HELDOUT_PHOTOS``): :func:`training_images` refuses any training
image whose pixels equal a held-out one (skimage's ``cat`` is ``chelsea``).

:func:`save_images` writes them to one ``.npz`` (the uint8 arrays, zlib-compressed, plus names,
sources and pixel hashes) for a machine without those packages (a GPU box with only torch, numpy
and safetensors: :func:`load_images_file` and :func:`pyramid` need nothing else). Collecting
them needs scikit-image and Pillow; the package images are found by path, without importing
scikit-learn or matplotlib.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass

import numpy as np

# Bundled scikit-image photographs used for training. The held-out set is never seen in
# training (skimage's `cat` is `chelsea`, so it is excluded too).
TRAIN_IMAGES = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass",
                "gravel", "moon", "coins", "clock", "text", "page", "cell", "stereo_motorcycle")
# (package, path inside the package) of photographs shipped by other installed packages.
PACKAGE_IMAGES = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                  ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))
# tasks.sample_data.CODEC_HELDOUT_PHOTOS, written by `aeflow sample-data` as photos/codec-heldout/
# (repeated so the training script needs only torch, numpy and safetensors; a test checks they agree).
HELDOUT_IMAGES = ("chelsea", "coffee", "rocket", "camera")


@dataclass(frozen=True)
class TrainingImage:
    """One training photograph and where it came from (its lineage)."""

    name: str
    source: str
    pixels: np.ndarray

    def lineage(self) -> dict[str, object]:
        h, w = self.pixels.shape[:2]
        return {"name": self.name, "source": self.source, "size": f"{w}x{h}", "sha256": pixel_hash(self.pixels)}


def pixel_hash(a: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of an image's shape and pixels."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def load_skimage(names: tuple[str, ...]) -> list[np.ndarray]:
    """scikit-image's bundled images by name (as uint8 arrays; a function returning several: the tuple)."""
    import skimage.data

    out = []
    for n in names:
        im = getattr(skimage.data, n)()
        out.append(im if isinstance(im, tuple) else np.asarray(im))
    return out


def _package_file(package: str, rel: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (needed for {rel})")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{package} has no {rel}")
    return path


def training_images() -> list[TrainingImage]:
    """Every training photograph, checked against the held-out set."""
    from PIL import Image

    out = []
    for name, arr in zip(TRAIN_IMAGES, load_skimage(TRAIN_IMAGES), strict=True):
        if name == "stereo_motorcycle":  # (left, right, disparity)
            out += [TrainingImage(f"{name}_left", f"skimage.data.{name}()[0]", np.asarray(arr[0])),
                    TrainingImage(f"{name}_right", f"skimage.data.{name}()[1]", np.asarray(arr[1]))]
        else:
            out.append(TrainingImage(name, f"skimage.data.{name}()", arr))
    for package, rel in PACKAGE_IMAGES:
        with Image.open(_package_file(package, rel)) as im:
            out.append(TrainingImage(os.path.splitext(os.path.basename(rel))[0], f"{package}: {rel}",
                                     np.asarray(im.convert("RGB"))))
    held = {pixel_hash(a) for a in load_skimage(HELDOUT_IMAGES)}
    leaked = [t.name for t in out if pixel_hash(t.pixels) in held]
    if leaked or {t.name for t in out} & set(HELDOUT_IMAGES):
        raise ValueError(f"training images include held-out evaluation images: {leaked}")
    return out


def save_images(path: str, images: list[TrainingImage]) -> int:
    """Write the photographs (uint8 arrays, zlib-compressed) with names, sources and hashes; returns the
    file size. Reading it back needs numpy only (:func:`load_images_file`)."""
    arrays: dict[str, np.ndarray] = {f"img{i:02d}": np.ascontiguousarray(t.pixels) for i, t in enumerate(images)}
    arrays["names"] = np.array([t.name for t in images])
    arrays["sources"] = np.array([t.source for t in images])
    arrays["hashes"] = np.array([pixel_hash(t.pixels) for t in images])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)
    return os.path.getsize(path)


def load_images_file(path: str) -> list[TrainingImage]:
    """Inverse of :func:`save_images` (checks every image against its recorded pixel hash). Files of the
    earlier format (PNG bytes, ``png00``...) still read, with Pillow."""
    with np.load(path, allow_pickle=False) as z:
        names, sources, hashes = list(z["names"]), list(z["sources"]), list(z["hashes"])
        out = []
        for i, (name, source, digest) in enumerate(zip(names, sources, hashes, strict=True)):
            if f"img{i:02d}" in z.files:
                pixels = z[f"img{i:02d}"]
            else:
                from PIL import Image

                with Image.open(io.BytesIO(z[f"png{i:02d}"].tobytes())) as im:
                    pixels = np.asarray(im)
            if pixel_hash(pixels) != digest:
                raise ValueError(f"{path}: image {name} does not match its recorded hash")
            out.append(TrainingImage(str(name), str(source), pixels))
    return out


def pyramid(images: list[np.ndarray], scales: tuple[float, ...], min_side: int) -> list[np.ndarray]:
    """Each image at each scale, kept while its shorter side is at least ``min_side``.

    The scale augmentation: downscaled copies show the same content with more detail per
    crop, as photographs of other resolutions would. Bicubic with antialiasing in PyTorch
    (Pillow's resampling filter), so the GPU machine needs no image library.
    """
    import torch
    import torch.nn.functional as F

    out = []
    for im in images:
        h, w = im.shape[:2]
        for s in scales:
            if s == 1.0:
                out.append(im)
                continue
            size = (round(h * s), round(w * s))
            if min(size) < min_side:
                continue
            x = torch.from_numpy(np.ascontiguousarray(im)).float()
            x = x.permute(2, 0, 1)[None] if im.ndim == 3 else x[None, None]
            y = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            y = y.round().clamp(0, 255).to(torch.uint8)[0]
            out.append(np.ascontiguousarray(y.permute(1, 2, 0).numpy() if im.ndim == 3 else y[0].numpy()))
    return out


_PERMUTATIONS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def colour_augment(batch: np.ndarray, p: float, seed: int) -> np.ndarray:
    """A batch of RGB crops ``(B, 3, H, W)`` uint8 with, for each crop with probability ``p``, its channels
    permuted (one of the five non-identity orders) and its saturation raised by a factor in [1, 3] about each
    pixel's grey, clipped. The 18 training photographs hold few saturated colours, and codecs trained on them
    alone brought pure green back as (41, 156, 38) at their best level (``quality_compress``'s saturated-colour
    row); deterministic in ``seed``."""
    if p <= 0:
        return batch
    rng = np.random.default_rng(seed)
    out = batch.copy()
    for i in np.flatnonzero(rng.random(len(batch)) < p):
        x = batch[i, list(_PERMUTATIONS[int(rng.integers(len(_PERMUTATIONS)))])].astype(np.float32)
        grey = x.mean(axis=0, keepdims=True)
        out[i] = np.clip(grey + float(rng.uniform(1.0, 3.0)) * (x - grey), 0, 255).round().astype(np.uint8)
    return out
