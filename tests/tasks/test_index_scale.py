"""index at scale: what fit and evaluate hold is bounded by settings, not by the collection."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import tasks.images as images_mod
from tasks.apps.index import Config, Index, IndexRunConfig, build_index
from tasks.apps.kinds import ImageContext
from tasks.config import TrainConfig
from tasks.images import ImageSet

pytestmark = [pytest.mark.tasks]


def _collection(tmp_path, n=200, side=64, shard=64) -> tuple[ImageSet, np.ndarray]:
    """``n`` gray images in shards: image i carries its number in its first two pixels, and a pattern of its
    class (i % 4) plus noise elsewhere."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    patterns = [128 + 100 * np.sin(xx / (3 + c) + c) * np.cos(yy / (4 + 2 * c)) for c in range(4)]
    images = []
    for i in range(n):
        img = (patterns[i % 4] + rng.normal(0, 40, (side, side))).clip(0, 255).astype(np.uint8)
        img[0, 0], img[0, 1] = i % 256, i // 256
        images.append(img[None])
    shards, counts = [], []
    for s, start in enumerate(range(0, n, shard)):
        part = images[start : start + shard]
        buf = io.BytesIO()
        np.savez(buf, **{f"i{k:06d}": a for k, a in enumerate(part)})
        (tmp_path / f"shard-{s}.npz").write_bytes(buf.getvalue())
        shards.append(str(tmp_path / f"shard-{s}.npz"))
        counts.append(len(part))
    imset = ImageSet(source_uri=str(tmp_path), role="input", shards=tuple(shards), counts=tuple(counts),
                     rel=tuple(f"{i % 4}/{i:04d}.png" for i in range(n)), labels=tuple(str(i % 4) for i in range(n)),
                     shapes=((1, side, side),) * n, has_labels=True)
    return imset, np.stack(images)


def _ctx(imset, **train) -> ImageContext:
    cfg = IndexRunConfig(train=TrainConfig(**{"epochs": 1, **train}), app=Config())
    return ImageContext(config=cfg, run=None, device=torch.device("cpu"), train=imset)  # type: ignore[arg-type]


def _numbers(x: np.ndarray) -> list[int]:
    return [int(a[0, 0, 0]) + 256 * int(a[0, 0, 1]) for a in x]


def test_fit_takes_a_seeded_sample_of_the_images_when_they_exceed_memory_mb(tmp_path):
    imset, _ = _collection(tmp_path)  # 200 images of 4 kB: 800 kB
    ctx = _ctx(imset)  # 512 MB: every image
    tr, va = ctx.split()
    x_tr, x_va = Index().training_images(ctx)
    assert _numbers(x_tr) == list(tr) and _numbers(x_va) == list(va) and not ctx.notes

    ctx = _ctx(imset, memory_mb=1)  # half of 1 MB holds 128 images of 4 kB
    x_tr, x_va = Index().training_images(ctx)
    got_tr, got_va = _numbers(x_tr), _numbers(x_va)
    assert len(got_tr) + len(got_va) == 128 and len(got_va) >= 1
    assert set(got_tr) <= set(tr) and set(got_va) <= set(va), "the sample keeps the train/validation split"
    assert got_tr == sorted(got_tr) and len(set(got_tr)) == len(got_tr)
    assert ctx.notes == ["index trained on a seeded sample of 128 of the 200 training images "
                         "(train.memory_mb=1; train.stream=off for all)"]
    again = Index().training_images(_ctx(imset, memory_mb=1))
    assert _numbers(again[0]) == got_tr, "the sample is a function of the seed"
    assert _numbers(Index().training_images(_ctx(imset, memory_mb=1, seed=1))[0]) != got_tr

    ctx = _ctx(imset, memory_mb=1, stream="on")  # index cannot stream: read as auto, said
    assert _numbers(Index().training_images(ctx)[0]) == got_tr
    assert ctx.notes[0].startswith("train.stream=on read as auto: index's fit needs its images at hand"), ctx.notes

    ctx = _ctx(imset, memory_mb=1, stream="off")
    x_tr, x_va = Index().training_images(ctx)
    assert _numbers(x_tr) == list(tr) and _numbers(x_va) == list(va) and not ctx.notes


@pytest.mark.parametrize("eval_max", [1000, 60])
def test_precision_baselines_are_measured_on_the_same_images_as_the_codes(tmp_path, monkeypatch, eval_max):
    """With the raw pixels themselves as the 'AE codes', the codes' precision and mAP must equal the raw-pixel
    baseline's exactly, sampled or not: the sampled images are the sampled codes' own images."""
    imset, x = _collection(tmp_path)
    codes = x.reshape(len(x), -1).astype(np.float32) / 255.0
    cfg = IndexRunConfig(app=Config(eval_max=eval_max, eval_queries=50))
    ctx = ImageContext(config=cfg, run=None, device=torch.device("cpu"), train=imset)  # type: ignore[arg-type]
    ctx.cache["codes"], ctx.cache["index"] = codes, build_index(codes, "exact", cfg.app)[0]
    read = []
    real = images_mod.shard_images
    monkeypatch.setattr(images_mod, "shard_images", lambda s, i: read.append(i) or real(s, i))
    ev = Index().evaluate(ctx, fitted=None)  # type: ignore[arg-type]
    raw = ev.baselines["raw_pixels"]
    assert ev.metrics["precision_at_10"] == raw["precision_at_10"] and ev.metrics["map"] == raw["map"]
    assert 0.3 < ev.metrics["precision_at_10"] <= 1.0 and ev.metrics["recall_at_10"] == 1.0
    assert ev.metrics["n_images"] == 200 and sorted(set(read)) == read == [0, 1, 2, 3], "each shard read once"
    sampled = [n for n in ev.notes if "seeded sample" in n]
    if eval_max < 200:
        assert sampled == ["precision@10 and mAP (AE codes, raw pixels, PCA) within a seeded sample of 60 of the 200 "
                           "images (app.eval_max=60); recall@10 and QPS over the whole index"]
        assert "pca_59" in ev.baselines
    else:
        assert not sampled and "pca_199" in ev.baselines


def test_an_index_below_its_target_recall_says_why(tmp_path):
    """IVF-PQ on a collection too small for its codebooks: the calibration ends at every cell and the
    run's notes say so (with what to change), instead of a bare low recall."""
    imset, x = _collection(tmp_path)
    codes = x.reshape(len(x), -1).astype(np.float32) / 255.0
    cfg = IndexRunConfig(app=Config(eval_queries=50))
    ctx = ImageContext(config=cfg, run=None, device=torch.device("cpu"), train=imset)  # type: ignore[arg-type]
    index, kind = build_index(codes, "ivfpq", cfg.app)
    ctx.cache["codes"], ctx.cache["index"] = codes, index
    ev = Index().evaluate(ctx, fitted=None)  # type: ignore[arg-type]
    assert kind == "ivfpq" and ev.metrics["recall_at_10"] < 0.95
    assert any(n.startswith(f"recall@10 {ev.metrics['recall_at_10']:.3f} is below app.target_recall=0.95: the build's "
                            f"calibration stopped at its bound, nprobe={index.nlist} (every cell)") for n in ev.notes), ev.notes
    exact, _ = build_index(codes, "exact", cfg.app)
    ctx.cache["index"] = exact
    ev = Index().evaluate(ctx, fitted=None)  # type: ignore[arg-type]
    assert ev.metrics["recall_at_10"] == 1.0 and not any("below app.target_recall" in n for n in ev.notes)
