"""The denoise and index flows end to end on tiny images (real Prefect server, Dask cluster, S3)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from flows.cli import app as cli
from flows.pipeline import FLOWS
from tasks.apps.denoise import DenoiseRunConfig
from tasks.apps.index import IndexRunConfig
from tasks.config import resolve_config
from tasks.storage import open_run
from tests.conftest import TEST_BUCKET

pytestmark = [pytest.mark.flows]
runner = CliRunner()

TINY_CONV = {"model.channels": [8, 16], "model.latent_channels": 8}
FAST_DENOISE = {**TINY_CONV, "train.epochs": 5, "train.batch_size": 32, "train.lr": 5e-3, "train.patience": 10,
                "app.patches": 384, "app.patch_size": 32, "app.baselines": ["tv", "wavelet"], "app.side_by_side": 2}
FAST_INDEX = {**TINY_CONV, "load.size": 16, "train.epochs": 3, "train.batch_size": 32, "train.patience": 10}


def synthetic(i: int, h: int = 56, w: int = 72) -> np.ndarray:
    """A smooth image with edges: sinusoids and a bright rectangle."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 70 * np.sin(xx / (5 + i)) * np.cos(yy / (7 + i))
    img[12 + i : 30 + i, 8 : 36 + i] = 225
    return img.clip(0, 255).astype(np.uint8)


def write_photo_set(root, rng) -> list[str]:
    """clean/ and noisy/ (sigma 25) with a subfolder, an RGB image and a JPEG; returns relative paths."""
    rels = []
    for i in range(5):
        img = synthetic(i)
        if i == 3:
            img = np.stack([img, np.roll(img, 3, axis=1), 255 - img], axis=-1)  # RGB
        rel = {1: "sub/b.png", 3: "sub/rgb.png", 4: "photo.jpg"}.get(i, f"img{i}.png")
        noisy = (img + rng.normal(0, 25, img.shape)).clip(0, 255).round().astype(np.uint8)
        for kind, arr in (("clean", img), ("noisy", noisy)):
            path = root / kind / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, quality=98) if rel.endswith(".jpg") else Image.fromarray(arr).save(path)
        rels.append(rel)
    return rels


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, write_photo_set(root, np.random.default_rng(0))


@pytest.fixture(scope="module")
def denoise_model(prefect_server, dask_address, photos, tmp_path_factory):
    root, _ = photos
    out = str(tmp_path_factory.mktemp("denoise-out"))
    cfg = resolve_config(DenoiseRunConfig, options={**FAST_DENOISE, "load.input": str(root / "clean"), "output": out,
                                                    "dask_address": dask_address})
    return FLOWS["denoise"](config=cfg), out


def test_denoise_training_run_reports_and_saves_model(denoise_model):
    result, _ = denoise_model
    m = open_run(result.run_uri).manifest()
    assert {"psnr", "ssim", "psnr_noisy", "psnr_gain", "seconds_per_mp"} <= set(m.metrics)
    assert set(m.baselines) == {"tv", "wavelet"}
    assert {"model/config.json", "model/weights.safetensors", "report/side_by_side.png", "report/per_image.csv"} <= {
        o.path for o in m.outputs}
    assert m.extra["images"] == {"input": 5}
    assert {"load", "train", "evaluate"} <= set(m.timings)
    assert json.loads((open(os.path.join(result.run_uri, "model/config.json"))).read())["kind"] == "conv"


