"""extract, detect and impute end to end on a real Prefect server and Dask cluster, on a tiny
mixed (numeric + categorical) table; outputs read back and checked."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from flows.pipeline import FLOWS
from tasks.apps import get_app
from tasks.apps.detect import BASELINES
from tasks.config import resolve_config
from tasks.storage import open_run
from tests.conftest import FAST_TRAIN

pytestmark = [pytest.mark.flows, pytest.mark.tabular]
FAST = {**FAST_TRAIN, "train.epochs": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny data gains nothing from thread pools, and on a small shared CI machine torch's and
    BLAS's pools spin against each other (10-30x slower here): one thread for these tests."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def mixed_frame(n: int = 150, seed: int = 0, anomalies: int = 10) -> pd.DataFrame:
    """id, four correlated numeric features, a categorical ``color`` tied to them, an integer
    ``count``, and ``label`` = 1 on the last ``anomalies`` rows (shifted far from the rest)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    color = np.where(t > 0.4, "red", np.where(t < -0.4, "blue", "green"))
    df = pd.DataFrame({
        "id": [f"r{i:03d}" for i in range(n)],
        "a": t + 0.1 * rng.normal(size=n),
        "b": 2 * t + 0.1 * rng.normal(size=n),
        "color": color,
        "c": -t + 0.1 * rng.normal(size=n),
        "count": (10 + 3 * t).round().astype("int64"),
        "label": 0,
    })
    if anomalies:
        idx = np.arange(n - anomalies, n)
        df.loc[idx, ["a", "b", "c"]] = rng.normal(size=(anomalies, 3)) * 4 + np.array([3.0, -6.0, 3.0])
        df.loc[idx, "label"] = 1
    return df


