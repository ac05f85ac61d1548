"""A second user walkthrough of the image commands: conversions at the door are said, not silent; files left
out by --skip-bad are named; formats aeflow does not read get one message everywhere; option errors of the
codec commands are configuration errors (exit 2); earlier outputs are not overwritten without --overwrite;
an empty .aec file is called empty."""

from __future__ import annotations

import io
import os

import dask
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import ConfigError, InputError
from tasks.images import (
    ImageLoadConfig,
    ImageSet,
    inspect_images,
    list_images,
    load_images,
)
from tests.conftest import files_under
from tests.refusals import assert_raised, assert_refused, refusal

runner = CliRunner()
pytestmark = pytest.mark.cli
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEC = os.path.join(REPO, "benchmarks", "weights", "codec")
READS = "aeflow reads PNG and JPEG: convert it to one of them"


def _rgb(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _one_line(result) -> str:
    assert "Traceback" not in result.output and "unexpected error" not in result.output, result.output
    return " ".join(result.output.split())


# 1. conversions at the door (mode keep): counted per kind and said in the run's notes -----------------

def test_conversions_are_counted_and_said(tmp_path):
    from tasks.images import image_notes

    d = tmp_path / "in"
    rgba = np.dstack([_rgb(1), np.full((32, 32), 128, np.uint8)])
    _save(Image.fromarray(rgba, "RGBA"), d / "glass.png")
    la = np.dstack([np.full((32, 32), 90, np.uint8), np.full((32, 32), 0, np.uint8)])
    _save(Image.fromarray(la, "LA"), d / "gray_alpha.png")
    _save(Image.fromarray(np.dstack([_rgb(2), np.full((32, 32), 255, np.uint8)]), "RGBA"), d / "opaque.png")
    _save(Image.fromarray(_rgb(3)).convert("P"), d / "palette.png")
    _save(Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)), d / "deep.png")
    _save(Image.fromarray(_rgb(4)).convert("CMYK"), d / "print.jpg")
    _save(Image.fromarray(_rgb(5)), d / "plain.png")
    _save(Image.fromarray(_rgb(6)[..., 0]), d / "plain_gray.png")
    keyed = _rgb(7)
    keyed[:4] = 0  # black is the transparent colour (a PNG tRNS chunk): composited on white, not kept black
    _save(Image.fromarray(keyed), d / "keyed.png", transparency=(0, 0, 0))
    with dask.config.set(scheduler="synchronous"):
        imset = load_images(inspect_images(str(d)), ImageLoadConfig(mode="keep"), run=None, prefix="x")
    from tasks.images import decode_image

    assert decode_image((d / "keyed.png").read_bytes(), "keep")[:, 0, 0].tolist() == [255, 255, 255]
    assert imset.converted == {"alpha": 3, "opaque-alpha>RGB": 1, "palette>RGB": 1, "16-bit>grayscale": 1,
                               "CMYK>RGB": 1}, imset.converted
    la_at = imset.rel.index("gray_alpha.png")
    assert imset.shapes[la_at][0] == 1, "LA stays grayscale (alpha composited)"
    notes = " | ".join(image_notes(imset))
    for said in (f"input {d}: 3 images with transparency composited on white (--set load.alpha=refuse to refuse them)",
                 "1 image with a fully opaque alpha channel stored as RGB without it",
                 "1 palette image converted to RGB", "1 16-bit image reduced to 8 bits (grayscale)",
                 "1 CMYK image converted to RGB"):
        assert said in notes, notes
    assert "plain" not in notes
    # Asked for: --mode gray converts colour without a note, but the 16-bit reduction is still said.
    with dask.config.set(scheduler="synchronous"):
        gray = load_images(inspect_images(str(d)), ImageLoadConfig(mode="gray"), run=None, prefix="x")
    assert "palette>grayscale" in gray.converted and "16-bit>grayscale" in gray.converted
    assert not any(k.startswith("RGB") for k in gray.converted)


