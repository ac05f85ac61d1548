"""ArtifactStore on a local folder and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.errors import ConfigError, StorageError
from tasks.storage import ArtifactStore, Manifest, open_run

pytestmark = pytest.mark.tasks


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    request.getfixturevalue("s3_endpoint")
    from tests.conftest import TEST_BUCKET

    return ArtifactStore(f"s3://{TEST_BUCKET}/store-{tmp_path.name}")


def _manifest(run, **kw):
    from datetime import UTC, datetime

    return Manifest(
        app=run.app, run_id=run.run_id, run_uri=run.uri, created=datetime.now(UTC), finished=datetime.now(UTC),
        fingerprint="f" * 64, config={}, outputs=run.output_records(), **kw,
    )


def test_run_lifecycle(store):
    run = store.start_run("reduce", "a" * 64, {"x": 1})
    assert run.uri.endswith(f"runs/reduce/{run.run_id}")
    run.write_bytes("out/table.bin", b"12345")
    run.write_json("report/m.json", {"a": 1})
    assert store.list_runs() == []  # no manifest yet: not a run to readers
    records = run.output_records()
    assert [r.path for r in records] == ["out/table.bin", "report/m.json"]
    assert records[0].size == 5 and records[0].hash.startswith("sha256:")
    run.write_manifest(_manifest(run, metrics={"m": 1.0}))
    listed = store.list_runs("reduce")
    assert [m.run_id for m in listed] == [run.run_id]
    again = open_run(run.uri)
    assert again.manifest().metrics == {"m": 1.0}
    assert not again.exists("_run.json"), "the in-progress marker is removed on completion"
    assert store.find_complete("reduce", "f" * 64).run_id == run.run_id


def test_complete_run_is_never_overwritten(store):
    run = store.start_run("reduce", "b" * 64, {}, run_id="fixed-id")
    run.write_manifest(_manifest(run))
    with pytest.raises(ConfigError, match="already exists and is complete"):
        store.start_run("reduce", "b" * 64, {}, run_id="fixed-id")


def test_run_id_of_an_interrupted_run_with_other_settings_is_refused(store):
    run = store.start_run("reduce", "b" * 64, {}, run_id="half-done")
    run.write_bytes("embeddings.parquet", b"partial")
    run.release()
    with pytest.raises(ConfigError, match="holds an interrupted run with a different input or config; choose another"):
        store.start_run("reduce", "c" * 64, {}, run_id="half-done")
    assert run.read_bytes("embeddings.parquet") == b"partial", "the interrupted run's files were touched"


def test_discard_removes_everything_without_checkpoint(store):
    run = store.start_run("detect", "c" * 64, {})
    run.write_bytes("scores.parquet", b"partial")
    run.discard()
    assert not run.exists()
    other = store.start_run("detect", "d" * 64, {})
    other.write_bytes("x", b"1")
    other.write_manifest(_manifest(other))
    third = store.start_run("detect", "e" * 64, {})
    third.discard()
    assert open_run(other.uri).is_complete, "discarding one run must not touch another"


def test_discard_keeps_checkpoint_and_resume_reopens_it(store):
    run = store.start_run("reduce", "1" * 64, {})
    run.save_checkpoint({"w": torch.ones(3)}, {"epoch": 2})
    run.write_bytes("embeddings.parquet", b"partial")
    run.discard()
    assert run.exists("checkpoint/meta.json") and not run.exists("embeddings.parquet")
    assert not run.exists("manifest.json")
    again = store.start_run("reduce", "1" * 64, {})
    assert again.run_id == run.run_id
    tensors, meta = again.load_checkpoint()
    assert meta["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    different = store.start_run("reduce", "2" * 64, {})
    assert different.run_id != run.run_id


def test_model_files_are_safetensors_and_json(store):
    run = store.start_run("reduce", "3" * 64, {})
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    run.save_model("dense", {"in_features": 3}, sd, {"schema": {"k": 1}})
    meta, loaded = run.load_model_files()
    assert meta["kind"] == "dense" and meta["schema"] == {"k": 1} and meta["app"] == "reduce"
    assert torch.equal(loaded["a.weight"], sd["a.weight"])
    raw = run.read_bytes("model/weights.safetensors")
    header_len = int.from_bytes(raw[:8], "little")
    assert "a.weight" in json.loads(raw[8 : 8 + header_len])


def test_model_source_that_is_missing_or_not_a_model_says_so(tmp_path):
    """--model of a folder that does not exist (moved, a typo) said "... is not a run URI (expected
    .../runs/<app>/<run_id>)": about run URIs, when a model folder was meant."""
    from tasks.storage import open_model_source

    with pytest.raises(StorageError, match=r"--model .*gone/folder: no such run or model folder$"):
        open_model_source(str(tmp_path / "gone" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match=r"is neither a run \(.../runs/<app>/<run_id>\) nor a model folder "
                                           r"\(it holds no config.json \+ weights.safetensors\)"):
        open_model_source(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match="run .* does not exist"):  # a run URI keeps the run's message
        open_model_source(str(tmp_path / "runs" / "reduce" / "nope"))


def test_open_run_errors(tmp_path):
    with pytest.raises(StorageError, match="not a run URI"):
        open_run(str(tmp_path))
    with pytest.raises(StorageError, match="does not exist"):
        open_run(str(tmp_path / "runs" / "reduce" / "nope"))
    store = ArtifactStore(str(tmp_path))
    run = store.start_run("reduce", "4" * 64, {})
    with pytest.raises(StorageError, match="not complete"):
        open_run(run.uri)


def test_missing_bucket_is_reported(s3_endpoint):
    store = ArtifactStore("s3://no-such-bucket-aeflow/prefix")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-aeflow' does not exist"):
        store.check_writable()


def test_invalid_run_id(tmp_path):
    with pytest.raises(StorageError, match="invalid run id"):
        ArtifactStore(str(tmp_path)).run("reduce", "../escape")
