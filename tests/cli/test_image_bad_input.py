"""Bad image input through the CLI: one clear message naming the file, a non-zero exit,
no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.storage import open_run
from tests.conftest import files_under
from tests.refusals import assert_refused, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()
FAST_CODEC = ["--epochs", "1", "--patches", "8", "--channels", "8", "--latent-channels", "8", "--set", "app.rd_sweep=false"]
TINY = ["--epochs", "1", "--patches", "32", "--patch-size", "16", "--set", "model.channels=[8,16]",
        "--set", "model.latent_channels=4", "--set", "app.baselines=[tv]", "--set", "app.side_by_side=0"]


def _png(path, size=(40, 48), seed=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@refusal("an image that does not decode (e.g. truncated)", 3, "images")
def case_corrupt_png(d):
    _png(d / "imgs" / "a.png")
    good = _png(d / "b.png").read_bytes()
    (d / "imgs" / "b.png").write_bytes(good[: len(good) // 2])  # truncated in the middle of the pixel data
    return str(d / "imgs"), "{d}/imgs/b.png: cannot decode image"


@refusal("a PNG signature followed by garbage", 3, "images")
def case_png_header_then_garbage(d):
    _png(d / "imgs" / "a.png")
    (d / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return str(d / "imgs"), "{d}/imgs/b.png: a damaged PNG file (its PNG signature, then data that does not decode)"


@refusal("a non-image file in an image folder (unless --skip-bad)", 3, "images")
def case_non_image_file_in_folder(d):
    _png(d / "imgs" / "a.png")
    (d / "imgs" / "notes.txt").write_text("hello")
    return str(d / "imgs"), "{d}/imgs/notes.txt: not an image file"


@refusal("a file that is not an image", 3, "images")
def case_non_image_file(d):
    (d / "notes.txt").write_text("hello")
    return str(d / "notes.txt"), "{d}/notes.txt: not an image file; aeflow reads PNG and JPEG (.png, .jpg, .jpeg)"


@refusal("a text file named .png", 3, "images")
def case_text_named_png(d):
    (d / "imgs").mkdir()
    (d / "imgs" / "fake.png").write_text("this is not a png")
    return str(d / "imgs"), "{d}/imgs/fake.png: not a PNG/JPEG image"


@refusal("an empty folder", 3, "images")
def case_empty_folder(d):
    (d / "empty").mkdir()
    return str(d / "empty"), "no PNG/JPEG images found in input {d}/empty (the folder is empty)"


@refusal("a folder that does not exist", 3, "images")
def case_missing_folder(d):
    return str(d / "nope"), "input {d}/nope does not exist"


@refusal("an image smaller than the network needs (unless --skip-bad)", 3, "images")
def case_too_small_for_network(d):
    _png(d / "imgs" / "ok.png")
    _png(d / "imgs" / "tiny.png", size=(6, 5))
    return str(d / "imgs"), "{d}/imgs/tiny.png is 6x5 pixels, too small for the network's 16x16 training patches"


@refusal("a training set too small to train and validate on (one image for denoise or index; the message gives the minimum)", 3,
         "images")
def case_single_image(d):
    _png(d / "imgs" / "only.png")
    return str(d / "imgs"), ("input {d}/imgs: 1 decodable image(s) are too few to train and validate on: training "
                             "needs at least 2 images")


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_images_are_one_clear_message_and_write_nothing(prefect_server, dask_address, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    src, expected = case(data)
    out = tmp_path / "artifacts"
    res = runner.invoke(app, ["run", "denoise", "--input", src, "--output", str(out), "--dask-address", dask_address, *TINY])
    assert res.exit_code == case.refusal.exit_code, res.output
    assert expected.format(d=data) in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert res.stderr.count("error:") == 1
    assert files_under(out) == [], "nothing may be written on bad input"


@pytest.fixture(scope="module")
def two_runs(prefect_server, dask_address, tmp_path_factory):
    """A tiny denoise model and a tiny index, for the model-mismatch cases; with --skip-bad, their folder
    also holds a WebP file (left out) and a grayscale PNG with transparency (composited on white)."""
    d = tmp_path_factory.mktemp("runs")
    for i in range(6):
        _png(d / "imgs" / str(i % 2) / f"{i}.png", size=(24, 24), seed=i)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(d / "imgs" / "1" / "skip.webp")
    la = np.dstack([np.full((24, 24), 60, np.uint8), np.tile(np.arange(0, 240, 10, dtype=np.uint8), (24, 1))])
    Image.fromarray(la, "LA").save(d / "imgs" / "0" / "la.png")
    out = d / "artifacts"
    res = runner.invoke(app, ["run", "denoise", "--input", str(d / "imgs"), "--output", str(out), "--json",
                              "--skip-bad", "--dask-address", dask_address, *TINY])
    assert res.exit_code == 0, res.output
    denoise = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    res = runner.invoke(app, ["run", "index", "--input", str(d / "imgs"), "--output", str(out), "--json", "--epochs", "1",
                              "--image-size", "8", "--set", "model.channels=[4,8]", "--latent-channels", "2",
                              "--skip-bad", "--dask-address", dask_address])
    assert res.exit_code == 0, res.output
    index = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    return d, out, denoise, index


def test_files_left_out_and_images_converted_are_said_in_the_result_summary_and_runs_show(two_runs):
    """--skip-bad listed the files it left out only in the manifest, and converting a grayscale+alpha PNG
    (composited on white) was said nowhere: both are now in the run's notes."""
    d, _, denoise, _ = two_runs
    left_out = f"warning: --skip-bad left out 1 file of input {d / 'imgs'}: 1/skip.webp"
    converted = f"input {d / 'imgs'}: 1 image with transparency composited on white (--set load.alpha=refuse"
    notes = open_run(denoise).manifest().extra["notes"]
    assert any(n.startswith(left_out) for n in notes) and any(n.startswith(converted) for n in notes), notes
    summary = (Path(denoise) / "report" / "summary.md").read_text()
    assert left_out in summary and converted in summary
    res = runner.invoke(app, ["runs", "show", denoise])
    assert res.exit_code == 0 and left_out in " ".join(res.output.split()), res.output
    skipped = open_run(denoise).manifest().extra["skipped"]
    assert skipped == [{"path": f"{d}/imgs/1/skip.webp",
                        "reason": "a WebP image; aeflow reads PNG and JPEG: convert it to one of them"}]


