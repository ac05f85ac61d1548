"""The compress flow end to end on tiny images (real Prefect server, local and S3 storage),
and ``aeflow compress``/``decompress`` on its codec, including files that must be rejected."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import FLOWS
from models.aec import AecFile, parse
from tasks.apps.compress import CompressRunConfig, sweep_sample
from tasks.codec import decode_aec, load_codec_run
from tasks.config import resolve_config
from tasks.storage import open_run
from tests.conftest import TEST_BUCKET
from tests.refusals import assert_raised, refusal

pytestmark = [pytest.mark.flows]
runner = CliRunner()
# A tiny, barely trained codec: these tests check the plumbing and the bitstreams, not quality.
TINY = {"app.channels": 8, "app.latent_channels": 8, "app.patches": 16, "app.patch_size": 32,
        "app.jpeg_qualities": [20, 50, 80, 95], "app.webp_qualities": [20, 50, 80, 95],
        "train.epochs": 1, "train.batch_size": 8}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()[60:100, 200:260]).save(buf, format="JPEG", quality=95)
    return {
        "astro.png": _png(skimage.data.astronaut()[100:148, 120:184]),   # RGB, 64x48
        "gray/cam.png": _png(skimage.data.camera()[200:237, 100:150]),    # L, 50x37 (not a multiple of 16)
        "gray/coffee.jpg": buf.getvalue(),                                  # JPEG input
    }


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for rel, data in _images().items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def trained(prefect_server, dask_address, image_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compress-out"))
    cfg = resolve_config(CompressRunConfig, options={**TINY, "load.input": str(image_dir), "output": out,
                                                     "dask_address": dask_address})
    state = FLOWS["compress"](config=cfg, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), out


def test_outputs_mirror_inputs_and_decode_identically(trained, image_dir):
    result, _ = trained
    run = result.run_uri
    codec = load_codec_run(run)
    for rel in _images():
        src = Image.open(image_dir / rel)
        data = open(os.path.join(run, "codes", rel + ".aec"), "rb").read()
        header = parse(data)
        assert (header.width, header.height, header.mode) == (src.width, src.height, "L" if src.mode == "L" else "RGB")
        assert header.model_id == codec.identity
        decoded = Image.open(os.path.join(run, "decoded", rel.rsplit(".", 1)[0] + ".png"))
        assert decoded.size == src.size and decoded.mode == header.mode
        again, _ = decode_aec(codec, data, rel)
        assert np.array_equal(again, np.asarray(decoded)), "decoding is deterministic"


def test_metrics_from_file_sizes_and_baselines(trained, image_dir):
    result, _ = trained
    per = pd.read_parquet(result.outputs["per_image"])
    assert sorted(per["image"]) == sorted(_images())
    for row in per.itertuples():
        size = os.path.getsize(os.path.join(result.run_uri, "codes", row.image + ".aec"))
        assert row.bytes == size and row.bpp == pytest.approx(8 * size / (row.width * row.height))
        assert row.encode_s > 0 and row.decode_s > 0 and 0 < row.ms_ssim <= 1
    rd = pd.read_parquet(result.outputs["rd"])
    assert set(rd["codec"]) == {"aeflow", "jpeg", "webp"}
    levels = len(CompressRunConfig().app.lambdas)
    assert levels >= 4, "at least four rate points"
    assert len(rd[rd.codec == "jpeg"]) == 4 * 3 and len(rd[rd.codec == "aeflow"]) == levels * 3
    m = open_run(result.run_uri).manifest()
    assert {"bpp", "psnr", "ms_ssim", "encode_mpx_s", "decode_mpx_s", "bd_rate_vs_jpeg_pct", "bd_rate_vs_webp_pct",
            "payload_vs_estimate_pct"} <= set(m.metrics)
    assert m.metrics["bpp"] == pytest.approx(8 * per["bytes"].sum() / (per.width * per.height).sum())
    assert set(m.baselines) == {"jpeg", "webp"}
    paths = {o.path for o in m.outputs}
    assert {"model/config.json", "model/weights.safetensors", "report/rd.png", "report/summary.md"} <= paths
    with open(os.path.join(result.run_uri, "report/rd.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(result.run_uri, "model/config.json")))["codec_id"] == load_codec_run(
        result.run_uri).identity_hex


def test_model_reuse_on_s3(trained, image_dir, s3fs_client, dask_address):
    """--model reuse with input and output on the moto S3 server: identical codes, read back from S3."""
    result, _ = trained
    prefix = f"{TEST_BUCKET}/compress"
    for rel, data in _images().items():
        s3fs_client.pipe_file(f"{prefix}/in/{rel}", data)
    cfg = resolve_config(CompressRunConfig, options={
        **TINY, "model_run": result.run_uri, "load.apply_to": f"s3://{prefix}/in", "output": f"s3://{prefix}/out",
        "app.rd_sweep": False, "dask_address": dask_address})
    r2 = FLOWS["compress"](config=cfg)
    assert r2.run_uri.startswith(f"s3://{prefix}/out/runs/compress/")
    for rel in _images():
        remote = s3fs_client.cat_file(f"{r2.run_uri[5:]}/codes/{rel}.aec")
        local = open(os.path.join(result.run_uri, "codes", rel + ".aec"), "rb").read()
        assert remote == local, "same model, same image: same bytes"
    reloaded = load_codec_run(r2.run_uri)
    assert reloaded.identity == load_codec_run(result.run_uri).identity
    m = open_run(r2.run_uri).manifest()
    assert m.model_run == result.run_uri and "rd" not in {o.path for o in m.outputs}


def test_sweep_sample_spreads_over_the_images():
    assert sweep_sample(10, 4) == [0, 3, 6, 9]
    assert sweep_sample(100, 16)[:2] == [0, 7] and sweep_sample(100, 16)[-1] == 99 and len(sweep_sample(100, 16)) == 16
    assert sweep_sample(5, 1) == [0] and sweep_sample(5, 0) == sweep_sample(5, 9) == [0, 1, 2, 3, 4]


def test_rd_sweep_is_an_even_sample_coded_on_the_cluster(trained, image_dir, dask_address, tmp_path):
    """On a large input the sweep (every level of every image) would dwarf the run: app.rd_images
    samples the images evenly, first and last included, and their points are those of a full sweep."""
    result, _ = trained
    cfg = resolve_config(CompressRunConfig, options={
        **TINY, "model_run": result.run_uri, "load.apply_to": str(image_dir), "output": str(tmp_path),
        "app.rd_images": 2, "dask_address": dask_address})
    r2 = FLOWS["compress"](config=cfg)
    order = list(pd.read_parquet(r2.outputs["per_image"])["image"])
    assert len(order) == 3, "every image is still coded at the chosen quality"
    rd = pd.read_parquet(r2.outputs["rd"])
    assert sorted(set(rd["image"])) == sorted({order[0], order[-1]})
    assert open_run(r2.run_uri).manifest().metrics["rd_images"] == 2
    with open(os.path.join(r2.run_uri, "report/summary.md")) as f:
        assert "an even sample of 2 of the 3 images" in f.read(), "the run's notes say it sampled"
    # and on what the metrics were measured: here images coded by a codec trained in another run
    assert f"metrics on the 3 coded images; the codec of {result.run_uri}, not trained in this run." in \
        open_run(r2.run_uri).manifest().extra["notes"]
    assert ("metrics on the 3 coded images; the codec was trained in this run on crops of these images (a codec is "
            "fitted to what it codes).") in open_run(result.run_uri).manifest().extra["notes"]
    full = pd.read_parquet(result.outputs["rd"])
    key = ["codec", "setting", "image"]
    both = rd.merge(full, on=key, suffixes=("", "_full"))
    assert len(both) == len(rd), "the sample's points are points of the full sweep"
    assert np.allclose(both["bpp"], both["bpp_full"]) and np.allclose(both["psnr"], both["psnr_full"])
    assert open_run(result.run_uri).manifest().metrics["rd_images"] == 3, "3 images: all of them (default 16)"


def test_rd_sweep_says_what_it_does_before_it_starts(trained, image_dir, dask_address, tmp_path):
    """The sweep is the longest stage on large images (minutes for one 6 MP photograph, with no line
    in the log until it ended): a line says what it codes and how to shorten or skip it."""
    import logging

    class Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    result, _ = trained
    cfg = resolve_config(CompressRunConfig, options={
        **TINY, "model_run": result.run_uri, "load.apply_to": str(image_dir), "output": str(tmp_path),
        "app.rd_images": 2, "dask_address": dask_address})
    handler, loggers = Lines(), [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs", "aeflow")]
    levels_before = [lg.level for lg in loggers]
    for lg in loggers:  # the tests log at WARNING (conftest): this line is INFO
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        FLOWS["compress"](config=cfg)
    finally:
        for lg, level in zip(loggers, levels_before, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    levels = load_codec_run(result.run_uri).model.config.levels
    said = [ln for ln in handler.lines if ln.startswith("rate-distortion sweep: 2 images (")]
    assert said, handler.lines
    assert (f"at each of the codec's {levels} quality levels and 4 JPEG + 4 WebP qualities (--rd-images N sweeps "
            "fewer images; --set app.rd_sweep=false skips it)") in said[0], said


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_round_trip_and_quality(trained, image_dir, tmp_path):
    result, out = trained
    src = str(image_dir / "astro.png")
    sizes = []
    top = len(CompressRunConfig().app.lambdas) - 1
    for q in (0, top):
        res = runner.invoke(app, ["compress", src, "--model", result.run_uri, "--quality", str(q),
                                  "-o", str(tmp_path / f"q{q}"), "--json"])
        assert res.exit_code == 0, res.output
        sizes.append(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])
    res = runner.invoke(app, ["decompress", str(tmp_path / f"q{top}" / "astro.aec"), "-o", str(tmp_path / "dec"),
                              "--root", out])
    assert res.exit_code == 0, res.output
    img = Image.open(tmp_path / "dec" / "astro.png")
    assert img.size == (64, 48) and img.mode == "RGB"
    res = runner.invoke(app, ["compress", src, "--model", result.run_uri, "--quality", str(top + 1), "-o", str(tmp_path)])
    assert res.exit_code == 2 and f"--quality must be in 0..{top}" in res.output


def _bad_files(good: bytes) -> dict[str, tuple[bytes, int, str]]:
    f = parse(good)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    return {
        "truncated.aec": (good[: len(good) - 7], 3, "truncated"),
        "corrupted.aec": (bytes(flipped), 3, "corrupted: checksum mismatch"),
        "magic.aec": (b"\x89PNG" + good[4:], 3, "not an .aec file (wrong magic bytes)"),
        "version.aec": (good[:4] + b"\x07" + good[5:], 3, "unsupported .aec format version 7"),
        "empty.aec": (b"", 3, "not an .aec file"),
        "foreign.aec": (AecFile(model_id=b"\x00" * 8, quality=f.quality, mode=f.mode, width=f.width,
                                height=f.height, payload=f.payload).to_bytes(), 5, "made by codec 0000000000000000"),
    }


@pytest.mark.parametrize("case", ["truncated.aec", "corrupted.aec", "magic.aec", "version.aec", "empty.aec", "foreign.aec"])
def test_cli_rejects_bad_files(trained, tmp_path, case):
    result, _ = trained
    good = open(os.path.join(result.run_uri, "codes", "astro.png.aec"), "rb").read()
    data, code, message = _bad_files(good)[case]
    path = tmp_path / case
    path.write_bytes(data)
    res = runner.invoke(app, ["decompress", str(path), "--model", result.run_uri, "-o", str(tmp_path / "out")])
    assert res.exit_code == code, res.output
    assert f"{path}" in res.output and message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out" / (case[:-4] + ".png")).exists(), "nothing written for a bad file"


def test_cli_decompress_without_known_model(trained, tmp_path):
    result, _ = trained
    (tmp_path / "empty-root").mkdir()
    res = runner.invoke(app, ["decompress", os.path.join(result.run_uri, "codes", "astro.png.aec"),
                              "--root", str(tmp_path / "empty-root"), "-o", str(tmp_path)])
    assert res.exit_code == 5 and "pass --model with the run or the model folder" in res.output
    # a root that does not exist is said as such (it said "no compress run under nonexistent_root holds ...",
    # exit 5), with the exit code of `aeflow runs list` for it: 4 (storage)
    res = runner.invoke(app, ["decompress", os.path.join(result.run_uri, "codes", "astro.png.aec"),
                              "--root", str(tmp_path / "nonexistent_root"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 4, res.output
    assert f"no artifact root at {tmp_path / 'nonexistent_root'} (nothing has run there)" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_bad_images_fail_before_any_work(prefect_server, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "ok.png").write_bytes(_png(skimage.data.camera()[:40, :40]))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = runner.invoke(app, ["run", "compress", "--input", str(d), "--output", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 3, res.output
    assert f"{d}/broken.png: cannot decode image" in res.output and "--skip-bad" in res.output
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").rglob("manifest.json"))
    empty = tmp_path / "none"
    empty.mkdir()
    res = runner.invoke(app, ["run", "compress", "--input", str(empty), "--output", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 3 and f"no PNG/JPEG images found in input {empty}" in res.output


def test_cli_with_the_committed_benchmark_codec(tmp_path):
    """--model also takes a model folder: the codec trained on bundled photographs."""
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "codec")
    src = tmp_path / "cat.png"
    src.write_bytes(_png(skimage.data.chelsea()[:96, :120]))
    res = runner.invoke(app, ["compress", str(src), "--model", folder, "--quality", "2", "-o", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["decompress", str(tmp_path / "c" / "cat.aec"), "--model", folder, "-o", str(tmp_path / "d"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"input": str(tmp_path / "c" / "cat.aec"), "output": str(tmp_path / "d" / "cat.png"),
                                      "width": 120, "height": 96, "mode": "RGB"}, res.stdout
    res = runner.invoke(app, ["decompress", str(tmp_path / "c" / "cat.aec"), "--model", folder, "-o", str(tmp_path / "d"),
                              "--json"])  # a refusal is a JSON object too
    assert res.exit_code == 4 and json.loads(res.stdout)["exit_code"] == 4 and "already exists" in \
        json.loads(res.stdout)["error"], res.stdout
    dec = np.asarray(Image.open(tmp_path / "d" / "cat.png"))
    assert dec.shape == (96, 120, 3)
    from models.metrics import psnr

    assert psnr(skimage.data.chelsea()[:96, :120], dec) > 22
    # --refine-steps: another encoding of the same image, decoded by the same decoder.
    res = runner.invoke(app, ["compress", str(src), "--model", folder, "--quality", "2", "--refine-steps", "10",
                              "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "cat.aec").read_bytes() != (tmp_path / "c" / "cat.aec").read_bytes()
    res = runner.invoke(app, ["decompress", str(tmp_path / "r" / "cat.aec"), "--model", folder, "-o", str(tmp_path / "rd")])
    assert res.exit_code == 0, res.output
    assert psnr(skimage.data.chelsea()[:96, :120], np.asarray(Image.open(tmp_path / "rd" / "cat.png"))) > 22
    res = runner.invoke(app, ["compress", str(src), "--model", folder, "--refine-steps", "-1", "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--refine-steps" in res.output


def test_transparent_images_are_refused_or_skipped(prefect_server, dask_address, tmp_path):
    """The shared loader refuses alpha for the codec (no alpha plane); --skip-bad leaves such files out."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "ok.png").write_bytes(_png(skimage.data.astronaut()[:48, :64]))
    rgba = np.dstack([skimage.data.astronaut()[:32, :32], np.full((32, 32), 128, np.uint8)])
    (d / "glass.png").write_bytes(_png(rgba))
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "compress", "--input", str(d), "--output", str(out), "--quiet"])
    assert res.exit_code == 3, res.output
    assert f"{d}/glass.png: image has an alpha channel (mode RGBA)" in res.output
    assert not any(out.rglob("manifest.json")), "a failed run leaves no manifest"

    cfg = resolve_config(CompressRunConfig, options={**TINY, "load.input": str(d), "output": str(out),
                                                     "load.skip_bad": True, "app.rd_sweep": False,
                                                     "dask_address": dask_address})
    result = FLOWS["compress"](config=cfg)
    m = open_run(result.run_uri).manifest()
    assert [s["path"].rsplit("/", 1)[-1] for s in m.extra["skipped"]] == ["glass.png"]
    assert "alpha" in m.extra["skipped"][0]["reason"]
    assert sorted(pd.read_parquet(result.outputs["per_image"])["image"]) == ["ok.png"]
    assert os.path.exists(os.path.join(result.run_uri, "codes", "ok.png.aec"))
    assert not os.path.exists(os.path.join(result.run_uri, "codes", "glass.png.aec"))
    res = runner.invoke(app, ["compress", str(d / "glass.png"), "--model", result.run_uri, "-o", str(tmp_path / "c")])
    assert res.exit_code == 3 and f"{d}/glass.png: image has an alpha channel" in res.output, res.output
    assert not (tmp_path / "c" / "glass.aec").exists()