def test_a_16_bit_image_keeps_its_brightness_whatever_its_values():
    """16-bit levels are divided by 256: a dark 16-bit image (every value under 256) stays dark, not cast up."""
    import io

    from tasks.images import decode_image

    def png16(values):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(values, np.uint16)).save(buf, "PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
        return buf.getvalue()

    dark = decode_image(png16([[200, 255], [0, 100]]), "keep")
    assert dark.tolist() == [[[0, 0], [0, 0]]], "values under 256 of 65,535 are black in 8 bits"
    mixed = decode_image(png16([[100 * 257, 65535], [0, 300]]), "keep")
    assert mixed.tolist() == [[[100, 255], [0, 1]]]


# 2. files left out by --skip-bad: the run's notes name them (the console prints the notes) ----------------

def test_skipped_files_are_named_in_the_notes():
    from tasks.images import image_notes

    skipped = tuple({"path": f"/in/{n}", "reason": "r"} for n in ("a.webp", "b.png", "c.txt", "d.gif"))
    imset = ImageSet(source_uri="/in", role="input", shards=(), counts=(), rel=("ok.png",), labels=(None,),
                     shapes=((1, 8, 8),), skipped=skipped)
    notes = image_notes(imset)
    assert notes == [("warning: --skip-bad left out 4 files of input /in: a.webp, b.png, c.txt and 1 more (each "
                      "with its reason under skipped in the manifest)")], notes
    assert image_notes(ImageSet(source_uri="/in", role="input", shards=(), counts=(), rel=(), labels=(),
                                shapes=())) == []


# 3. WebP/TIFF/BMP/GIF: one message everywhere, naming the file and its format --------------------------

@refusal("an image in another format than PNG or JPEG (WebP, TIFF, BMP, GIF...: the message names the format), "
         "as input, query or file to compress", 3, "images")
def test_formats_aeflow_does_not_read_get_one_message_everywhere(tmp_path):
    from tasks.codec import decode_image_bytes
    from tasks.search import expand_queries

    webp = _save(Image.fromarray(_rgb()), tmp_path / "photo.webp")
    with pytest.raises(InputError, match=f"^{webp}: a WebP image; {READS}$"):
        list_images(str(webp))  # aeflow run --input photo.webp
    folder = tmp_path / "folder"
    _save(Image.fromarray(_rgb()), folder / "a.png")
    _save(Image.fromarray(_rgb()), folder / "b.tif")
    _save(Image.fromarray(_rgb()), folder / "c.bmp")
    with pytest.raises(InputError, match=f"^{folder}/b.tif: a TIFF image; {READS} \\(and 1 more file aeflow does "
                                         f"not read\\); input {folder} must hold only PNG/JPEG images"):
        inspect_images(str(folder))  # aeflow run --input folder/
    with pytest.raises(InputError, match=f"^{webp}: a WebP image; {READS}$"):
        decode_image_bytes(webp.read_bytes(), str(webp))  # aeflow compress photo.webp
    disguised = tmp_path / "disguised.png"
    disguised.write_bytes(webp.read_bytes())  # the content's format, not the name's
    with pytest.raises(InputError, match=f"^{disguised}: a WebP image; {READS}$"):
        decode_image_bytes(disguised.read_bytes(), str(disguised))
    gif = _save(Image.fromarray(_rgb()).convert("P"), tmp_path / "anim.gif")
    r = runner.invoke(app, ["compress", str(gif), "--model", CODEC, "-o", str(tmp_path / "out")])
    assert r.exit_code == test_formats_aeflow_does_not_read_get_one_message_everywhere.refusal.exit_code
    assert f"{gif}: a GIF image; {READS}" in _one_line(r)
    # aeflow search --query folder/: refused like a run's input (was: silently searched a.png alone) ...
    with pytest.raises(InputError, match=f"^{folder}/b.tif: a TIFF image; {READS} .*query {folder} must hold only "
                                         "PNG/JPEG images.*--skip-bad"):
        expand_queries([str(folder)])
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "no-index"), "--query", str(folder)])
    assert r.exit_code == 3 and f"{folder}/b.tif: a TIFF image" in _one_line(r)
    # ... or, with --skip-bad, left out by name.
    queries, left_out = expand_queries([str(folder)], skip_bad=True)
    assert queries == [f"{folder}/a.png"]
    assert left_out == [f"{folder}/b.tif: a TIFF image; {READS}", f"{folder}/c.bmp: a BMP image; {READS}"]


# 4. option errors of aeflow compress are configuration errors (exit 2), found before anything is written --

@refusal("aeflow compress --quality outside the model's levels", 2, "configuration")
def test_quality_out_of_range_is_a_configuration_error(tmp_path):
    img = _save(Image.fromarray(_rgb()), tmp_path / "a.png")
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(img), "--model", CODEC, "--quality", "99", "-o", str(out)])
    assert_refused(r, test_quality_out_of_range_is_a_configuration_error)
    assert "--quality must be in 0..6 for this model, got 99" in _one_line(r)
    assert not out.exists()


@refusal("--refine-steps with the hyperprior codec (refinement is the factorized codec's)", 2, "configuration")
def test_refine_steps_with_the_hyperprior_is_refused_at_configuration():
    from tasks.apps.compress import CompressRunConfig
    from tasks.config import resolve_config

    with pytest.raises(ConfigError, match="refine_steps.*factorized codec only") as e:
        resolve_config(CompressRunConfig, options={"app.codec": "hyperprior", "app.refine_steps": 5})
    assert_raised(e.value, test_refine_steps_with_the_hyperprior_is_refused_at_configuration)
    resolve_config(CompressRunConfig, options={"app.codec": "factorized", "app.refine_steps": 5})


