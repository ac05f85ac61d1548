"""Reading parts of a decoded image set: only the shards that hold the wanted images."""

from __future__ import annotations

import io

import numpy as np
import pytest

import tasks.images as images_mod
from tasks.images import ImageSet, images_of, stack_images

pytestmark = [pytest.mark.tasks]


def _image_set(tmp_path, counts=(3, 3, 2)) -> tuple[ImageSet, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images, shards = [], []
    for s, n in enumerate(counts):
        arrays = {f"i{k:06d}": rng.integers(0, 255, (1, 4 + s, 5), dtype=np.uint8) for k in range(n)}
        images += [arrays[k] for k in sorted(arrays)]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = tmp_path / f"shard-{s}.npz"
        path.write_bytes(buf.getvalue())
        shards.append(str(path))
    imset = ImageSet(source_uri=str(tmp_path), role="input", shards=tuple(shards), counts=tuple(counts),
                     rel=tuple(f"{i}.png" for i in range(len(images))), labels=(None,) * len(images),
                     shapes=tuple(im.shape for im in images))
    return imset, images


def test_images_of_reads_only_the_shards_it_needs_in_the_order_asked(tmp_path, monkeypatch):
    imset, images = _image_set(tmp_path)
    read = []
    real = images_mod.shard_images
    monkeypatch.setattr(images_mod, "shard_images", lambda s, i: read.append(i) or real(s, i))
    got = images_of(imset, [7, 0, 6, 1])
    assert [g.tobytes() for g in got] == [images[i].tobytes() for i in (7, 0, 6, 1)]
    assert read == [0, 2], "shard 1 holds none of them: not read; each shard read once"
    read.clear()
    assert [g.tobytes() for g in images_of(imset, np.array([3, 5]))] == [images[3].tobytes(), images[5].tobytes()]
    assert read == [1]
    assert len(images_of(imset)) == 8 and images_of(imset, []) == []


def test_stack_images_stacks_the_wanted_images_of_one_shape(tmp_path, monkeypatch):
    imset, images = _image_set(tmp_path, counts=(3, 3))
    with pytest.raises(Exception, match="different shapes"):  # shard 0 and 1 differ in height
        stack_images(imset)
    imset, images = _image_set(tmp_path, counts=(4,))
    read = []
    real = images_mod.shard_images
    monkeypatch.setattr(images_mod, "shard_images", lambda s, i: read.append(i) or real(s, i))
    got = stack_images(imset, [2, 0])
    assert got.shape == (2, 1, 4, 5) and got.dtype == np.uint8
    assert got.tobytes() == np.stack([images[2], images[0]]).tobytes() and read == [0]
    assert stack_images(imset, []).shape == (0, 1, 4, 5)