def test_refined_encoding_in_the_batch_job(prefect_server, dask_address, tmp_path):
    """app.refine_steps (--refine-steps): the job's codes cost less R + λ·D than the fast encoder's,
    with the committed codec on held-out crops, and the run records the setting."""
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "codec")
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "cat.png").write_bytes(_png(skimage.data.chelsea()[60:156, 140:252]))
    (d / "cam.png").write_bytes(_png(skimage.data.camera()[100:196, 200:296]))
    costs = {}
    lam = load_codec_run(folder).model.config.lambdas[3]
    for steps in (0, 30):
        cfg = resolve_config(CompressRunConfig, options={
            "model_run": folder, "load.apply_to": str(d), "output": str(tmp_path / f"out{steps}"),
            "app.rd_sweep": False, "app.quality": 3, "app.refine_steps": steps,
            "dask_address": dask_address})
        r = FLOWS["compress"](config=cfg)
        m = open_run(r.run_uri).manifest()
        assert m.metrics["refine_steps"] == steps
        per = pd.read_parquet(r.outputs["per_image"])
        mse = 10 ** (-per["psnr"] / 10)  # MSE on [0, 1] pixels, from PSNR
        costs[steps] = float((per["bpp"] + lam * 255**2 * mse).sum())
    assert costs[30] < 0.97 * costs[0], costs