# 5. earlier outputs are not overwritten silently --------------------------------------------------------

@refusal("aeflow compress/decompress outputs that already exist (unless --overwrite); nothing is written", 4, "codec files")
def test_codec_commands_keep_earlier_outputs_unless_overwrite(tmp_path):
    a = _save(Image.fromarray(_rgb(1)), tmp_path / "a.png")
    b = _save(Image.fromarray(_rgb(2)), tmp_path / "b.png")
    codes = tmp_path / "codes"
    codes.mkdir()
    (codes / "a.aec").write_bytes(b"earlier a")
    r = runner.invoke(app, ["compress", str(a), str(b), "--model", CODEC, "-o", str(codes)])
    assert_refused(r, test_codec_commands_keep_earlier_outputs_unless_overwrite)
    assert f"{codes}/a.aec already exists; nothing was written (pass --overwrite to replace it)" in _one_line(r)
    assert files_under(codes) == [str(codes / "a.aec")] and (codes / "a.aec").read_bytes() == b"earlier a", "b.aec written"
    r = runner.invoke(app, ["compress", str(a), str(b), "--model", CODEC, "-o", str(codes), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (codes / "a.aec").read_bytes()[:4] == b"\x89AEC" and (codes / "b.aec").exists()

    decoded = tmp_path / "decoded"
    decoded.mkdir()
    for name in ("a.png", "b.png"):
        (decoded / name).write_bytes(b"earlier " + name.encode())
    r = runner.invoke(app, ["decompress", str(codes / "a.aec"), str(codes / "b.aec"), "--model", CODEC,
                            "-o", str(decoded)])
    assert r.exit_code == 4, r.output
    assert f"{decoded}/a.png and {decoded}/b.png already exist; nothing was written (pass --overwrite to replace " \
           "them)" in _one_line(r)
    assert (decoded / "a.png").read_bytes() == b"earlier a.png"
    r = runner.invoke(app, ["decompress", str(codes / "a.aec"), "--model", CODEC, "-o", str(decoded), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Image.open(decoded / "a.png").size == (32, 32) and (decoded / "b.png").read_bytes() == b"earlier b.png"


# 6. an empty .aec file is called empty, by name -------------------------------------------------------

@refusal("an empty .aec file (0 bytes)", 3, "codec files")
def test_an_empty_aec_file_is_called_empty(tmp_path):
    from tasks.codec import read_aec

    with pytest.raises(InputError, match=r"^x.aec: empty file \(0 bytes\), not an .aec file$"):
        read_aec(b"", "x.aec")
    (tmp_path / "empty.aec").write_bytes(b"")
    r = runner.invoke(app, ["decompress", str(tmp_path / "empty.aec"), "--model", CODEC, "-o", str(tmp_path / "out")])
    assert_refused(r, test_an_empty_aec_file_is_called_empty, f"{tmp_path}/empty.aec: empty file (0 bytes), not an .aec file")
    assert files_under(tmp_path / "out") == []


# 1 (ad hoc). aeflow compress says how it coded an image that was converted -----------------------------

def test_compress_says_when_an_image_was_converted(tmp_path):
    p = _save(Image.fromarray(_rgb()).convert("P"), tmp_path / "pal.png")
    r = runner.invoke(app, ["compress", str(p), "--model", CODEC, "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "quality 3; a palette image converted to RGB)" in _one_line(r)
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="PNG")
    (tmp_path / "rgb.png").write_bytes(buf.getvalue())
    r = runner.invoke(app, ["compress", str(tmp_path / "rgb.png"), "--model", CODEC, "-o", str(tmp_path / "c")])
    assert r.exit_code == 0 and "converted" not in r.output


@refusal("aeflow search --sheet FILE that already exists (unless --overwrite); refused before searching", 4, "storage")
def test_search_refuses_an_existing_sheet_before_searching(tmp_path):
    """An existing --sheet was replaced silently; now refused by name before the index is even opened (the
    replacement with --overwrite is tested on a real index in tests/flows/test_image_flows.py)."""
    q = _save(Image.fromarray(_rgb()), tmp_path / "q.png")
    sheet = tmp_path / "sheet.png"
    sheet.write_bytes(b"earlier sheet")
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "no-index"), "--query", str(q), "--sheet", str(sheet)])
    assert_refused(r, test_search_refuses_an_existing_sheet_before_searching)
    assert f"cannot write --sheet {sheet}: it already exists; nothing was written (pass --overwrite" in _one_line(r)
    assert sheet.read_bytes() == b"earlier sheet"
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "no-index"), "--query", str(q), "--sheet", str(sheet),
                            "--overwrite"])
    assert r.exit_code != 0 and "already exists" not in r.output, "--overwrite lets the search go on (to the index)"


