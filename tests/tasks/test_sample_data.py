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
    assert cfg["model_run"] == "benchmarks/weights/codec"
    assert cfg["load"]["apply_to"].endswith("photos/codec-heldout")
