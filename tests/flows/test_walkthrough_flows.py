"""Runs on the edge cases a CLI walkthrough hit (each crashed or misreported before): a model
applied to one row, a class of one row, a --positive-label that is no label value, a nullable
boolean column to impute, a validation value the training rows' scale cannot hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import FLOWS
from tasks.apps import get_app
from tasks.config import resolve_config
from tests.flows.test_tabular_flows import FAST, one_thread  # noqa: F401 - the module's one-thread fixture

pytestmark = [pytest.mark.flows, pytest.mark.tabular]


def _state(app, **options):
    cfg = resolve_config(get_app(app).RunConfig, options={**FAST, **options})
    return FLOWS[app](config=cfg, return_state=True)


def _run(app, **options):
    state = _state(app, **options)
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("walk")
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(120, 4)), columns=list("abcd"))
    df.insert(0, "id", np.arange(120))
    df["target"] = (df.a > 0).astype(int)
    df.to_csv(d / "t.csv", index=False)
    return d, df


def test_reduce_model_applied_to_one_row(prefect_server, dask_address, table):
    d, df = table
    common = {"output": str(d / "out"), "dask_address": dask_address, "load.id_column": "id"}
    trained = _run("reduce", **{"load.input": str(d / "t.csv"), **common})
    df.head(1).to_csv(d / "one.csv", index=False)
    res = _run("reduce", **{"model_run": trained.run_uri, "load.apply_to": str(d / "one.csv"), **common})
    assert "trustworthiness" not in res.metrics and np.isfinite(res.metrics["recon_mse"])
    assert any("trustworthiness not evaluated: 1 row" in n for n in res.notes), res.notes
    assert len(pd.read_parquet(res.outputs["embeddings"])) == 1


def test_extract_leaves_a_class_of_one_row_out_and_says_pca_was_skipped(prefect_server, dask_address, table):
    d, df = table
    rare = df.copy()
    rare.loc[5, "target"] = 7
    rare.to_csv(d / "rare.csv", index=False)
    res = _run("extract", **{"load.input": str(d / "rare.csv"), "load.id_column": "id", "load.label_column": "target",
                              "output": str(d / "out"), "dask_address": dask_address, "app.few_labels": [5]})
    assert res.metrics["accuracy"] > 0.6 and res.metrics["n_eval_rows"] == 119
    assert any("1 row(s) of class(es) with a single row left out" in n and "'7'" in n for n in res.notes), res.notes
    assert any("PCA baseline skipped: 16 components" in n for n in res.notes), res.notes  # k = 16 > 4 features
    assert "pca" not in res.baselines


def test_detect_names_the_label_values_when_the_positive_label_is_none_of_them(prefect_server, dask_address, table):
    d, _ = table
    res = _run("detect", **{"load.input": str(d / "t.csv"), "load.id_column": "id", "load.label_column": "target",
                             "app.positive_label": "yes", "output": str(d / "out"), "dask_address": dask_address})
    assert "roc_auc" not in res.metrics
    assert any("--positive-label 'yes' is none of label 'target''s values ('0', '1')" in n for n in res.notes), res.notes


def test_impute_keeps_a_nullable_boolean_column_boolean(prefect_server, dask_address, table):
    d, df = table
    holes = df.copy()
    flag = pd.array(holes.b > 0, dtype="boolean")
    flag[np.arange(len(holes)) % 9 == 0] = pd.NA
    holes["flag"] = flag
    holes.to_parquet(d / "holes.parquet", index=False)
    res = _run("impute", **{"load.input": str(d / "holes.parquet"), "load.id_column": "id", "output": str(d / "out"),
                             "dask_address": dask_address, "app.members": 1, "app.extra_trees": False})
    out = pd.read_parquet(res.outputs["imputed"])
    assert str(out["flag"].dtype) == "boolean" and not out["flag"].isna().any()
    kept = ~holes["flag"].isna().to_numpy()
    assert (out["flag"].to_numpy()[kept] == holes["flag"].to_numpy()[kept]).all()


def test_a_validation_value_beyond_the_training_scale_is_refused_before_training(prefect_server, dask_address, table):
    d, df = table
    # where the split puts row r: a run that writes its preprocessed partitions tells
    seen = _run("reduce", **{"load.input": str(d / "t.csv"), "load.id_column": "id", "output": str(d / "out"),
                              "dask_address": dask_address})
    part = pd.read_parquet(sorted(Path(seen.run_uri).glob("preprocessed/part.*.parquet"))[0])
    val_row = int(np.flatnonzero(part["__aeflow_val"].to_numpy())[0])
    far = df.copy()
    far.loc[val_row, "c"] = 1e20
    far.to_csv(d / "far.csv", index=False)
    state = _state("reduce", **{"load.input": str(d / "far.csv"), "load.id_column": "id", "output": str(d / "far-out"),
                                "dask_address": dask_address})
    assert state.is_failed()
    assert "column 'c' has the value 1e+20" in state.message and "--exclude the column" in state.message, state.message
    assert not list((d / "far-out").rglob("manifest.json")) and not list((d / "far-out").rglob("*.safetensors"))
