"""Bad input to the tabular applications through the CLI: one clear message, the right exit
code, and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import files_under
from tests.flows.test_tabular_flows import mixed_frame, one_thread  # noqa: F401 (autouse fixture)
from tests.refusals import refusal

pytestmark = [pytest.mark.cli, pytest.mark.tabular]
runner = CliRunner()
FAST = ["--epochs", "3", "--patience", "2"]


def _invoke(args, dask_address):
    return runner.invoke(app, [*args, "--dask-address", dask_address, *FAST])


@refusal("null values in a feature column (except for impute)", 3, "table")
@pytest.mark.parametrize("name", ["detect", "extract"])
def test_nulls_are_refused_outside_impute(name, prefect_server, dask_address, tmp_path):
    df = mixed_frame(40, anomalies=0)
    df.loc[[4, 9], "b"] = np.nan
    df.to_csv(tmp_path / "t.csv", index=False)
    res = _invoke(["run", name, "--input", str(tmp_path / "t.csv"), "--output", str(tmp_path / "o")], dask_address)
    assert res.exit_code == test_nulls_are_refused_outside_impute.refusal.exit_code, res.output
    assert f"{tmp_path}/t.csv: column 'b' has null values: null at line 6, null at line 11 (use the impute " \
        "application for data with missing values)" in res.stderr
    assert "Traceback" not in res.output
    assert files_under(tmp_path / "o") == []


@refusal("an application option out of its range (e.g. detect --contamination outside (0, 0.5])", 2,
         "configuration")
@pytest.mark.parametrize("value", ["0", "-0.1", "0.6"])
def test_contamination_outside_the_open_closed_interval(value, tmp_path):
    mixed_frame(20).to_csv(tmp_path / "t.csv", index=False)
    res = runner.invoke(app, ["run", "detect", "--input", str(tmp_path / "t.csv"), "--contamination", value,
                              "--output", str(tmp_path / "o")])
    assert res.exit_code == test_contamination_outside_the_open_closed_interval.refusal.exit_code
    assert "app.contamination: Input should be" in res.stderr and f"(got {float(value)})" in res.stderr
    assert files_under(tmp_path / "o") == []


@refusal("a column with no observed value given to impute", 3, "table")
def test_all_null_column_given_to_impute(prefect_server, dask_address, tmp_path):
    df = mixed_frame(40, anomalies=0).assign(c=np.nan)
    df.loc[3, "a"] = np.nan
    df.to_parquet(tmp_path / "t.parquet", index=False)
    res = _invoke(["run", "impute", "--input", str(tmp_path / "t.parquet"), "--id-column", "id",
                   "--output", str(tmp_path / "o")], dask_address)
    assert res.exit_code == test_all_null_column_given_to_impute.refusal.exit_code, res.output
    assert "column 'c' is entirely null: there is no observed value to learn it from" in res.stderr
    assert not [f for f in files_under(tmp_path / "o") if f.endswith("manifest.json")]


def test_apply_to_columns_and_unseen_category_with_a_saved_model(prefect_server, dask_address, tmp_path):
    mixed_frame(60).to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "art"
    res = _invoke(["run", "detect", "--input", str(tmp_path / "train.csv"), "--id-column", "id",
                   "--label-column", "label", "--output", str(out), "--json"], dask_address)
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    before = files_under(out)

    wrong = mixed_frame(20).drop(columns=["b"]).assign(extra=1.0)
    wrong.to_parquet(tmp_path / "wrong.parquet", index=False)
    res = _invoke(["run", "detect", "--model", model, "--apply-to", str(tmp_path / "wrong.parquet"),
                   "--output", str(out)], dask_address)
    assert res.exit_code == 5
    assert "does not have the columns the model was trained on: missing ['b'] (expected features" in res.stderr
    assert "it has ['extra'], which the model was trained without (renamed?)" in res.stderr
    assert files_under(out) == before, "a failed run writes nothing"

    # An unseen category is not a crash: all-zero one-hot, scored, and a warning in the manifest.
    new = mixed_frame(20, seed=5)
    new.loc[0, "color"] = "teal"
    new.to_csv(tmp_path / "new.csv", index=False)
    res = _invoke(["run", "detect", "--model", model, "--apply-to", str(tmp_path / "new.csv"),
                   "--output", str(out), "--json"], dask_address)
    assert res.exit_code == 0, res.output
    run_uri = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    manifest = json.loads(open(f"{run_uri}/manifest.json").read())
    assert any("column 'color' has 1 value(s) of categories not seen at fit time (e.g. ['teal'])" in n
               for n in manifest["extra"]["notes"])
    scores = pd.read_parquet(f"{run_uri}/scores.parquet")
    assert scores["id"].tolist() == new["id"].tolist() and scores["score"].notna().all()


def test_label_column_given_when_applying_a_model_trained_without_one(prefect_server, dask_address, tmp_path):
    """`--model M --apply-to X --label-column label` on a model trained without a label left the label out
    ("the model was trained without them") and said "no label column: ROC-AUC ... not evaluated"."""
    mixed_frame(80, anomalies=0).drop(columns=["label"]).to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "art"
    res = _invoke(["run", "detect", "--input", str(tmp_path / "train.csv"), "--id-column", "id", "--output", str(out),
                   "--json"], dask_address)
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    mixed_frame(60, seed=3).to_csv(tmp_path / "today.csv", index=False)  # the last 10 rows anomalies, label 1
    res = _invoke(["run", "detect", "--model", model, "--apply-to", str(tmp_path / "today.csv"), "--output", str(out),
                   "--label-column", "label", "--json"], dask_address)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert run["metrics"]["roc_auc"] > 0.9, run["metrics"]
    with open(f"{run['run_uri']}/manifest.json") as f:
        notes = json.load(f)["extra"]["notes"]
    assert not [n for n in notes if "no label column" in n or "'label'" in n and "without" in n], notes
    before = files_under(out)
    # a label that the model reads as a feature, or that is not there, is refused before anything is written
    res = _invoke(["run", "detect", "--model", model, "--apply-to", str(tmp_path / "today.csv"), "--output", str(out),
                   "--label-column", "a"], dask_address)
    assert res.exit_code == 2 and "--label-column 'a' is one of the features the model was trained on" in res.stderr
    res = _invoke(["run", "detect", "--model", model, "--apply-to", str(tmp_path / "today.csv"), "--output", str(out),
                   "--label-column", "lable"], dask_address)
    assert res.exit_code == 3, res.output
    assert f"label column 'lable' not found in apply-to {tmp_path}/today.csv (did you mean 'label'?)" in res.stderr
    assert files_under(out) == before


def test_impute_never_rounds_observed_values_of_a_column_read_as_integers_at_fit_time(prefect_server, dask_address,
                                                                                       tmp_path):
    """A folder of Parquet parts whose integer column became float in a later part (schema drift), and data with
    fractions given to the model: imputed.parquet gave 45.5 back as 46 (the dtype sampled from the first part),
    silently changing observed values. Now the column comes back as float64 for the whole table (the schema
    sample spans the parts since the twelfth session, so the drift is seen there), and a model trained on
    integers given fractions says so in a note."""
    parts = tmp_path / "parts"
    parts.mkdir()
    first, later = mixed_frame(60, anomalies=0), mixed_frame(60, seed=1, anomalies=0)
    later["count"] = later["count"] + 0.5
    later["id"] = [f"s{i:03d}" for i in range(60)]
    later.loc[2, "count"] = np.nan
    first.to_parquet(parts / "part-0.parquet", index=False)
    later.to_parquet(parts / "part-1.parquet", index=False)
    out, quick = tmp_path / "art", ["--set", "app.members=1", "--set", "app.extra_trees=false", "--json"]
    res = _invoke(["run", "impute", "--input", str(parts), "--id-column", "id", "--label-column", "label",
                   "--output", str(out), *quick], dask_address)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])
    imputed = pd.read_parquet(f"{run['run_uri']}/imputed.parquet")  # one dtype for every part, or this fails
    assert imputed["count"].dtype == "float64"
    observed = later["count"].notna().to_numpy()
    assert imputed["count"].iloc[60:].to_numpy()[observed].tolist() == later["count"][observed].tolist()
    assert imputed["count"].iloc[:60].tolist() == first["count"].astype("float64").tolist()
    held = f"holds {later['count'].iloc[0]:g}: imputed.parquet gives it as float64"

    # a model trained on integers, given fractions: the same
    first.to_parquet(tmp_path / "ints.parquet", index=False)
    res = _invoke(["run", "impute", "--input", str(tmp_path / "ints.parquet"), "--id-column", "id",
                   "--label-column", "label", "--output", str(out), *quick], dask_address)
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    assert pd.read_parquet(f"{model}/imputed.parquet")["count"].dtype == "int64", "integers stay integers"
    later.to_parquet(tmp_path / "new.parquet", index=False)
    res = _invoke(["run", "impute", "--model", model, "--apply-to", str(tmp_path / "new.parquet"),
                   "--output", str(out), *quick], dask_address)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])
    applied = pd.read_parquet(f"{run['run_uri']}/imputed.parquet")
    assert any(f"column 'count' was read as int64 at fit time but {held}" in n for n in run["notes"]), run["notes"]
    assert applied["count"].to_numpy()[observed].tolist() == later["count"][observed].tolist()
    assert applied["count"].notna().all()


def test_ids_of_data_given_to_a_model_need_not_have_the_training_ids_dtype(prefect_server, dask_address, tmp_path):
    """Integer ids at training, text ids in the data applied to (a new id scheme): ids are carried to the outputs,
    not read by the model, yet the run was refused with "column 'id' has values that are not int64"; in the
    training run itself with --apply-to as well as with --model."""
    train = mixed_frame(60, anomalies=0).assign(id=range(60))
    train.to_csv(tmp_path / "train.csv", index=False)
    new = mixed_frame(30, seed=2, anomalies=0)  # ids 'r000', ...
    new.to_csv(tmp_path / "new.csv", index=False)
    out, fast = tmp_path / "art", ["--set", "app.min_steps=10", "--json"]
    res = _invoke(["run", "detect", "--input", str(tmp_path / "train.csv"), "--apply-to", str(tmp_path / "new.csv"),
                   "--id-column", "id", "--output", str(out), *fast], dask_address)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert pd.read_parquet(f"{run['run_uri']}/scores.parquet")["id"].tolist() == new["id"].tolist()
    res = _invoke(["run", "detect", "--model", run["run_uri"], "--apply-to", str(tmp_path / "new.csv"),
                   "--output", str(out), *fast], dask_address)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert pd.read_parquet(f"{run['run_uri']}/scores.parquet")["id"].tolist() == new["id"].tolist()


def test_rows_without_a_label_left_out_of_the_metrics_are_counted_in_the_notes(prefect_server, dask_address,
                                                                                tmp_path):
    """Labels with gaps (string classes, some missing): the metrics silently counted only the labelled rows."""
    df = mixed_frame(60, anomalies=6).assign(label=lambda d: np.where(d["label"] == 1, "fraud", "ok"))
    df.loc[[1, 8, 15], "label"] = None
    df.to_parquet(tmp_path / "t.parquet", index=False)
    for name, options, said in (
        ("detect", ["--positive-label", "fraud", "--set", "app.min_steps=10"],
         "3 row(s) without a label (null 'label') left out of the ranking metrics"),
        ("extract", ["--cv-folds", "2", "--set", "app.few_labels=[2]", "--latent-dim", "2"],
         "3 row(s) without a label (null 'label') left out of the evaluation"),
    ):
        res = _invoke(["run", name, "--input", str(tmp_path / "t.parquet"), "--id-column", "id", "--label-column",
                       "label", "--output", str(tmp_path / "o"), "--json", *options], dask_address)
        assert res.exit_code == 0, res.output
        run = json.loads(res.stdout.strip().splitlines()[-1])
        assert said in run["notes"], run["notes"]