def test_hyperprior_codec_through_the_batch_job_and_the_cli(prefect_server, dask_address, image_dir, tmp_path):
    """app.codec=hyperprior: the job trains a mean-scale hyperprior, writes version-2 .aec files that
    decode to its decoded/ PNGs, and `aeflow decompress` finds the model by identity under --root (default
    $AEFLOW_OUTPUT)."""
    out = tmp_path / "out"
    cfg = resolve_config(CompressRunConfig, options={**TINY, "app.codec": "hyperprior", "load.input": str(image_dir),
                                                     "output": str(out), "app.rd_sweep": False,
                                                     "dask_address": dask_address})
    result = FLOWS["compress"](config=cfg)
    codec = load_codec_run(result.run_uri)
    assert codec.model.kind == "hyperprior"
    assert json.load(open(os.path.join(result.run_uri, "model/config.json")))["kind"] == "hyperprior"
    m = open_run(result.run_uri).manifest()
    assert {"bpp", "psnr", "payload_vs_estimate_pct"} <= set(m.metrics)
    data = open(os.path.join(result.run_uri, "codes", "astro.png.aec"), "rb").read()
    header = parse(data)
    assert header.kind == "hyperprior" and header.version == 2 and header.model_id == codec.identity
    res = runner.invoke(app, ["decompress", os.path.join(result.run_uri, "codes", "astro.png.aec"), "--root", str(out),
                              "-o", str(tmp_path / "dec")])
    assert res.exit_code == 0, res.output
    dec = np.asarray(Image.open(tmp_path / "dec" / "astro.png"))
    assert np.array_equal(dec, np.asarray(Image.open(os.path.join(result.run_uri, "decoded", "astro.png"))))
    # without --root: $AEFLOW_OUTPUT, where `aeflow run` wrote the run (decompress searched ./artifacts)
    res = runner.invoke(app, ["decompress", os.path.join(result.run_uri, "codes", "astro.png.aec"),
                              "-o", str(tmp_path / "dec2")], env={"AEFLOW_OUTPUT": str(out)})
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec2" / "astro.png")), dec)
    res = runner.invoke(app, ["compress", str(image_dir / "astro.png"), "--model", result.run_uri, "--refine-steps", "5",
                              "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "latent refinement is implemented for the factorized codec only" in res.output


@refusal("aeflow run compress --quality beyond the levels of the codec it trains (before training)", 2, "configuration")
def test_quality_beyond_the_levels_of_the_codec_to_train_is_refused_before_training():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=r"the codec to train has 7 quality levels, so --quality must be in 0\.\.6") as e:
        resolve_config(CompressRunConfig, options={"app.quality": 7})
    assert_raised(e.value, test_quality_beyond_the_levels_of_the_codec_to_train_is_refused_before_training)
    assert resolve_config(CompressRunConfig, options={"app.quality": 6}).app.quality == 6
    # with a model to reuse, the model's levels decide (checked when it is loaded)
    assert resolve_config(CompressRunConfig, options={"app.quality": 9, "model_run": "m"}).app.quality == 9


BENCHMARK_CODEC = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "codec")


