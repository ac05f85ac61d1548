"""Defects found by a user walkthrough of the image commands: each a clear refusal (the file or value
named, a non-zero exit), nothing partial left behind, earlier outputs never overwritten."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.apps import get_app
from tasks.errors import InputError, ModelMismatchError
from tasks.images import (
    ImageLoadConfig,
    ImageSet,
    decode_image,
    image_shape,
    inspect_images,
    load_images,
)
from tasks.storage import Manifest
from tests.conftest import files_under

runner = CliRunner()
pytestmark = pytest.mark.cli
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEC = os.path.join(REPO, "benchmarks", "weights", "codec")
DENOISE = os.path.join(REPO, "benchmarks", "weights", "denoise")


def _image(path, size=(48, 40), mode="RGB", seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, **save)
    return path


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def _one_line(result) -> str:
    assert "Traceback" not in result.output and "unexpected error" not in result.output, result.output
    return " ".join(result.output.split())


# 1. run compress: photo.jpg and photo.png would both decode to decoded/photo.png -------------------

def test_run_compress_refuses_two_images_decoding_to_one_png():
    target = ImageSet(source_uri="/in", role="apply-to", shards=(), counts=(), rel=("a.png", "sub/photo.jpg", "sub/photo.png"),
                      labels=(None,) * 3, shapes=((3, 8, 8),) * 3)
    ctx = SimpleNamespace(target=target, train=None, run=None)
    with pytest.raises(InputError, match=r"/in/sub/photo.jpg and /in/sub/photo.png would both be written to "
                                         r"decoded/sub/photo.png; nothing was written"):
        get_app("compress").check_data(ctx)
    ok = ImageSet(source_uri="/in", role="apply-to", shards=(), counts=(), rel=("a.png", "sub/a.png"),
                  labels=(None,) * 2, shapes=((3, 8, 8),) * 2)
    get_app("compress").check_data(SimpleNamespace(target=ok, train=None, run=None))  # different folders: fine


# 2. compress/decompress -o an existing file (or below one): storage exit 4, one line -----------------

def test_codec_commands_refuse_an_output_that_is_a_file(tmp_path):
    img = _image(tmp_path / "a.png")
    blocker = tmp_path / "existing"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        r = _invoke("compress", str(img), "-o", str(out), "--model", CODEC)
        assert r.exit_code == 4, r.output
        assert f"{blocker} is a file, not a folder" in _one_line(r)
    codes = tmp_path / "codes"
    assert _invoke("compress", str(img), "-o", str(codes), "--model", CODEC).exit_code == 0
    for out in (blocker, blocker / "sub"):
        r = _invoke("decompress", str(codes / "a.aec"), "-o", str(out), "--model", CODEC)
        assert r.exit_code == 4, r.output
        assert f"{blocker} is a file, not a folder" in _one_line(r)
    assert blocker.read_text() == "x"


# 3. compress FOLDER: refused by name (exit 3), no output folder left behind --------------------------

def test_compress_refuses_a_folder_and_leaves_nothing(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    out = tmp_path / "out"
    r = _invoke("compress", str(tmp_path / "imgs"), "-o", str(out), "--model", CODEC)
    assert r.exit_code == 3, r.output
    assert f"{tmp_path / 'imgs'} is a folder; pass image files" in _one_line(r)
    assert not out.exists()


# 4. search --sheet that cannot be written: checked before searching ---------------------------------

def test_search_checks_the_sheet_path_first(tmp_path):
    q = _image(tmp_path / "q.png")
    (tmp_path / "file").write_text("x")
    for sheet, says in ((tmp_path, f"--sheet {tmp_path}: {tmp_path} is a folder"),
                        (tmp_path / "file" / "x.png", f"{tmp_path / 'file'} is a file, not a folder")):
        r = _invoke("search", "--index", str(tmp_path / "runs" / "index" / "none"), "--query", str(q),
                    "--sheet", str(sheet))
        assert r.exit_code == 4, r.output
        assert says in _one_line(r)


# 5. a failed multi-file command writes nothing and overwrites nothing -------------------------------

def test_failed_compress_and_decompress_write_nothing(tmp_path):
    a = _image(tmp_path / "a.jpg", seed=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.aec").write_bytes(b"earlier result")
    # Even when told to replace earlier outputs, a command that fails on one input replaces none.
    r = _invoke("compress", str(a), str(bad), "-o", str(out), "--model", CODEC, "--overwrite")
    assert r.exit_code == 3 and f"{bad}: a damaged PNG file" in _one_line(r)
    assert (out / "a.aec").read_bytes() == b"earlier result", "an earlier output was overwritten"

    codes = tmp_path / "codes"
    assert _invoke("compress", str(a), "-o", str(codes), "--model", CODEC).exit_code == 0
    broken = codes / "z.aec"
    broken.write_bytes((codes / "a.aec").read_bytes()[:-3])
    decoded = tmp_path / "decoded"
    r = _invoke("decompress", str(codes / "a.aec"), str(broken), "-o", str(decoded), "--model", CODEC)
    assert r.exit_code == 3 and f"{broken}: truncated" in _one_line(r)
    assert files_under(decoded) == []


# 6. an apply run (--model with --apply-to) stands for the model it applied ----------------------------

def _apply_run(root, app_name: str, model_run: str) -> str:
    run = root / "runs" / app_name / "20260101T000000Z-abcdef12"
    run.mkdir(parents=True)
    now = datetime.now(UTC)
    m = Manifest(app=app_name, run_id=run.name, run_uri=str(run), created=now, finished=now, fingerprint="x" * 64,
                 model_run=model_run, config={})
    (run / "manifest.json").write_text(m.model_dump_json())
    return str(run)


def test_an_image_apply_run_is_usable_as_model(tmp_path):
    run = _apply_run(tmp_path, "denoise", DENOISE)
    fitted = get_app("denoise").load(run, torch.device("cpu"))
    assert fitted.source_run == DENOISE, "the new run records the model it really applied"
    with pytest.raises(ModelMismatchError, match="is a run of the 'denoise' application, not 'index'"):
        get_app("index").load(run, torch.device("cpu"))


# 7. a folder mixing grayscale and RGB: the mismatch is the mode, named -------------------------------

def test_mixed_modes_name_one_file_of_each_and_suggest_a_mode():
    imset = ImageSet(source_uri="/in", role="input", shards=(), counts=(), rel=("g.png", "c.png", "g2.png"),
                     labels=(None,) * 3, shapes=((1, 32, 32), (3, 32, 32), (1, 32, 32)))
    with pytest.raises(InputError, match=r"/in/g.png is grayscale, /in/c.png is RGB\); pass --mode gray or --mode rgb"):
        image_shape(imset)


# 8. a single file too small: its path once, not doubled ------------------------------------------------

def test_too_small_single_file_is_named_once(tmp_path):
    one = tmp_path / "tiny" / "one.png"
    one.parent.mkdir()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(one)
    denoise = get_app("denoise")
    cfg = denoise.RunConfig()
    with pytest.raises(InputError) as e:
        load_images(inspect_images(str(one), "apply-to"), ImageLoadConfig(), run=None, prefix="x",
                    min_side=denoise.min_side(cfg, "apply-to"), too_small_for=denoise.too_small_for(cfg, "apply-to"))
    assert str(e.value).startswith(f"{one} is 1x1 pixels"), str(e.value)
    # Without recorded paths (older pickles, hand-made sets), a file input is still not doubled.
    bare = ImageSet(source_uri=str(one), role="apply-to", shards=(), counts=(), rel=("one.png",), labels=(None,),
                    shapes=((1, 1, 1),))
    assert bare.path_of(0) == str(one)


# 9. EXIF Orientation is applied: pixels as the image is displayed -------------------------------------

def test_exif_orientation_is_applied_by_the_shared_decoder():
    from tasks.codec import decode_image_bytes

    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:5, :5] = 255  # a white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90° clockwise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    chw = decode_image(buf.getvalue(), "rgb")
    assert chw.shape == (3, 30, 20), "orientation 6 swaps width and height"
    assert chw[:, :5, -5:].mean() > 200 and chw[:, :5, :5].mean() < 50, "the corner moved to the top right"
    img, mode = decode_image_bytes(buf.getvalue(), "x.jpg")  # aeflow compress's reader
    assert img.shape == (30, 20, 3) and mode == "RGB"


def test_compress_and_decompress_show_a_spinner_on_a_terminal(tmp_path, monkeypatch):
    """A 6 MP photograph takes 15-40 s to code on a CPU and nothing was shown until its line (found by the ninth
    walkthrough): on a terminal a spinner says which file of how many is being coded; none with --json."""
    import contextlib

    import flows.cli.codec as codec_cli

    shown: list[str] = []

    class Status:
        def update(self, text):
            shown.append(text)

    class Terminal:
        is_terminal = True

        @contextlib.contextmanager
        def status(self, text):
            shown.append(text)
            yield Status()
            shown.append("(cleared)")

    monkeypatch.setattr(codec_cli, "err", Terminal())
    a, b = _image(tmp_path / "a.png", seed=1), _image(tmp_path / "b.png", seed=2)
    r = _invoke("compress", str(a), str(b), "-o", str(tmp_path / "c"), "--model", CODEC)
    assert r.exit_code == 0, r.output
    assert shown == ["coding 1 of 2", "coding 2 of 2", "(cleared)"], shown
    shown.clear()
    r = _invoke("decompress", str(tmp_path / "c" / "a.aec"), "-o", str(tmp_path / "d"), "--model", CODEC)
    assert r.exit_code == 0 and shown == [f"decoding {tmp_path / 'c' / 'a.aec'}", "(cleared)"], (r.output, shown)
    shown.clear()
    r = _invoke("compress", str(a), "-o", str(tmp_path / "e"), "--model", CODEC, "--json")
    assert r.exit_code == 0 and shown == [], shown
