"""An eleventh walkthrough, of the image search (train an index once, apply it to new images, search it from
anywhere) and of the tables the tabular applications write: an index of --mode keep converts queries and new
images to the one mode it learnt on, an index whose model was moved says so, --skip-bad leaves out a query
file that is not an image, and an --id-column named like an output column is refused before anything runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import files_under
from tests.refusals import assert_refused, refusal

runner = CliRunner()
pytestmark = pytest.mark.cli
TINY_INDEX = ["--epochs", "1", "--image-size", "8", "--set", "model.channels=[4,8]", "--latent-channels", "2"]


def _png(path, seed, gray=False, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _run(*argv) -> str:
    res = runner.invoke(app, [*argv, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]


def _no_traceback(res) -> str:
    assert "Traceback" not in res.output, res.output
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def keep_index(prefect_server, tmp_path_factory):
    """An index trained with --mode keep on RGB images (class folders), and a folder of grayscale images."""
    d = tmp_path_factory.mktemp("keep")
    for i in range(6):
        _png(d / "rgb" / str(i % 2) / f"{i}.png", seed=i)
    for i in range(3):
        _png(d / "gray" / f"g{i}.png", seed=10 + i, gray=True)
    trained = _run("run", "index", "--input", str(d / "rgb"), "--mode", "keep", "--output", str(d / "artifacts"),
                   *TINY_INDEX)
    return d, trained


def test_a_keep_index_applied_to_images_of_the_other_mode_converts_them(keep_index):
    """Train once, apply daily: the model of a --mode keep run learnt on RGB images; applied to grayscale ones
    without --mode it adopted 'keep' and failed (exit 5: 'takes 3-channel images but --mode keep gives 1
    channels', a --mode the user never gave). Now it adopts the mode it learnt on, RGB, and the gray images
    are converted to it."""
    d, trained = keep_index
    res = runner.invoke(app, ["run", "index", "--model", trained, "--apply-to", str(d / "gray"), "--output",
                              str(d / "artifacts"), "--json"])
    _no_traceback(res)
    assert res.exit_code == 0, res.output
    applied = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    with open(f"{applied}/index/meta.json") as f:
        meta = json.load(f)
    assert meta["image"]["mode"] == "rgb", meta["image"]
    assert meta["n"] == 3


def test_search_a_keep_index_with_gray_and_rgb_queries(keep_index, tmp_path):
    """README: search decodes each query like the indexed images, another mode converted. A grayscale query of
    an index built with --mode keep on RGB images was refused ('queries decode to 1 channels but the index's
    model takes 3', exit 3), and a gray and an RGB query together ended in a numpy traceback (exit 1)."""
    d, trained = keep_index
    gray, rgb = _png(tmp_path / "q" / "gray.png", seed=20, gray=True), d / "rgb" / "0" / "0.png"
    res = runner.invoke(app, ["search", "--index", trained, "--query", str(gray), "--query", str(rgb), "--k", "2",
                              "--json"])
    _no_traceback(res)
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert [r["query"] for r in found] == [str(gray), str(rgb)]
    assert all(len(r["results"]) == 2 for r in found)
    assert found[1]["results"][0]["path"] == str(rgb), "an indexed image finds itself first"


def test_search_an_index_whose_model_folder_was_moved(keep_index, tmp_path):
    """An index applied with --model keeps its codes' model where it was: moved or deleted, search said
    "'…' is not a run URI (expected .../runs/<app>/<run_id>)" of a path the user never typed. Now it says
    which index needs which model, and that it cannot be opened (exit 4)."""
    d, trained = keep_index
    copy = tmp_path / "runs" / "index" / "copy"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "model")  # as in an index applied with --model: the model is another run's, or a folder
    gone = tmp_path / "models" / "gone"
    meta = json.loads((copy / "index" / "meta.json").read_text())
    meta["model_run"] = str(gone)
    (copy / "index" / "meta.json").write_text(json.dumps(meta))
    res = runner.invoke(app, ["search", "--index", str(copy), "--query", str(d / "gray" / "g0.png")])
    said = _no_traceback(res)
    assert res.exit_code == 4, res.output
    assert f"index {copy} was built with the model {gone}, which cannot be opened (moved or deleted since?)" in said, said


def test_skip_bad_leaves_out_a_query_file_that_is_not_an_image(keep_index, tmp_path):
    """search --help: --skip-bad leaves out query files that are not PNG/JPEG images instead of failing. A
    text file given as a --query failed the search even with --skip-bad (only one inside a folder was left
    out). Now it is left out and named; with nothing left to search it is one error (exit 3)."""
    d, trained = keep_index
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    image = d / "rgb" / "1" / "1.png"
    res = runner.invoke(app, ["search", "--index", trained, "--query", str(notes), "--query", str(image), "--k", "1"])
    assert res.exit_code == 3 and f"{notes}: not an image file" in _no_traceback(res), res.output
    res = runner.invoke(app, ["search", "--index", trained, "--query", str(notes), "--query", str(image), "--k", "1",
                              "--skip-bad", "--json"])
    said = _no_traceback(res)
    assert res.exit_code == 0, res.output
    assert [r["query"] for r in json.loads(res.stdout)] == [str(image)]
    assert "warning: --skip-bad left out 1 query file:" in said and f"{notes}: not an image file" in said, said
    res = runner.invoke(app, ["search", "--index", trained, "--query", str(notes), "--skip-bad"])
    said = _no_traceback(res)
    assert res.exit_code == 3 and f"no query is a PNG/JPEG image: {notes}: not an image file" in said, said


@pytest.mark.parametrize("application, id_column, columns", [
    ("reduce", "z_1", "z_0, z_1"),
    ("extract", "f_0", "f_0..f_15"),
    ("detect", "score", "score, is_anomaly"),
])
@refusal("an --id-column named like a column the application writes (reduce's z_0, extract's f_0, detect's "
         "score): refused before anything runs", 2, "configuration")
def test_an_id_column_named_like_an_output_column_is_refused_before_anything_runs(
        prefect_server, tmp_path, application, id_column, columns):
    """An id column named z_1 (reduce), f_0 (extract) or score (detect) trained the model, then failed with
    pandas' 'ValueError: cannot insert z_1, already exists' and a traceback (exit 1), leaving an 'interrupted'
    run with a checkpoint behind. Now it is refused at the door (exit 2), naming the clash; nothing is written."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(40, 4)), columns=list("abcd"))
    df.insert(0, id_column, np.arange(100, 140))
    data = tmp_path / "t.csv"
    df.to_csv(data, index=False)
    out = tmp_path / "artifacts"
    res = runner.invoke(app, ["run", application, "--input", str(data), "--id-column", id_column, "--epochs", "1",
                              "--output", str(out)])
    said = _no_traceback(res)
    assert_refused(res, test_an_id_column_named_like_an_output_column_is_refused_before_anything_runs)
    output = {"reduce": "embeddings", "extract": "features", "detect": "scores"}[application]
    assert (f"--id-column {id_column!r} is also the name of a column that {application} writes to "
            f"{output}.parquet ({columns}): rename the id column in the input") in said, said
    assert files_under(out) == []


def test_an_id_column_named_like_a_code_column_the_model_does_not_write_is_carried(prefect_server, tmp_path):
    """The refusal is only of a real clash: with --latent-dim 2, an id column z_5 is carried as it is."""
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.normal(size=(30, 3)), columns=list("abc"))
    df.insert(0, "z_5", [f"{i:04d}" for i in range(30)])
    data = tmp_path / "t.parquet"
    df.to_parquet(data, index=False)
    uri = _run("run", "reduce", "--input", str(data), "--id-column", "z_5", "--epochs", "1", "--output",
               str(tmp_path / "artifacts"))
    got = pd.read_parquet(f"{uri}/embeddings.parquet")
    assert list(got.columns) == ["z_5", "z_0", "z_1"]
    assert got["z_5"].tolist() == df["z_5"].tolist()


def test_a_mode_the_reused_index_model_cannot_take_is_refused_before_any_image_is_read(keep_index):
    """--model of an RGB index with --mode gray decoded every image and was refused by the first shard encoded;
    now before any image is read (check_fitted), saying to leave --mode unset."""
    import torch

    from tasks.apps.index import Index, IndexLoadConfig, IndexRunConfig
    from tasks.errors import ModelMismatchError

    d, trained = keep_index
    fitted = Index().load(trained, torch.device("cpu"))
    config = IndexRunConfig(load=IndexLoadConfig(apply_to=str(d / "gray"), mode="gray"), model_run=trained)
    with pytest.raises(ModelMismatchError, match="takes 3-channel images but --mode gray gives 1 channels: leave "
                                                 "--mode unset to use the mode it learnt on"):
        Index().check_fitted(config, fitted)
    Index().check_fitted(config.model_copy(update={"load": IndexLoadConfig(mode="rgb")}), fitted)  # the mode it takes


def test_an_index_of_one_image_says_what_its_recall_measured(keep_index):
    """Applying a model to one new image: the notes said 'the collection has 1 image, so each query has 1 other
    to find' (there is none: the query is that image). Now they say so."""
    d, trained = keep_index
    res = runner.invoke(app, ["run", "index", "--model", trained, "--apply-to", str(d / "rgb" / "0" / "0.png"),
                              "--output", str(d / "artifacts"), "--json"])
    _no_traceback(res)
    assert res.exit_code == 0, res.output
    notes = json.loads(res.stdout.strip().splitlines()[-1])["notes"]
    assert not [n for n in notes if "1 other" in n], notes
    assert "recall_at_10 is measured at k=1: the collection has 1 image, so the query is that image and finds only " \
           "itself (app.k=10)" in notes, notes


def test_a_sheet_that_fails_to_write_keeps_the_search_results(keep_index, tmp_path, monkeypatch):
    """--sheet to a store the keys may only read: the whole search ran, then the sheet failed and the results
    were never printed. Now the tables come first, then the one error line (exit 4)."""
    import tasks.search
    from tasks.errors import StorageError

    def refused(sheet, *args, **kwargs):
        raise StorageError(f"cannot write {sheet}: the object store refused access")

    monkeypatch.setattr(tasks.search, "write_search_sheet", refused)
    d, trained = keep_index
    query = d / "rgb" / "0" / "0.png"
    res = runner.invoke(app, ["search", "--index", trained, "--query", str(query), "--k", "2", "--sheet",
                              str(tmp_path / "sheet.png")], terminal_width=200)
    assert res.exit_code == 4, res.output
    assert f"nearest to {query}" in res.stdout and "refused access" in res.stderr, res.output