def test_denoise_apply_mirrors_inputs_and_improves_psnr(denoise_model, photos, dask_address):
    result, out = denoise_model
    root, rels = photos
    cfg = resolve_config(DenoiseRunConfig, options={
        "model_run": result.run_uri, "load.apply_to": str(root / "noisy"), "load.reference": str(root / "clean"),
        "output": out, "dask_address": dask_address, "app.baselines": ["tv", "wavelet", "nl_means", "bm3d"],
        "app.noise_sigma": 25})
    applied = FLOWS["denoise"](config=cfg)
    run = applied.run_uri
    for rel in rels:
        src, dst = Image.open(root / "noisy" / rel), Image.open(os.path.join(run, "denoised", rel))
        assert (dst.size, dst.mode, dst.format) == (src.size, src.mode, src.format), rel
    m = open_run(run).manifest()
    assert m.model_run == result.run_uri
    assert "model/config.json" not in {o.path for o in m.outputs}
    assert m.metrics["psnr"] > m.metrics["psnr_noisy"] + 1.0, m.metrics
    assert set(m.baselines) == {"tv", "wavelet", "nl_means", "bm3d"}
    per_image = pd.read_csv(os.path.join(run, "report/per_image.csv"))
    assert sorted(per_image["image"]) == sorted(rels)
    assert (per_image["psnr"] > per_image["psnr_noisy"]).all()
    with open(os.path.join(run, "report/side_by_side.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # More applied images than app.eval_images: a seeded sample is scored, and the notes say how many of how many
    # (per_image.csv listed the first 16 without a word about the rest).
    few = FLOWS["denoise"](config=cfg.model_copy(update={"app": cfg.app.model_copy(update={
        "eval_images": 3, "baselines": ("tv",)})}))
    per_image = pd.read_csv(os.path.join(few.run_uri, "report/per_image.csv"))
    assert len(per_image) == 3 and set(per_image["image"]) <= set(rels)
    assert any("3 of the 5 applied images (a seeded sample: app.eval_images=3) against the clean reference" in n
               for n in few.notes), few.notes


def test_denoise_with_load_size_says_the_outputs_are_at_that_size(denoise_model, photos, dask_address):
    # every denoised file came out at load.size x load.size and nothing said so (the README: "same size")
    result, out = denoise_model
    root, rels = photos
    cfg = resolve_config(DenoiseRunConfig, options={
        "model_run": result.run_uri, "load.apply_to": str(root / "noisy"), "output": out,
        "dask_address": dask_address, "load.size": 64, "app.baselines": ["tv"]})
    applied = FLOWS["denoise"](config=cfg)
    sizes = {Image.open(os.path.join(applied.run_uri, "denoised", rel)).size for rel in rels}
    assert sizes == {(64, 64)} and {Image.open(root / "noisy" / rel).size for rel in rels} != {(64, 64)}
    assert any(n.startswith("load.size 64: every image was resized to 64x64 before denoising, so denoised/ holds them "
                            "at that size") for n in applied.notes), applied.notes
    plain = FLOWS["denoise"](config=cfg.model_copy(update={"load": cfg.load.model_copy(update={"size": None})}))
    assert not any(n.startswith("load.size") for n in plain.notes), plain.notes


def _bad_reference(root, rels, ref, case: str):
    """A copy of the clean images at ``ref`` with its first image missing or (``resized``) 16 px wider."""
    import shutil

    shutil.copytree(root / "clean", ref)
    if case == "missing":
        (ref / rels[0]).unlink()
    else:
        im = Image.open(ref / rels[0])
        im.resize((im.width + 16, im.height)).save(ref / rels[0])
    return ref


def test_denoise_apply_against_a_reference_that_does_not_match_is_refused(denoise_model, photos, dask_address,
                                                                          tmp_path):
    """The clean reference is read only for the scored images; one missing or of another size is
    named (the check still runs before anything is scored)."""
    result, out = denoise_model
    root, rels = photos
    for case, expect in (("missing", "has no image"), ("resized", "but the noisy image is")):
        ref = _bad_reference(root, rels, tmp_path / case, case)
        cfg = resolve_config(DenoiseRunConfig, options={
            "model_run": result.run_uri, "load.apply_to": str(root / "noisy"), "load.reference": str(ref),
            "output": out, "dask_address": dask_address, "app.baselines": ["tv"]})
        state = FLOWS["denoise"](config=cfg, return_state=True)
        assert state.is_failed(), case
        assert expect in str(state.message) + repr(state.result(raise_on_failure=False)), case


def test_denoise_training_with_a_bad_reference_is_refused_before_training(prefect_server, photos, dask_address,
                                                                         tmp_path):
    """A training run with --apply-to and a --clean-reference that misses an image (or holds one of another
    size) is refused at the door: it trained, applied and then failed at its evaluation, leaving the run's
    folder with a training checkpoint behind (listed as an interrupted run)."""
    root, rels = photos
    for case, expect in (("missing", "has no image"), ("resized", "but the noisy image is")):
        ref = _bad_reference(root, rels, tmp_path / case, case)
        out = tmp_path / f"out-{case}"
        cfg = resolve_config(DenoiseRunConfig, options={
            **FAST_DENOISE, "load.input": str(root / "clean"), "load.apply_to": str(root / "noisy"),
            "load.reference": str(ref), "output": str(out), "dask_address": dask_address})
        state = FLOWS["denoise"](config=cfg, return_state=True)
        assert state.is_failed(), case
        assert expect in str(state.message) + repr(state.result(raise_on_failure=False)), case
        runs = out / "runs" / "denoise"
        assert not runs.exists() or not any(runs.iterdir()), (case, sorted(p.name for p in runs.rglob("*")))


def test_denoise_model_folder_gives_the_same_outputs_as_the_run(denoise_model, photos, dask_address, tmp_path):
    """--model also takes a bare model folder (config.json + weights.safetensors), as the committed
    benchmark models are; a folder of another application's model is refused by name."""
    import shutil

    result, out = denoise_model
    root, rels = photos
    folder = tmp_path / "denoiser"
    shutil.copytree(os.path.join(result.run_uri, "model"), folder)
    runs = {}
    for name, model in (("run", result.run_uri), ("folder", str(folder))):
        cfg = resolve_config(DenoiseRunConfig, options={
            "model_run": model, "load.apply_to": str(root / "noisy"), "output": out, "dask_address": dask_address})
        runs[name] = FLOWS["denoise"](config=cfg).run_uri
    for rel in rels:
        a = np.asarray(Image.open(os.path.join(runs["run"], "denoised", rel)))
        b = np.asarray(Image.open(os.path.join(runs["folder"], "denoised", rel)))
        assert np.array_equal(a, b), rel
    assert open_run(runs["folder"]).manifest().model_run == str(folder)

    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "app": "index"}))
    res = runner.invoke(cli, ["run", "denoise", "--model", str(folder), "--apply-to", str(root / "noisy"),
                              "--output", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0 and f"{folder} holds a model of the 'index' application, not 'denoise'" in res.output, res.output


def test_denoise_on_s3(denoise_model, photos, dask_address, s3fs_client):
    result, _ = denoise_model
    root, rels = photos
    for kind in ("noisy", "clean"):
        for rel in rels:
            s3fs_client.put(str(root / kind / rel), f"{TEST_BUCKET}/photos/{kind}/{rel}")
    cfg = resolve_config(DenoiseRunConfig, options={
        "model_run": result.run_uri, "load.apply_to": f"s3://{TEST_BUCKET}/photos/noisy",
        "load.reference": f"s3://{TEST_BUCKET}/photos/clean", "output": f"s3://{TEST_BUCKET}/aeflow",
        "dask_address": dask_address, "app.baselines": ["tv"]})
    applied = FLOWS["denoise"](config=cfg)
    assert applied.run_uri.startswith(f"s3://{TEST_BUCKET}/aeflow/runs/denoise/")
    key = applied.run_uri[len("s3://"):]
    manifest = json.loads(s3fs_client.cat_file(f"{key}/manifest.json"))
    assert sorted(f["path"] for f in manifest["inputs"]["apply_to"]) == sorted(
        f"s3://{TEST_BUCKET}/photos/noisy/{r}" for r in rels)
    for rel in rels:
        with s3fs_client.open(f"{key}/denoised/{rel}", "rb") as f:
            assert Image.open(f).size == Image.open(root / "noisy" / rel).size
    assert manifest["metrics"]["psnr"] > manifest["metrics"]["psnr_noisy"]


# ---------------------------------------------------------------------------------------
# index


def write_digits(root, per_class: int = 20, classes: int = 4) -> None:
    d = load_digits()
    seen: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        if label >= classes or seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8)).save(root / str(label) / f"{i:04d}.png")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digit-images")
    write_digits(root)
    return root