def test_search_a_query_folder_holding_files_it_cannot_read(two_runs, tmp_path):
    """A query folder with a WebP file: refused naming it, as a run's input is (was: silently searched the
    others); --skip-bad searches the others and names what it left out."""
    d, _, _, index = two_runs
    q = tmp_path / "q"
    q.mkdir()
    shutil.copy(d / "imgs" / "0" / "0.png", q / "a.png")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(q / "b.webp")
    (q / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    res = runner.invoke(app, ["search", "--index", index, "--query", str(q)])
    assert res.exit_code == 3, res.output
    said = " ".join(res.stderr.split())
    assert f"{q}/b.webp: a WebP image; aeflow reads PNG and JPEG: convert it to one of them; query {q} must hold " \
           "only PNG/JPEG images (or pass --skip-bad to search the others)" in said, said
    res = runner.invoke(app, ["search", "--index", index, "--query", str(q), "--skip-bad", "--json", "--k", "2"])
    assert res.exit_code == 0, res.output
    assert [r["query"] for r in json.loads(res.stdout)] == [f"{q}/a.png"]
    said = " ".join(res.stderr.split())
    assert "warning: --skip-bad left out 2 query files:" in said and f"{q}/b.webp: a WebP image" in said
    assert f"{q}/c.png: a damaged PNG file" in said


@refusal("a --model of another application", 5, "model")
def test_index_with_a_denoise_model_is_refused(two_runs, dask_address):
    d, out, denoise, _ = two_runs
    before = files_under(out)
    res = runner.invoke(app, ["run", "index", "--model", denoise, "--apply-to", str(d / "imgs"), "--output", str(out),
                              "--dask-address", dask_address])
    assert_refused(res, test_index_with_a_denoise_model_is_refused,
                   f"{denoise} holds a model of the 'denoise' application, not 'index'")
    assert files_under(out) == before


def test_search_an_index_whose_model_was_replaced(two_runs, tmp_path):
    d, out, denoise, index = two_runs
    copy = tmp_path / "runs" / "index" / "copy"
    shutil.copytree(index, copy)
    # Another index model (other weights) in place of the one the codes came from.
    weights = copy / "model" / "weights.safetensors"
    from safetensors.torch import load_file, save_file

    state = {k: v + 0.01 for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    cfg = json.loads((copy / "model" / "config.json").read_text())
    import hashlib

    cfg["weights"] = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    (copy / "model" / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["search", "--index", str(copy), "--query", str(d / "imgs" / "0" / "0.png")])
    assert res.exit_code == 5, res.output
    assert f"index {copy} was built with another model" in res.stderr
    assert "Traceback" not in res.output


def test_search_with_a_non_index_run_and_a_corrupt_query(two_runs, tmp_path):
    d, out, denoise, index = two_runs
    res = runner.invoke(app, ["search", "--index", denoise, "--query", str(d / "imgs" / "0" / "0.png")])
    assert res.exit_code == 5 and f"{denoise} is a 'denoise' run, not an index run" in res.stderr
    bad = tmp_path / "q.png"
    bad.write_bytes(b"GIF89a-not-really")
    res = runner.invoke(app, ["search", "--index", index, "--query", str(bad)])
    assert res.exit_code == 3 and f"query {bad}: not a PNG/JPEG image" in res.stderr, res.stderr
    res = runner.invoke(app, ["search", "--index", index, "--query", str(tmp_path / "missing.png")])
    assert res.exit_code == 3 and f"query {tmp_path}/missing.png does not exist" in res.stderr, res.stderr


@pytest.mark.parametrize("app_name, size_args, expected", [
    ("denoise", ["--set", "load.size=3", *TINY],  # TINY trains on 16x16 patches
     ("load.size 3: images resized to 3x3 are too small for the network's 16x16 training patches (--patch-size); "
      "input images need at least 16x16, so load.size must be at least 16")),
    ("compress", ["--set", "load.size=8", *FAST_CODEC],
     ("load.size 8: images resized to 8x8 would be mostly padding for the factorized codec, which downsamples "
      "images by 16 (it codes blocks of 16x16), so load.size must be at least 16; without it, images of any size "
      "are coded at their own size")),
    # not "input images need at least 64x64": unresized, the hyperprior codes 1x1 and 7x5 images
    ("compress", ["--set", "load.size=32", "--codec", "hyperprior", *FAST_CODEC],
     ("load.size 32: images resized to 32x32 would be mostly padding for the hyperprior codec, which downsamples "
      "images by 64 (it codes blocks of 64x64), so load.size must be at least 64; without it, images of any size "
      "are coded at their own size")),
    ("index", ["--image-size", "1", "--epochs", "1"],
     ("--image-size (load.size) 1: images resized to 1x1 are too small for the network, which downsamples by 2; "
      "input images need at least 2x2, so --image-size (load.size) must be at least 2")),
], ids=["denoise", "compress", "compress-hyperprior", "index"])  # tiny training: fails fast without the check
@refusal("a --set load.size (index: --image-size) smaller than the network needs: its training patches (denoise) or "
         "downsampling (the message names the setting, the value and the minimum); refused before any image is read",
         2, "configuration")
def test_a_size_too_small_for_the_network_is_a_configuration_error(dask_address, tmp_path, app_name, size_args,
                                                                   expected):
    """--set load.size=3 was accepted: denoise then blamed the first image ("imgs/a.png is 3x3 pixels", exit 3,
    after decoding everything), compress coded 3x3 images at 145 bits per pixel and 4.7 dB."""
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", seed=i)
    out = tmp_path / "artifacts"
    res = runner.invoke(app, ["run", app_name, "--input", str(tmp_path / "imgs"), "--output", str(out),
                              "--dask-address", dask_address, *size_args])
    assert_refused(res, test_a_size_too_small_for_the_network_is_a_configuration_error, expected)
    assert res.stderr.count("error:") == 1
    assert files_under(out) == [], "nothing may be written on a bad setting"


def test_skip_bad_leaves_out_an_image_too_small_for_the_network(prefect_server, dask_address, tmp_path):
    """--skip-bad left out files that did not decode, but an image too small for the network still failed the
    whole run: it is now left out and listed the same way (without --skip-bad it is refused by name, as before)."""
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", seed=i)
    _png(tmp_path / "imgs" / "tiny.png", size=(6, 5))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "artifacts"
    res = runner.invoke(app, ["run", "denoise", "--input", str(tmp_path / "imgs"), "--output", str(out), "--json",
                              "--skip-bad", "--dask-address", dask_address, *TINY])
    assert res.exit_code == 0, res.output
    run_uri = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    m = open_run(run_uri).manifest()
    assert m.extra["images"] == {"input": 3}
    reason = "6x5 pixels, too small for the network's 16x16 training patches (--patch-size): input images need at least 16x16"
    assert {"path": f"{tmp_path}/imgs/tiny.png", "reason": reason} in m.extra["skipped"], m.extra["skipped"]
    left_out = f"warning: --skip-bad left out 2 files of input {tmp_path / 'imgs'}: tiny.png, notes.txt"
    assert any(n.startswith(left_out) for n in m.extra["notes"]), m.extra["notes"]