def run(app: str, **options):
    cfg = resolve_config(get_app(app).RunConfig, options={**FAST, **options})
    state = FLOWS[app](config=cfg, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tabular")
    df = mixed_frame()
    df.to_csv(d / "mixed.csv", index=False)
    return d, df


def _common(d, dask_address, **extra):
    return {"load.input": str(d / "mixed.csv"), "load.id_column": "id", "load.label_column": "label",
            "output": str(d / "artifacts"), "dask_address": dask_address, **extra}


# ---------------------------------------------------------------------------------------
# extract


def test_extract_features_metrics_and_reuse(prefect_server, dask_address, data, tmp_path):
    d, df = data
    res = run("extract", **_common(d, dask_address, **{"model.latent_dim": 3, "app.few_labels": [5]}))
    feats = pd.read_parquet(res.outputs["features"])
    assert list(feats.columns) == ["id", "f_0", "f_1", "f_2"]
    assert feats["id"].tolist() == df["id"].tolist()
    assert (feats[["f_0", "f_1", "f_2"]].dtypes == "float32").all() and np.isfinite(feats.iloc[:, 1:].to_numpy()).all()
    assert {"accuracy", "accuracy_5_per_class"} <= set(res.metrics)
    assert set(res.baselines) == {"raw", "pca"} and "accuracy" in res.baselines["pca"]
    assert 0.5 <= res.metrics["accuracy"] <= 1.0
    # the floor on these unbalanced labels (140 of 150 are 0), said with whether the features beat it (found by
    # the ninth walkthrough: 0.9786 against a majority share of 0.98 went unsaid)
    [floor] = [n for n in res.notes if n.startswith("always predicting the most frequent class")]
    assert "('0', 93.3% of the rows) scores accuracy 0.9333" in floor, floor
    assert ("is not above it" in floor) == (res.metrics["accuracy"] <= 140 / 150), floor

    # --model reuse on the same rows in another order and format: identical features.
    new = tmp_path / "new.parquet"
    df.iloc[::-1].to_parquet(new, index=False)
    again = run("extract", **{"model_run": res.run_uri, "load.apply_to": str(new), "output": str(d / "artifacts"),
                              "dask_address": dask_address})
    b = pd.read_parquet(again.outputs["features"])
    assert not any("do not apply with --model" in n for n in again.notes), "extract's evaluation trains with them"
    assert b["id"].tolist() == df["id"].iloc[::-1].tolist()
    np.testing.assert_allclose(b.set_index("id").loc[feats["id"]].to_numpy(), feats.set_index("id").to_numpy(), atol=1e-6)


@pytest.mark.parametrize("app, not_evaluated", [("extract", "downstream accuracy not evaluated"),
                                                 ("detect", "ROC-AUC and average precision not evaluated")])
def test_a_label_not_in_the_apply_to_data_is_said_so(prefect_server, dask_address, data, tmp_path, app, not_evaluated):
    """Trained on an input with the label, applied to data without it: the notes said "no label column"."""
    d, df = data
    nolabel = tmp_path / "new_nolabel.parquet"
    df.drop(columns=["label"]).to_parquet(nolabel, index=False)
    res = run(app, **_common(d, dask_address, **{"load.apply_to": str(nolabel), "model.latent_dim": 3},
                             **({"app.min_steps": 0} if app == "detect" else {})))
    assert len(pd.read_parquet(res.outputs["features" if app == "extract" else "scores"])) == len(df)
    assert not any(n.startswith("no label column") for n in res.notes), res.notes
    assert f"label column 'label' is not in the --apply-to data ({nolabel}): {not_evaluated}" in res.notes, res.notes
    # and every folder the run wrote is in the README's "What a run writes" (preprocessed-apply/ was not)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    listed = readme[readme.index("## What a run writes"):].split("```")[1]
    for name in os.listdir(res.run_uri):
        assert (f"{name}/" if os.path.isdir(os.path.join(res.run_uri, name)) else name) in listed, name


# ---------------------------------------------------------------------------------------
# detect


def test_detect_notes_list_only_the_baselines_that_ran(prefect_server, dask_address, tmp_path):
    """On 14 rows pyod's AutoEncoder is skipped (it needs 64): the notes listed it among the baselines all the same."""
    path = tmp_path / "small.csv"
    mixed_frame(14, anomalies=3).to_csv(path, index=False)
    res = run("detect", **{"load.input": str(path), "load.id_column": "id", "load.label_column": "label",
                           "app.min_steps": 0, "output": str(tmp_path / "art"), "dask_address": dask_address})
    assert set(res.baselines) == set(BASELINES) - {"pyod_autoencoder"}, res.baselines
    [said] = [n for n in res.notes if n.startswith("anomalies: label 'label'")]
    assert "pyod's ECOD, COPOD and HBOS with their default settings" in said, said
    assert said.endswith("; not run: pyod's AutoEncoder (14 rows to fit on, it needs at least 64)"), said


def test_detect_threshold_semantics_baselines_and_reuse(prefect_server, dask_address, data):
    d, df = data
    res = run("detect", **_common(d, dask_address, **{"app.contamination": 0.1}))
    scores = pd.read_parquet(res.outputs["scores"])
    assert list(scores.columns) == ["id", "score", "is_anomaly"]
    assert scores["id"].tolist() == df["id"].tolist()
    assert scores["score"].dtype == "float64" and scores["is_anomaly"].dtype == bool
    meta = json.loads(open(os.path.join(res.run_uri, "model", "config.json")).read())
    thr = meta["state"]["threshold_"]
    assert (scores["is_anomaly"] == (scores["score"] > thr)).all(), "is_anomaly means score > threshold_"
    # threshold_ is the training scores' 90th percentile: ~10% of the training rows are above it.
    assert abs(scores["is_anomaly"].mean() - 0.1) <= 0.02
    assert res.metrics["threshold"] == pytest.approx(thr)
    assert {"roc_auc", "average_precision"} <= set(res.metrics)
    # a small table trains more epochs than asked (app.min_steps): the run's notes say so (they did not)
    assert any(n.startswith("training: up to ") and "app.min_steps=300" in n for n in res.notes), res.notes
    assert set(res.baselines) == set(BASELINES), "IsolationForest, PCA, ECOD, COPOD, HBOS, pyod AutoEncoder"
    assert all(0 <= b["roc_auc"] <= 1 and 0 <= b["average_precision"] <= 1 for b in res.baselines.values())
    assert res.metrics["roc_auc"] > 0.8, "the shifted rows score high"
    with open(res.outputs["histogram"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    again = run("detect", **{"model_run": res.run_uri, "load.apply_to": str(d / "mixed.csv"), "app.contamination": 0.3,
                             "output": str(d / "artifacts"), "dask_address": dask_address})
    s2 = pd.read_parquet(again.outputs["scores"])
    np.testing.assert_allclose(s2["score"], scores["score"], rtol=1e-6)
    assert (s2["is_anomaly"] == scores["is_anomaly"]).all(), "the fitted threshold_ travels with the model"
    # the settings given with --model that did nothing: the run says which (FAST's train.epochs=8; --contamination,
    # which fixes threshold_ at fit time, went unsaid)
    unused = [n for n in again.notes if n.startswith("settings for training a model do not apply with --model")]
    assert unused and "train.epochs=8" in unused[0] and "app.contamination=0.3" in unused[0], again.notes
    assert "model." not in unused[0], again.notes

    assert not any("is --positive-label the normal class" in n for n in res.notes)
    # (--positive-label "0" here names the normal rows: the notes say so)
    fixed = run("detect", **{"model_run": res.run_uri, "load.apply_to": str(d / "mixed.csv"), "app.threshold": 1e9,
                             "app.positive_label": "0", "output": str(d / "artifacts"), "dask_address": dask_address})
    assert not pd.read_parquet(fixed.outputs["scores"])["is_anomaly"].any(), "--threshold overrides threshold_"
    assert fixed.metrics["roc_auc"] < 0.2 and any("is --positive-label the normal class" in n for n in fixed.notes)


# ---------------------------------------------------------------------------------------
# impute


def test_impute_rounds_a_csv_column_of_integers_with_empty_cells(prefect_server, dask_address, tmp_path):
    # pandas reads "8", "", "9" as float64: impute filled it with 12.01 and 10.89 where the same column from
    # Parquet (Int64) was rounded, though README and --help say integer columns are rounded
    rng = np.random.default_rng(3)
    n = 2600
    z = rng.normal(size=n)
    df = pd.DataFrame({"id": np.arange(n), "a": z, "count": np.round(z * 3 + 10).astype(int),
                       "ratio": np.round(z * 3 + 10).astype(int) + 0.5, "late": np.round(z * 2).astype(int),
                       "b": 2 * z + rng.normal(size=n) * 0.1})
    holes = df.astype({c: object for c in ("count", "ratio", "late")})  # written as they are: 8, 10.5, empty
    for col in ("count", "ratio", "late"):
        holes.loc[rng.random(n) < 0.2, col] = np.nan
    holes.loc[2500, "late"] = 7.25  # a fraction past the sampled rows: that column is given back as float64
    path = tmp_path / "holes.csv"
    holes.to_csv(path, index=False)
    holes = pd.read_csv(path)
    assert ".0," not in path.read_text(), "integers are written as integers"
    res = run("impute", **{"load.input": str(path), "load.id_column": "id", "output": str(tmp_path / "art"),
                           "dask_address": dask_address, "app.members": 1, "app.extra_trees": False})
    out = pd.read_parquet(res.outputs["imputed"])
    assert str(out["count"].dtype) == "Int64" and not out["count"].isna().any()
    seen = holes["count"].notna()
    assert (out.loc[seen, "count"] == holes.loc[seen, "count"]).all()
    assert out.loc[~seen, "count"].between(df["count"].min() - 3, df["count"].max() + 3).all()
    # written with fractions (10.5): float64, filled as such
    assert str(out["ratio"].dtype) == "float64" and (out.loc[holes["ratio"].isna(), "ratio"] % 1 != 0).any()
    assert str(out["late"].dtype) == "float64" and out.loc[2500, "late"] == 7.25
    assert any("late" in n and "float64" in n for n in res.notes), res.notes


def test_impute_fills_only_missing_cells_with_the_input_dtypes(prefect_server, dask_address, data, tmp_path):
    d, full = data
    df = full.drop(columns=["label"])
    rng = np.random.default_rng(1)
    holes = df.copy()
    for col in ("a", "b", "color", "c", "count"):
        holes.loc[rng.random(len(df)) < 0.15, col] = None
    holes.loc[0, "count"] = None  # pandas then reads count as float64: that is its input dtype
    path = tmp_path / "holes.parquet"
    holes.to_parquet(path, index=False)
    original = pd.read_parquet(path)
    res = run("impute", **{"load.input": str(path), "load.id_column": "id", "output": str(tmp_path / "art"),
                           "dask_address": dask_address})
    out = pd.read_parquet(res.outputs["imputed"])
    assert list(out.columns) == list(original.columns)
    assert out.dtypes.astype(str).tolist() == original.dtypes.astype(str).tolist()
    assert out["id"].tolist() == original["id"].tolist()
    assert not out.isna().any().any(), "no nulls left"
    for col in ("a", "b", "color", "c", "count"):
        seen = original[col].notna()
        assert (out.loc[seen, col] == original.loc[seen, col]).all(), f"observed values of {col} unchanged"
    assert set(out["color"]) <= {"red", "green", "blue"}
    assert {"rmse", "accuracy"} <= set(res.metrics)
    assert set(res.baselines) == {"mean_mode", "knn", "iterative", "iterative_extratrees"}
    assert all(0 < b["rmse"] < 1 and 0 <= b["accuracy"] <= 1 for b in res.baselines.values())
    assert 0 < res.metrics["rmse"] < 1 and 0 <= res.metrics["accuracy"] <= 1

    # the same command again (another output root, so nothing is reused): the same model, metrics and output
    twin = run("impute", **{"load.input": str(path), "load.id_column": "id", "output": str(tmp_path / "twin"),
                            "dask_address": dask_address})
    assert twin.metrics == res.metrics and twin.baselines == res.baselines
    pd.testing.assert_frame_equal(pd.read_parquet(twin.outputs["imputed"]), out)
    with open(os.path.join(res.run_uri, "model", "weights.safetensors"), "rb") as a, \
            open(os.path.join(twin.run_uri, "model", "weights.safetensors"), "rb") as b:
        assert a.read() == b.read(), "identical weights"

    again = run("impute", **{"model_run": res.run_uri, "load.apply_to": str(path), "output": str(tmp_path / "art"),
                             "dask_address": dask_address})
    pd.testing.assert_frame_equal(pd.read_parquet(again.outputs["imputed"]), out)
    assert open_run(again.run_uri).manifest().model_run == res.run_uri
    assert not any("app.eval_rows" in n for n in again.notes), again.notes
    # A table larger than app.eval_rows is evaluated on a seeded sample (100,000 rows took minutes in KNN and the
    # iterative baselines), and the notes say so; the imputed table is still every row.
    sampled = run("impute", **{"model_run": res.run_uri, "load.apply_to": str(path), "output": str(tmp_path / "art"),
                               "app.eval_rows": 50, "dask_address": dask_address})
    pd.testing.assert_frame_equal(pd.read_parquet(sampled.outputs["imputed"]), out)
    said = [re.search(rf"a seeded sample of (\d+) of {len(df):,} rows \(app.eval_rows\)", n) for n in sampled.notes]
    assert [m for m in said if m and 0 < int(m.group(1)) <= 50], sampled.notes
    assert 0 < sampled.metrics["rmse"] < 1 and set(sampled.baselines) == set(res.baselines)
