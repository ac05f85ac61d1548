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


def test_shard_spans_close_on_count_or_bytes():
    from tasks.images import shard_spans

    assert shard_spans([10] * 5, 2, 1e9) == [range(2), range(2, 4), range(4, 5)]
    assert shard_spans([10, 10, 10, 50, 10], 64, 25) == [range(2), range(2, 3), range(3, 4), range(4, 5)]
    assert shard_spans([], 64, 25) == []


def test_large_files_make_smaller_shards_with_paths_labels_and_bad_files_kept_straight(tmp_path):
    """Shards close on bytes as well as on count; every image keeps its path, label and pixels, and a bad
    file in a later shard is reported by its own name."""
    import dask
    import fsspec
    from PIL import Image

    from tasks.images import ImageLoadConfig, inspect_images, load_images
    from tasks.storage import RunDir

    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    originals = {}
    for i, side in enumerate([40, 90, 30, 120, 50, 60, 20, 24]):  # noise: PNG bytes ~ pixels
        rel = f"{'ab'[i % 2]}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(img).save(root / rel)
        originals[rel] = img
    (root / "b" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)  # broken, in a later shard
    del originals["b/5.png"]
    source = inspect_images(str(root))
    run = RunDir(fs=fsspec.filesystem("file"), path=str(tmp_path / "run"), app="index", run_id="r")
    load = ImageLoadConfig(shard_mb=12_000 / 2**20, skip_bad=True)  # about 12 kB of files per shard
    with dask.config.set(scheduler="synchronous"):  # no cluster here (another test may have left one configured)
        imset = load_images(source, load, run=run, prefix="images/input")
        whole = load_images(source, ImageLoadConfig(skip_bad=True), run=run, prefix="images/whole")
    sizes = [f.size for f in source.files]
    # a/0 a/2 a/4 a/6 | b/1 | b/3 | b/5 (broken) b/7: a shard closes before the file that would pass 12 kB
    assert imset.counts == (4, 1, 1, 1), (sizes, imset.counts)
    assert [s["path"].rsplit("/", 2)[-2:] for s in imset.skipped] == [["b", "5.png"]]
    assert list(imset.rel) == sorted(originals) and list(imset.labels) == [r[0] for r in sorted(originals)]
    for rel, img in zip(imset.rel, images_of(imset), strict=True):
        assert img[0].tobytes() == originals[rel].tobytes(), rel
    assert whole.counts == (7,) and whole.rel == imset.rel