@refusal("aeflow search --sheet FILE not ending in .png (the contact sheet is a PNG); refused before searching", 2,
         "configuration")
def test_search_refuses_a_sheet_name_of_another_format(tmp_path):
    """``--sheet out/sheet.jpg`` wrote PNG bytes under a .jpg name (found by the ninth walkthrough)."""
    q = _save(Image.fromarray(_rgb()), tmp_path / "q.png")
    sheet = tmp_path / "sheet.jpg"
    r = runner.invoke(app, ["search", "--index", str(tmp_path / "no-index"), "--query", str(q), "--sheet", str(sheet)])
    assert_refused(r, test_search_refuses_a_sheet_name_of_another_format)
    assert f"--sheet {sheet}: the contact sheet is a PNG image; give a name ending in .png" in _one_line(r)
    assert not sheet.exists()


def test_index_help_names_settings_a_user_can_set():
    """`aeflow run index --help` sent users to ``Config.latent_noise`` and to ``ann_threshold``/``pq_bytes``/
    ``pq_threshold`` (internal names); it names the option and the --set keys, and what the distances are."""
    res = runner.invoke(app, ["run", "index", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Config.latent_noise" not in text
    for said in ("app.latent_noise", "--ann-threshold images", "app.pq_bytes per image", "above app.pq_threshold",
                 "squared L2 distances"):
        assert said in text, (said, text)


def test_a_bad_image_is_named_with_the_input_that_holds_it(tmp_path):
    """A file that does not decode names the input it is in (an --apply-to and a clean reference can hold
    the same file names) and counts the others in good English ('1 more bad files' before)."""
    d = tmp_path / "clean ref"
    d.mkdir()
    _save(Image.fromarray(_rgb(1)), d / "ok.png")
    for name in ("a.png", "b.png"):
        (d / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing decodable
    with dask.config.set(scheduler="synchronous"), pytest.raises(InputError) as e:
        load_images(inspect_images(str(d), "reference"), ImageLoadConfig(), run=None, prefix="x")
    msg = str(e.value)
    assert f"(and 1 more bad file); reference {d} must hold only decodable PNG/JPEG images: fix or remove it, or " \
           "pass --skip-bad to leave such files out" in msg, msg


def test_run_help_reflows_the_application_text():
    """`aeflow run denoise --help` kept the docstring's line breaks, so the terminal's own wrapping left lines of
    one or two words ('masking;', 'The'); plain paragraphs are now one line each for the terminal to wrap, and a
    list (detect's score parts) keeps its items (found by the ninth walkthrough)."""
    res = runner.invoke(app, ["run", "denoise", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert any("masking; the network is a U-Net-style conv autoencoder" in line for line in res.output.splitlines())
    res = runner.invoke(app, ["run", "detect", "--help"], terminal_width=200)
    items = [line.strip(" │") for line in res.output.splitlines() if line.strip(" │").startswith("- ")]
    assert len(items) >= 4 and items[0].startswith("- input_weight (8)"), items


def test_compress_help_says_a_fully_opaque_alpha_channel_is_kept():
    """`aeflow compress --help` said an image with an alpha channel "(even a fully opaque one)" is refused, and
    `run compress --help` that --skip-bad leaves such files out; a fully opaque RGBA/LA image is coded as RGB/L."""
    for args in (["compress", "--help"], ["run", "compress", "--help"]):
        res = runner.invoke(app, args, terminal_width=200)
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.replace("│", " ").split())
        assert "even a fully opaque" not in text and "have an alpha channel" not in text, text
        assert "fully opaque alpha channel is dropped" in text, text


def test_a_validator_message_that_names_the_value_does_not_repeat_it():
    """--patch-size 50 said "must be a multiple of 16, got 50 (got 50)"."""
    from tasks.apps.compress import CompressRunConfig
    from tasks.config import resolve_config

    with pytest.raises(ConfigError) as e:
        resolve_config(CompressRunConfig, options={"app.patch_size": 50})
    assert str(e.value).endswith("app.patch_size: patch_size must be a multiple of 16, got 50"), str(e.value)
    with pytest.raises(ConfigError) as e:
        resolve_config(CompressRunConfig, options={"app.patch_size": 8})
    assert "(got 8)" in str(e.value), "pydantic's own messages still name the value"
