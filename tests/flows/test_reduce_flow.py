"""The reduce flow end to end on a real Prefect server and Dask cluster; outputs read back."""

from __future__ import annotations

import json
import os
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import FLOWS, RunResult
from tasks.apps.reduce import ReduceRunConfig
from tasks.config import resolve_config
from tasks.storage import ArtifactStore, open_run
from tests.conftest import FAST_TRAIN

pytestmark = [pytest.mark.flows]


def _config(**options):
    return resolve_config(ReduceRunConfig, options={**FAST_TRAIN, **options})


@pytest.fixture(scope="module")
def trained(prefect_server, dask_address, digits_csv, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reduce-out"))
    cfg = _config(**{"load.input": digits_csv, "load.label_column": "target", "load.id_column": "id",
                     "model.latent_dim": 3, "output": out, "dask_address": dask_address})
    state = FLOWS["reduce"](config=cfg, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), out, cfg


def test_outputs_read_back(trained, digits_frame):
    result, out, _ = trained
    assert isinstance(result, RunResult)
    emb = pd.read_parquet(result.outputs["embeddings"])
    assert list(emb.columns) == ["id", "z_0", "z_1", "z_2"]
    assert emb["id"].tolist() == digits_frame["id"].tolist(), "one row per input row, in input order"
    assert emb[["z_0", "z_1", "z_2"]].dtypes.eq("float32").all()
    assert np.isfinite(emb[["z_0", "z_1", "z_2"]].to_numpy()).all()
    assert emb[["z_0", "z_1", "z_2"]].std().min() > 1e-3, "codes are not collapsed"
    for key in ("embedding_plot", "training_plot", "summary"):
        assert os.path.getsize(result.outputs[key]) > 1000
    with open(result.outputs["embedding_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_manifest_records_everything(trained, digits_csv):
    result, out, cfg = trained
    m = open_run(result.run_uri).manifest()
    assert m.app == "reduce" and m.run_id == result.run_id
    assert m.inputs["input"][0].path == digits_csv and m.inputs["input"][0].hash.startswith("sha256:")
    assert m.config["model"]["latent_dim"] == 3
    assert {"torch", "prefect", "dask", "pandas"} <= set(m.versions)
    assert {"inspect", "preprocess", "train", "apply", "evaluate", "report"} <= set(m.timings)
    assert set(m.metrics) >= {"recon_mse", "trustworthiness"}
    assert set(m.baselines["pca"]) == {"recon_mse", "trustworthiness"}
    assert 0.5 < m.metrics["trustworthiness"] <= 1.0
    paths = {o.path for o in m.outputs}
    assert {"embeddings.parquet/part.00000.parquet", "model/config.json", "model/weights.safetensors",
            "report/summary.md"} <= paths
    assert not any(p.startswith("checkpoint/") for p in paths), "checkpoints are removed on success"
    for o in m.outputs:
        assert o.size == os.path.getsize(os.path.join(result.run_uri, o.path))
    assert m.extra["prefect"]["flow_run_id"]
    assert [r.run_id for r in ArtifactStore(out).list_runs("reduce")] == [result.run_id]


def test_model_reuse_gives_identical_embeddings(trained, dask_address, tmp_path, digits_frame):
    result, out, _ = trained
    new = tmp_path / "new.parquet"
    digits_frame.iloc[::-1].to_parquet(new, index=False)  # same rows, another order and format
    cfg = _config(**{"model_run": result.run_uri, "load.apply_to": str(new), "output": out, "dask_address": dask_address})
    r2 = FLOWS["reduce"](config=cfg)
    assert r2.run_id != result.run_id
    a = pd.read_parquet(result.outputs["embeddings"]).set_index("id")
    b = pd.read_parquet(r2.outputs["embeddings"])
    assert b["id"].tolist() == digits_frame["id"].iloc[::-1].tolist()
    np.testing.assert_allclose(b.set_index("id").loc[a.index].to_numpy(), a.to_numpy(), atol=1e-5)
    m2 = open_run(r2.run_uri).manifest()
    assert m2.model_run == result.run_uri
    assert "model/config.json" not in {o.path for o in m2.outputs}


def test_skip_existing_and_resume_after_interruption(prefect_server, dask_address, digits_csv, tmp_path):
    from models.dense import DenseAEConfig, DenseAutoencoder
    from models.training import TrainState, fit
    from tasks.load import inspect_table
    from tasks.train import settings_from

    out = str(tmp_path / "art")
    base = {"load.input": digits_csv, "load.label_column": "target", "load.id_column": "id", "output": out,
            "dask_address": dask_address,
            "train.epochs": 8, "train.patience": 100, "train.checkpoint_seconds": 0}
    first = FLOWS["reduce"](config=_config(**base))
    again = FLOWS["reduce"](config=_config(**base, skip_existing=True))
    assert again.skipped and again.run_id == first.run_id

    # Simulate a run of another config killed after epoch 4: only its marker and checkpoint exist.
    cfg = _config(**{**base, "train.epochs": 9})
    src = inspect_table(digits_csv, cfg.load)
    interrupted = ArtifactStore(out).start_run("reduce", cfg.fingerprint({"input": [f.hash for f in src.files]}), {})
    interrupted_created = datetime.fromisoformat(interrupted.read_json("_run.json")["created"])

    def checkpoint_then_die(state: TrainState) -> None:
        interrupted.save_checkpoint(*state.to_flat())
        if state.epoch == 4:
            raise KeyboardInterrupt

    m = cfg.model
    model = DenseAutoencoder(DenseAEConfig(64, m.latent_dim, hidden=m.hidden, activation=m.activation))
    x = pd.read_csv(digits_csv).drop(columns=["id", "target"]).to_numpy("float32")
    with pytest.raises(KeyboardInterrupt):
        fit(model, x, x[:10], settings_from(cfg.train), on_checkpoint=checkpoint_then_die)
    interrupted.discard()  # as run_app does when interrupted: outputs gone, checkpoint kept, claim released
    assert not interrupted.is_complete

    resumed = FLOWS["reduce"](config=cfg)
    assert resumed.run_id == interrupted.run_id, "the rerun continues the interrupted run"
    manifest = open_run(resumed.run_uri).manifest()
    assert manifest.extra["train"]["resumed_from_epoch"] == 4
    assert manifest.extra["train"]["epochs_run"] == 9
    # ... and says so (a resumed run looked like a fresh one, created when the last attempt started)
    assert manifest.extra["train"]["resumed"] is True and manifest.extra["train"]["resumed_from_step"] == 0
    marker_created = interrupted_created.isoformat()
    assert manifest.created.isoformat() == marker_created, "created: when the run's first attempt started"
    said = [n for n in resumed.notes if n.startswith("resumed: this run was started at ")]
    assert said and any("training went on from the checkpoint after epoch 4;" in n for n in resumed.notes), resumed.notes
    assert first.notes and not any(n.startswith("resumed:") for n in first.notes)
    assert open_run(first.run_uri).manifest().extra["train"]["resumed"] is False


def test_s3_input_and_output(prefect_server, dask_address, s3fs_client, digits_frame):
    from tests.conftest import TEST_BUCKET

    for i, start in enumerate((0, 200)):
        with s3fs_client.open(f"{TEST_BUCKET}/raw/2026-11-26/part{i}.parquet", "wb") as f:
            digits_frame.iloc[start : start + 200].to_parquet(f, index=False)
    cfg = _config(**{"load.input": f"s3://{TEST_BUCKET}/raw/2026-11-26/*.parquet", "load.id_column": "id",
                     "load.label_column": "target", "output": f"s3://{TEST_BUCKET}/aeflow-reduce", "model.latent_dim": 4,
                     "dask_address": dask_address, "train.stream": "on"})
    result = FLOWS["reduce"](config=cfg)
    assert result.run_uri.startswith(f"s3://{TEST_BUCKET}/aeflow-reduce/runs/reduce/")
    key = result.run_uri[len("s3://"):]
    manifest = json.loads(s3fs_client.cat_file(f"{key}/manifest.json"))
    assert [f["path"] for f in manifest["inputs"]["input"]] == [
        f"s3://{TEST_BUCKET}/raw/2026-11-26/part0.parquet", f"s3://{TEST_BUCKET}/raw/2026-11-26/part1.parquet"]
    parts = sorted(s3fs_client.ls(f"{key}/embeddings.parquet"))
    assert len(parts) == 2, "one output file per input partition (two input files)"
    emb = pd.read_parquet(f"{key}/embeddings.parquet", filesystem=s3fs_client)
    assert emb["id"].tolist() == list(range(400)) and emb.shape[1] == 5
    assert s3fs_client.exists(f"{key}/model/weights.safetensors")
    assert any("trained by streaming" in n for n in manifest["extra"]["notes"]), manifest["extra"]["notes"]
    assert [m.run_id for m in ArtifactStore(f"s3://{TEST_BUCKET}/aeflow-reduce").list_runs()] == [result.run_id]


def test_training_rows_over_the_memory_bound_stream(prefect_server, dask_address, tmp_path):
    """train.stream=auto with a 1 MB bound: 4,000 x 50 float32 rows (~640 kB of training rows) exceed half of it, so reduce
    trains from the prepared partitions; detect, whose fit needs its rows at hand, fits a seeded sample
    that fits the bound; both say so in their notes (detect also that its train.stream=on was read as auto). With the
    bound raised, the same data trains in memory."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(4000, 50)).astype("float32"), columns=[f"c{i}" for i in range(50)])
    df.insert(0, "id", np.arange(4000))
    df.to_parquet(tmp_path / "wide.parquet", index=False)
    base = {"load.input": str(tmp_path / "wide.parquet"), "load.id_column": "id", "output": str(tmp_path / "out"),
            "dask_address": dask_address, "train.epochs": 2, "train.memory_mb": 1}
    streamed = FLOWS["reduce"](config=_config(**base))
    notes = open_run(streamed.run_uri).manifest().extra["notes"]
    assert any("trained by streaming" in n for n in notes), notes
    emb = pd.read_parquet(streamed.outputs["embeddings"])
    assert emb["id"].tolist() == list(range(4000)) and np.isfinite(emb.filter(like="z_").to_numpy()).all()
    in_memory = FLOWS["reduce"](config=_config(**{**base, "train.memory_mb": 64}))
    assert not any("streaming" in n for n in open_run(in_memory.run_uri).manifest().extra["notes"])
    from tasks.apps.detect import DetectRunConfig

    # train.stream=on, which detect cannot do: read as auto, and the notes say so
    cfg = resolve_config(DetectRunConfig, options={**base, "train.epochs": 1, "app.min_steps": 0, "train.stream": "on"})
    detected = FLOWS["detect"](config=cfg)
    notes = open_run(detected.run_uri).manifest().extra["notes"]
    sampled = [n for n in notes if "fits in memory: on a seeded sample" in n]
    assert sampled and "of the 4,000 training rows" in sampled[0], notes
    assert any(n.startswith("train.stream=on read as auto: detect's fit needs its rows at hand") for n in notes), notes


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_excluded_columns_are_dropped_not_a_crash(prefect_server, dask_address, digits_frame, tmp_path, fmt):
    """--exclude / load.exclude_columns: the column (a text column here) never reaches the model.
    (Dask's from_map took the reader's `columns=` keyword as a selection of the partitions' columns,
    which no longer had the excluded one: every run with an exclusion failed with a KeyError.)"""
    frame = digits_frame.iloc[:300].assign(notes=[f"note {i}" for i in range(300)])
    path = tmp_path / f"with-notes.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    cfg = _config(**{"load.input": str(path), "load.id_column": "id", "load.exclude_columns": ["notes", "target"],
                     "model.latent_dim": 2, "output": str(tmp_path / "out"), "dask_address": dask_address})
    result = FLOWS["reduce"](config=cfg)
    emb = pd.read_parquet(result.outputs["embeddings"])
    assert list(emb.columns) == ["id", "z_0", "z_1"] and emb["id"].tolist() == frame["id"].tolist()
    with open(os.path.join(result.run_uri, "model", "config.json")) as f:
        features = [c["name"] for c in json.load(f)["schema"]["features"]]
    assert "notes" not in features and "target" not in features and len(features) == 64, features


@pytest.mark.parametrize("error, kept", [("input", False), ("crash", True)])
def test_a_failure_after_training_keeps_the_checkpoint_only_when_a_rerun_can_resume(
        prefect_server, dask_address, digits_csv, tmp_path, monkeypatch, error, kept):
    """Bad input found after training (as a clean reference was, at evaluation) recurs with the same command,
    and fixing it changes the fingerprint: its checkpoint was kept and listed as an interrupted run that 'the
    same command resumes' for ever (found by the ninth walkthrough). A crash (or Ctrl-C, an outage) keeps it."""
    from tasks.apps.reduce import Reduce
    from tasks.errors import InputError

    def fails(self, ctx, fitted):
        raise InputError("the reference is wrong") if error == "input" else RuntimeError("a bug")

    monkeypatch.setattr(Reduce, "evaluate", fails)
    out = tmp_path / "art"
    cfg = _config(**{"load.input": digits_csv, "load.label_column": "target", "output": str(out),
                     "dask_address": dask_address, "train.epochs": 2, "train.checkpoint_seconds": 0})
    with pytest.raises(InputError if error == "input" else RuntimeError):
        FLOWS["reduce"](config=cfg)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if kept:
        assert any(p.endswith("checkpoint/meta.json") for p in left) and not any(p.endswith("manifest.json") for p in left)
        assert [r for r in ArtifactStore(str(out)).incomplete_runs()], "listed by runs list --incomplete"
    else:
        assert left == [], left