@pytest.fixture(scope="module")
def index_run(prefect_server, dask_address, digits_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("index-out"))
    cfg = resolve_config(IndexRunConfig, options={**FAST_INDEX, "load.input": str(digits_dir), "output": out,
                                                  "dask_address": dask_address})
    return FLOWS["index"](config=cfg), out


def test_index_outputs_and_metrics(index_run):
    result, _ = index_run
    m = open_run(result.run_uri).manifest()
    paths = {o.path for o in m.outputs}
    assert {"index/index.faiss", "index/ids.parquet", "index/codes/part.00000.npy", "index/codes/part.00001.npy", "index/meta.json",
            "report/contact_sheet.png", "model/weights.safetensors"} <= paths
    ids = pd.read_parquet(os.path.join(result.run_uri, "index/ids.parquet"))
    assert len(ids) == 80 and set(ids["label"]) == {"0", "1", "2", "3"}
    assert m.metrics["recall_at_10"] == 1.0  # exact index below the ANN threshold
    # ... so its QPS and exact search's time the same search: said, not left to read as a speed-up.
    notes = m.extra["notes"]
    assert [n for n in notes if "the index is exact search itself here" in n and "timing noise" in n], notes
    assert 0.25 < m.metrics["precision_at_10"] <= 1.0 and m.metrics["map"] is not None
    assert set(m.baselines) == {"exact", "raw_pixels", "pca_79"}
    assert m.metrics["code_dim"] == 8 * 8 * 8
    # The codes are stored per shard of images (written by the workers), in image order, and are what the index holds.
    from tasks.apps.index import deserialize_index

    meta = json.loads(open(os.path.join(result.run_uri, "index/meta.json")).read())
    assert meta["codes"]["parts"] == [64, 16] and meta["n"] == 80 and meta["dim"] == 512
    codes = np.concatenate([np.load(os.path.join(result.run_uri, f"index/codes/part.{i:05d}.npy")) for i in range(2)])
    index = deserialize_index(open(os.path.join(result.run_uri, "index/index.faiss"), "rb").read(), meta)
    dist, nn = index.search(codes, 1)
    assert codes.shape == (80, 512) and np.allclose(dist[:, 0], 0, atol=1e-6) and np.mean(nn[:, 0] == np.arange(80)) > 0.9


