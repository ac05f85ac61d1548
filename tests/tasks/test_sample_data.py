"""The bundled photo splits: what is evaluated as held out was never trained on."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.train_codec import HELDOUT_IMAGES, TRAIN_IMAGES
from tasks.sample_data import CODEC_HELDOUT_PHOTOS, HELDOUT_PHOTOS, TRAIN_PHOTOS

REPO = Path(__file__).resolve().parents[2]


def test_photo_splits_are_disjoint():
    assert not set(HELDOUT_PHOTOS) & set(TRAIN_PHOTOS)
    # skimage's `cat` is `chelsea`: the codec's training list must not hold it under either name
    assert not set(CODEC_HELDOUT_PHOTOS) & (set(TRAIN_IMAGES) | {"cat"})
    assert tuple(HELDOUT_IMAGES) == tuple(CODEC_HELDOUT_PHOTOS)


def test_compress_deployment_applies_the_codec_to_photos_it_never_saw():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in doc["deployments"] if d["name"] == "compress"]
    cfg = dep["parameters"]["config"]
    assert cfg["model_run"] == "benchmarks/weights/hyperprior"
    assert (REPO / cfg["model_run"] / "weights.safetensors").is_file()
    assert cfg["load"]["apply_to"].endswith("photos/codec-heldout")


def test_noisy_copies_are_seeded_gaussian_at_the_given_sigma(tmp_path):
    import numpy as np
    from PIL import Image

    from tasks.sample_data import write_noisy

    clean = tmp_path / "clean"
    clean.mkdir()
    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(clean / "gray.png")
    Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(clean / "rgb.png")
    first = write_noisy(str(clean), str(tmp_path / "a"), sigma=25)
    again = write_noisy(str(clean), str(tmp_path / "b"), sigma=25)
    for name in ("gray.png", "rgb.png"):
        a = np.asarray(Image.open(f"{first}/{name}"), dtype=np.float64)
        assert a.shape == np.asarray(Image.open(clean / name)).shape
        assert np.array_equal(a, np.asarray(Image.open(f"{again}/{name}"))), "seeded: the same noise every time"
        noise = a - np.asarray(Image.open(clean / name), dtype=np.float64)
        assert 23 < noise.std() < 27 and abs(noise.mean()) < 2