def test_a_1x1_image_is_coded_and_its_bd_rate_is_none_with_a_note(prefect_server, dask_address, tmp_path):
    """A 1x1 image (any size works): JPEG and WebP reproduce its pixel exactly at most qualities, so the sweep's
    curves held infinite PSNRs and the BD-rate's polyfit crashed the run (LinAlgError: SVD did not converge)."""
    d = tmp_path / "one1"
    d.mkdir()
    (d / "dot.png").write_bytes(_png(np.zeros((1, 1, 3), np.uint8)))  # a black pixel: both BD-rates crashed
    cfg = resolve_config(CompressRunConfig, options={"model_run": BENCHMARK_CODEC, "load.apply_to": str(d),
                                                     "output": str(tmp_path / "out"), "dask_address": dask_address})
    state = FLOWS["compress"](config=cfg, return_state=True)
    assert state.is_completed(), state.message
    m = open_run(state.result().run_uri).manifest()
    rd = pd.read_parquet(state.result().outputs["rd"])
    assert rd["psnr"].max() == 100.0, "lossless baseline points score the cap"
    assert m.metrics["bd_rate_vs_jpeg_pct"] is None and m.metrics["bd_rate_vs_webp_pct"] is None
    assert any(n.startswith("bd_rate_vs_webp_pct None: ") for n in m.extra["notes"]), m.extra["notes"]
    assert any(n.startswith("metrics on the 1 coded image; ") for n in m.extra["notes"]), m.extra["notes"]