def test_search_returns_the_query_first(index_run, digits_dir, tmp_path):
    result, _ = index_run
    query = sorted((digits_dir / "2").iterdir())[3]
    sheet = tmp_path / "sheet.png"
    res = runner.invoke(cli, ["search", "--index", result.run_uri, "--query", str(query), "--k", "5", "--json",
                              "--sheet", str(sheet)])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert len(payload) == 1 and len(payload[0]["results"]) == 5
    first = payload[0]["results"][0]
    assert first["path"] == str(query) and first["distance"] < 1e-6 and first["label"] == "2"
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # An existing sheet is not replaced unless asked (it was, silently): refused by name before searching.
    sheet.write_bytes(b"earlier sheet")
    args = ["search", "--index", result.run_uri, "--query", str(query), "--k", "5", "--sheet", str(sheet)]
    res = runner.invoke(cli, args)
    assert res.exit_code == 4 and f"cannot write --sheet {sheet}: it already exists" in " ".join(res.output.split()), res.output
    assert "nearest to" not in res.output and sheet.read_bytes() == b"earlier sheet"
    res = runner.invoke(cli, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A folder of queries is one batch: one result list per image, each finds itself.
    res = runner.invoke(cli, ["search", "--index", result.run_uri, "--query", str(digits_dir / "1"), "--k", "3", "--json"])
    payload = json.loads(res.stdout)
    assert len(payload) == 20 and all(p["results"][0]["path"] == p["query"] for p in payload)


def test_query_of_another_mode_and_size_is_converted(index_run, digits_dir, tmp_path):
    result, _ = index_run
    src = np.asarray(Image.open(sorted((digits_dir / "3").iterdir())[0]))
    big_rgb = Image.fromarray(np.stack([src] * 3, axis=-1)).resize((40, 40), Image.Resampling.NEAREST)
    big_rgb.save(tmp_path / "q.png")
    res = runner.invoke(cli, ["search", "--index", result.run_uri, "--query", str(tmp_path / "q.png"), "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)[0]["results"]
    assert len(results) == 10 and results[0]["label"] == "3"


def test_index_image_size_and_mode_unset_are_the_defaults_or_the_reused_model_s():
    from tasks.apps.base import Fitted
    from tasks.apps.index import DEFAULT_IMAGE_SIZE, DEFAULT_MODE, Index

    app, cfg = Index(), IndexRunConfig()
    assert cfg.load.size is None and cfg.load.mode is None
    trained = app.adopt(cfg, None).load
    assert (trained.size, trained.mode) == (DEFAULT_IMAGE_SIZE, DEFAULT_MODE)
    reused = Fitted(model=None, state={"image_size": 24, "mode": "rgb"})
    assert (app.adopt(cfg, reused).load.size, app.adopt(cfg, reused).load.mode) == (24, "rgb")
    given = resolve_config(IndexRunConfig, options={"load.size": 40, "load.mode": "keep"})
    assert app.adopt(given, reused) is given  # what the user gave stays


def test_index_ann_with_reused_model_and_skip_bad(index_run, digits_dir, dask_address, tmp_path):
    result, out = index_run
    coll = tmp_path / "coll"
    for p in sorted(digits_dir.rglob("*.png")):
        (coll / p.parent.name).mkdir(parents=True, exist_ok=True)
        (coll / p.parent.name / p.name).write_bytes(p.read_bytes())
    (coll / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (coll / "notes.txt").write_text("not an image")
    # no --image-size: the reused model's 16 px, not index's default 32 (Index.adopt)
    unsized = {k: v for k, v in FAST_INDEX.items() if k != "load.size"}
    cfg = resolve_config(IndexRunConfig, options={
        **unsized, "model_run": result.run_uri, "load.apply_to": str(coll), "load.skip_bad": True,
        "app.index": "hnsw", "output": out, "dask_address": dask_address})
    ann = FLOWS["index"](config=cfg)
    m = open_run(ann.run_uri).manifest()
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in m.extra["skipped"]) == ["broken.png", "notes.txt"]
    assert m.extra["images"] == {"apply_to": 80}
    meta = json.loads(open(os.path.join(ann.run_uri, "index/meta.json")).read())
    assert meta["kind"] == "hnsw" and meta["image"]["size"] == 16, meta
    assert cfg.load.size is None and m.config["load"]["size"] == 16
    assert m.metrics["recall_at_10"] >= 0.9
    # The index has no model of its own: search loads the model run it was built with.
    q = sorted((coll / "1").iterdir())[0]
    res = runner.invoke(cli, ["search", "--index", ann.run_uri, "--query", str(q), "--k", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["results"][0]["path"] == str(q)
    assert ann.notes and not any("resized to" in n for n in ann.notes), ann.notes
    assert not any("timing noise" in n for n in ann.notes), "an HNSW index's QPS is a real comparison"
    # applied at another size than the model learnt on (index's default 32 against its 16): said
    other = FLOWS["index"](config=cfg.model_copy(update={"load": cfg.load.model_copy(update={"size": 32, "skip_bad": True}),
                                                          "app": cfg.app.model_copy(update={"index": "exact"})}))
    assert any("the model was trained on 16x16: leave --image-size unset (or pass 16)" in n for n in other.notes), \
        other.notes


def test_committed_benchmark_denoiser_beats_nl_means_on_a_held_out_crop():
    """benchmarks/weights/denoise (what `make demo` applies): loads as a model folder and
    denoises a crop of a held-out photograph better than NL-means with the true sigma."""
    import skimage.data
    import torch
    from skimage.restoration import denoise_nl_means

    from models.metrics import psnr
    from tasks.apps.denoise import Denoise, denoise_array

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "denoise")
    fitted = Denoise().load(str(folder), torch.device("cpu"))
    clean = skimage.data.camera()[100:228, 180:308].astype(np.float32) / 255  # never trained on
    noisy = (clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape)).astype(np.float32)
    ours = denoise_array(fitted, noisy[None], torch.device("cpu"), 384, 32)[0]
    nlm = denoise_nl_means(noisy, h=0.8 * 25 / 255, sigma=25 / 255, fast_mode=True, patch_size=5, patch_distance=6)
    p_noisy, p_ours, p_nlm = (psnr(clean, x.clip(0, 1).astype(np.float32)) for x in (noisy, ours, nlm))  # [0, 1] floats
    assert p_ours > p_noisy + 6 and p_ours > p_nlm, (p_noisy, p_ours, p_nlm)
    assert 18 < p_noisy < 23, p_noisy  # sigma 25 on the 0..255 scale


def test_index_metrics_are_named_after_k_whatever_the_collection_size(prefect_server, dask_address, tmp_path):
    """Over 7 images the run reported recall_at_6 and precision_at_6 (k = min(app.k, n - 1)): runs over collections
    of different sizes did not compare, and the headlines (precision_at_10, recall_at_10) found nothing to show.
    The names are app.k's; the k they were measured at is in the notes."""
    from flows.cli.runs import headline

    for i in range(7):
        label = i % 2
        img = synthetic(i, 24, 24) if label else 255 - synthetic(i, 24, 24)
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / str(label) / f"{i}.png")
    cfg = resolve_config(IndexRunConfig, options={**FAST_INDEX, "train.epochs": 1, "load.input": str(tmp_path / "imgs"),
                                                  "output": str(tmp_path / "out"), "dask_address": dask_address})
    result = FLOWS["index"](config=cfg)
    m = open_run(result.run_uri).manifest()
    assert {"recall_at_10", "precision_at_10"} <= set(m.metrics), m.metrics
    assert not [k for k in m.metrics if k.startswith(("recall_at_6", "precision_at_6"))], m.metrics
    assert m.baselines["raw_pixels"]["precision_at_10"] is not None
    assert ("recall_at_10 and precision_at_10 are measured at k=6: the collection has 7 images, so each query has 6 "
            "others to find (app.k=10)") in m.extra["notes"], m.extra["notes"]
    with open(os.path.join(result.run_uri, "report", "summary.md")) as f:
        summary = f.read()
    assert "- precision_at_10 (higher is better): aeflow" in summary, summary
    assert headline("index", m.metrics)[0] == "precision_at_10"


def test_index_headlines_follow_app_k():
    """With --set app.k=5 the metrics are precision_at_5 and recall_at_5: the headlines (fixed at _10) found
    neither, so summary.md had no verdicts and `runs list` showed another metric."""
    from flows.cli.runs import headline
    from flows.demo import headline_rows
    from tasks.report import markdown_summary

    metrics = {"map": 0.6, "precision_at_5": 0.8, "recall_at_5": 1.0, "qps": 900.0}
    baselines = {"raw_pixels": {"precision_at_5": 0.7}, "pca": {"precision_at_5": 0.75}}
    summary = markdown_summary("index", "file:///r", metrics, baselines, {}, [], {})
    assert "- precision_at_5 (higher is better): aeflow 0.8 vs best baseline pca 0.75: aeflow wins" in summary, summary
    assert headline("index", metrics) == ("precision_at_5", 0.8)
    assert [r[0] for r in headline_rows("index", metrics, baselines)] == ["precision_at_5 (↑)", "recall_at_5 (↑)"]


def test_denoise_apply_says_how_far_it_is_within_one_large_image(monkeypatch, tmp_path):
    """Denoising one 6 MP photograph was ~47 s without a line: the tiles of an image are progress now, in the
    run's log, of the same kind as a table's apply (at most every STEP_LOG_EVERY_S; 0 here: every tile report)."""
    import re

    import dask
    import fsspec

    from tasks.apps import get_app
    from tasks.apps.base import Fitted
    from tasks.apps.denoise import Config
    from tasks.apps.images_base import ConvModelConfig
    from tasks.apps.kinds import ImageContext
    from tasks.images import ImageLoadConfig, inspect_images, load_images
    from tasks.storage import RunDir

    lines: list[str] = []
    monkeypatch.setattr("tasks.train.run_logger", lambda: type("Log", (), {"info": lambda _s, f, *a: lines.append(f % a)})())
    monkeypatch.setattr("tasks.train.STEP_LOG_EVERY_S", 0.0)
    monkeypatch.setattr("tasks.dask_client.PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr("tasks.dask_client.current_client", lambda: None)  # items run here (the cluster: test_dask_client)
    (tmp_path / "noisy").mkdir()
    Image.fromarray(synthetic(0, 96, 128)).save(tmp_path / "noisy" / "photo.png")
    run = RunDir(fs=fsspec.filesystem("file"), path=str(tmp_path / "run"), app="denoise", run_id="r")
    with dask.config.set(scheduler="synchronous"):
        target = load_images(inspect_images(str(tmp_path / "noisy"), "apply-to"), ImageLoadConfig(), run=run,
                             prefix="images/apply_to")
    app = get_app("denoise")
    cfg = DenoiseRunConfig(app=Config(tile=32, overlap=8), model=ConvModelConfig(channels=(4, 8), latent_channels=4))
    ctx = ImageContext(config=cfg, run=run, target=target)
    app.apply(ctx, Fitted(model=cfg.model.build(in_channels=1).eval()))
    assert (tmp_path / "run" / "denoised" / "photo.png").exists()
    tiles = [line for line in lines if "denoised tile" in line]
    assert len(tiles) == 20, lines  # 4 x 5 tiles of 32 px overlapping by 8 over 96 x 128 px, each said
    assert re.fullmatch(r"denoise apply: 0/1 images, 0\.0 of 0\.0 MP, [\d.]+ MP/s, about \d+ s left "
                        r"\(denoised tile 1/20 of photo\.png\)", tiles[0]), tiles
    assert tiles[-1].endswith("(denoised tile 20/20 of photo.png)"), tiles


def test_a_few_training_images_always_hold_one_out_when_val_fraction_is_set():
    """Five images at val_fraction 0.2 each hash above 0.2 a third of the time: none was held out, and
    denoise's "held-out" PSNR was on training images (said only in a note). One is held out now, the
    same one each time; val_fraction=0 still holds none out, and a large set keeps its hashed split."""
    from types import SimpleNamespace

    from tasks.apps.denoise import DenoiseRunConfig
    from tasks.apps.kinds import ImageContext
    from tasks.config import PreprocessConfig

    def split(rels, fraction, seed=0):
        cfg = DenoiseRunConfig(preprocess=PreprocessConfig(val_fraction=fraction, split_seed=seed))
        return ImageContext(config=cfg, run=None, train=SimpleNamespace(rel=rels)).split()

    for seed in range(30):  # about 10 of these 30 sets hash every image above 0.2
        rels = [f"img{seed}_{i}.png" for i in range(5)]
        tr, va = split(rels, 0.2)
        assert len(va) >= 1 and len(tr) >= 1 and sorted([*tr, *va]) == list(range(5)), (seed, tr, va)
        assert np.array_equal(va, np.sort(4 - split(rels[::-1], 0.2)[1]))  # by path, not by position
    assert len(split([f"a{i}.png" for i in range(5)], 0.0)[1]) == 0
    tr, va = split([f"a{i}.png" for i in range(2000)], 0.2)
    assert 300 < len(va) < 500 and len(tr) + len(va) == 2000