def test_a_flat_image_does_not_void_the_comparison_with_the_baselines(prefect_server, dask_address, tmp_path):
    """A flat grey and a white image next to a photograph: JPEG/WebP code the flat ones without loss; their PSNR
    was infinite, so the baselines' means were too (null in JSON) and no verdict was drawn. Capped at 100 dB for
    every codec, the means are finite and compared."""
    d = tmp_path / "flat"
    d.mkdir()
    (d / "grey.png").write_bytes(_png(np.full((64, 64), 128, np.uint8)))
    (d / "white.png").write_bytes(_png(np.full((64, 64), 255, np.uint8)))
    (d / "photo.png").write_bytes(_png(skimage.data.astronaut()[100:164, 100:164]))
    cfg = resolve_config(CompressRunConfig, options={"model_run": BENCHMARK_CODEC, "load.apply_to": str(d),
                                                     "output": str(tmp_path / "out"), "dask_address": dask_address})
    result = FLOWS["compress"](config=cfg)
    m = open_run(result.run_uri).manifest()
    rd = pd.read_parquet(result.outputs["rd"])
    assert np.isfinite(rd["psnr"]).all() and rd["psnr"].max() == 100.0
    assert np.isfinite(m.metrics["psnr"])
    compared = [b["psnr"] for b in m.baselines.values() if b["psnr"] is not None]
    assert compared and all(np.isfinite(compared)), m.baselines
    with open(os.path.join(result.run_uri, "report/summary.md")) as f:
        md = f.read()
    assert "- psnr (higher is better): aeflow " in md and "No headline metric could be compared" not in md, md
    assert "at most 100 dB per image (an image coded without loss scores 100, for aeflow and the baselines alike)" in md


def test_with_a_sampled_sweep_the_verdict_compares_the_same_images(prefect_server, dask_address, tmp_path):
    """--rd-images below the image count: JPEG/WebP are measured on the swept images only, and the verdict
    compared aeflow's mean over all images with them. Now aeflow's side is its sweep point at --quality on the same
    images, the baselines are interpolated at that point's rate, and the line says which images."""
    d = tmp_path / "three"
    d.mkdir()
    for k, (y, x) in enumerate([(0, 0), (100, 120), (200, 250)]):
        (d / f"p{k}.png").write_bytes(_png(skimage.data.astronaut()[y:y + 48, x:x + 64]))
    cfg = resolve_config(CompressRunConfig, options={"model_run": BENCHMARK_CODEC, "load.apply_to": str(d),
                                                     "output": str(tmp_path / "out"), "app.rd_images": 2,
                                                     "dask_address": dask_address})
    result = FLOWS["compress"](config=cfg)
    m = open_run(result.run_uri).manifest()
    rd = pd.read_parquet(result.outputs["rd"])
    ours = rd[(rd.codec == "aeflow") & (rd.setting == m.metrics["quality"])]
    assert ours["image"].nunique() == 2
    psnr_swept, bpp_swept = float(ours.psnr.mean()), float(ours.bpp.mean())
    assert abs(psnr_swept - m.metrics["psnr"]) > 1e-3, "the sample's mean differs from the mean over all images"
    for fmt, b in m.baselines.items():
        if b["bpp"] is not None:
            assert b["bpp"] == pytest.approx(bpp_swept), f"{fmt} at aeflow's rate on the same images"
    with open(os.path.join(result.run_uri, "report/summary.md")) as f:
        md = f.read()
    assert (f"- psnr (higher is better): aeflow {psnr_swept:.4g} on the 2 swept images, the baselines' "
            f"({m.metrics['psnr']:.4g} over all 3) vs best baseline ") in md, md
