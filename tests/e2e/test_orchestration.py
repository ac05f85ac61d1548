"""Deployments, schedules and backfills against a real ``prefect server start`` served by ``aeflow serve``."""

from __future__ import annotations

import datetime as dt
import json
import os
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from typer.testing import CliRunner

from tasks.storage import ArtifactStore, open_run
from tests.e2e.conftest import BAD_DAY, DAILY, write_partitions

pytestmark = [pytest.mark.e2e]
runner = CliRunner()


def _manifest_of(root, flow_run_id):
    for m in ArtifactStore(str(root)).list_runs():
        if m.extra.get("prefect", {}).get("flow_run_id") == str(flow_run_id):
            return m
    return None


def test_run_button_runs_a_deployment(served, digits_frame):
    """What the UI's Run button does: a flow run of the deployment with its default parameters."""
    dep = served.deployment("reduce")
    assert dep.enforce_parameter_schema
    assert {"aeflow", "reduce"} <= set(dep.tags)
    assert set(dep.parameter_openapi_schema["properties"]) == {"config", "date", "timezone"}
    with served.client() as c:
        fr = c.create_flow_run_from_deployment(dep.id)
    fr = served.wait_final(fr.id)
    assert fr.state.is_completed(), f"{fr.state}:\n{served.log_tail()}"
    assert fr.name.startswith("reduce-digits.csv-"), fr.name

    m = _manifest_of(served.workdir / "artifacts", fr.id)
    assert m is not None, "the run wrote a manifest that names its flow run"
    assert m.app == "reduce" and m.model_run is None and m.config["model"]["latent_dim"] == 2
    emb = pd.read_parquet(m.output_uri("embeddings.parquet"))
    assert emb["id"].tolist() == digits_frame["id"].tolist() and list(emb.columns) == ["id", "z_0", "z_1"]
    with served.client() as c:
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
        )

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    assert {a.type for a in arts} >= {"table", "markdown"}, "metrics table and summary are published"


def test_schedules_produce_runs_with_their_parameters(served):
    """The server's scheduler creates the cron runs, in the schedule's time zone, with its parameters."""
    import time

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    berlin = ZoneInfo("Europe/Berlin")
    for name, weekday, hour, minute in (("reduce-nightly", None, 2, 30), ("reduce-weekly-retrain", 0, 4, 0)):
        dep = served.deployment(name)
        runs = []
        for _ in range(30):
            with served.client() as c:
                runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            runs = [r for r in runs if r.state and r.state.type.value == "SCHEDULED" and r.auto_scheduled]
            if runs:
                break
            time.sleep(1)
        assert runs, f"{name}: no scheduled runs"
        for r in runs:
            local = r.expected_start_time.astimezone(berlin)
            assert (local.hour, local.minute) == (hour, minute), f"{name}: {local}"
            if weekday is not None:
                assert local.weekday() == weekday
            assert r.expected_start_time > dt.datetime.now(dt.UTC)
            assert r.parameters["timezone"] == "Europe/Berlin"
            assert r.parameters["config"]["skip_existing"] is True
        if name == "reduce-nightly":
            assert runs[0].parameters["config"]["model_run"] == "latest"
            assert runs[0].parameters["config"]["load"]["apply_to"] == "data/daily/{yesterday}/*.csv"


def test_nightly_run_reads_the_partition_of_its_scheduled_date(served):
    """A nightly run scheduled for 2026-11-03 02:30 Berlin applies the latest model to 2026-11-02's partition."""
    from prefect.states import Scheduled

    dep = served.deployment("reduce-nightly")
    slot = dt.datetime(2026, 11, 3, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    with served.client() as c:
        fr = c.create_flow_run_from_deployment(
            dep.id, parameters={"timezone": "Europe/Berlin"}, state=Scheduled(scheduled_time=slot)
        )
    fr = served.wait_final(fr.id)
    assert fr.state.is_completed(), f"{fr.state}:\n{served.log_tail()}"
    assert fr.name.startswith("reduce-2026-11-03-2026-11-02-"), fr.name  # the run date, then the partition read
    m = _manifest_of(served.workdir / "artifacts", fr.id)
    trained = [r for r in ArtifactStore(str(served.workdir / "artifacts")).list_runs("reduce") if not r.model_run]
    assert m.model_run == trained[-1].run_uri, "model_run: latest is the newest run that trained a model"
    assert m.inputs["apply_to"][0].path.endswith(os.path.join("daily", "2026-11-02", "part.csv"))
    assert m.config["load"]["apply_to"].endswith("daily/2026-11-02/*.csv")


@pytest.fixture(scope="module")
def bad_partitions(served, digits_frame):
    root = served.workdir / "bf"
    write_partitions(root, digits_frame, DAILY, bad=BAD_DAY)
    return root


def _backfill(served, *args):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import app

    with temporary_settings(updates={PREFECT_API_URL: served.api_url}):
        res = runner.invoke(app, ["backfill", "reduce", "--start", str(DAILY[0]), "--end", str(DAILY[-1]), "--json", *args])
    rows = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else []
    return res, {r["date"]: r for r in rows}


def test_backfill_in_process_with_a_bad_partition_then_rerun(served, bad_partitions, dask_address, digits_frame, tmp_path):
    out = tmp_path / "out"
    common = ["-i", f"{bad_partitions}/{{date}}/*.csv", "--id-column", "id", "--label-column", "target", "-o", str(out), "--parallel", "2",
              "--dask-address", dask_address, "--set", "train.epochs=3", "--set", "train.batch_size=64"]
    res, rows = _backfill(served, *common)
    assert res.exit_code == 1, res.output
    good = [str(d) for d in DAILY if d != BAD_DAY]
    assert [rows[d]["status"] for d in good] == ["completed", "completed"], rows
    bad = rows[str(BAD_DAY)]
    assert bad["status"] == "failed" and bad["run_uri"] == ""
    assert f"{BAD_DAY}/part.csv" in bad["message"] and "'twelve'" in bad["message"], bad["message"]
    done = {m.run_uri: m for m in ArtifactStore(str(out)).list_runs("reduce")}
    assert set(done) == {rows[d]["run_uri"] for d in good}, "the failed date left no complete run"
    assert len(os.listdir(out / "runs" / "reduce")) == 2, "the failed date left no directory either"
    for d in good:
        assert done[rows[d]["run_uri"]].inputs["input"][0].path.endswith(f"{d}/part.csv")
        # the flow run, as the server lists it (the JSON named only its id)
        assert rows[d]["flow_run_name"] == done[rows[d]["run_uri"]].extra["prefect"]["flow_run_name"] != "", rows[d]

    # the partition is repaired (the others are rewritten byte for byte); the same command redoes only that date
    # (without --dask-address, which is not part of a run's identity: that date's run has its own LocalCluster
    # of threads, as `aeflow run` would, not a shared cluster of worker processes started for the backfill)
    write_partitions(bad_partitions, digits_frame, DAILY, bad=None)
    at = common.index("--dask-address")
    res2, rows2 = _backfill(served, *common[:at], *common[at + 2:])
    assert res2.exit_code == 0, res2.output
    assert [rows2[d]["status"] for d in good] == ["skipped", "skipped"]
    assert [rows2[d]["run_uri"] for d in good] == [rows[d]["run_uri"] for d in good]
    assert rows2[str(BAD_DAY)]["status"] == "completed"
    redone = open_run(rows2[str(BAD_DAY)]["run_uri"]).manifest().extra["execution"]["dask"]
    assert redone["scheduler"] is None and redone["workers_are"] == "threads", redone
    assert len(ArtifactStore(str(out)).list_runs("reduce")) == 3


def test_backfill_via_deployment_creates_tagged_idempotent_runs(served, bad_partitions, digits_frame):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    # every partition readable, whether or not the in-process test above ran (and repaired it) first
    write_partitions(bad_partitions, digits_frame, DAILY, bad=None)
    args = ["--via-deployment", "reduce", "-i", "bf/{date}/*.csv"]
    res, rows = _backfill(served, *args, "--wait")
    assert res.exit_code == 0, res.output + served.log_tail()
    assert {r["status"] for r in rows.values()} == {"completed"}, rows
    with served.client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["backfill"])))
    runs = [r for r in runs if r.deployment_id is not None]
    assert len(runs) == 3
    assert sorted(r.parameters["date"] for r in runs) == [str(d) for d in DAILY]
    for r in runs:
        assert {"backfill", "reduce", "aeflow"} <= set(r.tags)
        assert r.idempotency_key and str(r.parameters["date"]) in r.idempotency_key
        assert r.parameters["config"]["load"]["input"] == "bf/{date}/*.csv"
        assert r.parameters["config"]["skip_existing"] is True
        assert r.parameters["config"]["model"]["latent_dim"] == 2, "the deployment's own parameters are kept"
        assert f"-{r.parameters['date']}-" in r.name
        assert rows[str(r.parameters["date"])]["flow_run_name"] == r.name, "the table names the run as it renamed itself"
        m = _manifest_of(served.workdir / "artifacts", r.id)
        assert m is not None and m.inputs["input"][0].path.endswith(f"{r.parameters['date']}/part.csv")
        row = rows[str(r.parameters["date"])]
        # run_uri is the run folder the flow run made (it was the flow run's UI address), read from its link artifact
        assert row["run_uri"] == m.run_uri and row["flow_run_url"].endswith(str(r.id)), row

    # a deployment of another application is refused before any flow run is created (it ran detect's deployment)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import app

    with temporary_settings(updates={PREFECT_API_URL: served.api_url}):
        wrong = runner.invoke(app, ["backfill", "reduce", "--via-deployment", "detect", "--start", str(DAILY[0]),
                                    "--end", str(DAILY[0])])
    assert wrong.exit_code == 2, wrong.output
    assert "deployment 'detect' runs flow 'detect', not 'reduce'" in " ".join(wrong.output.split()), wrong.output

    # the same backfill again creates nothing new
    res2, rows2 = _backfill(served, *args)
    assert res2.exit_code == 0, res2.output
    assert {d: r["flow_run_id"] for d, r in rows2.items()} == {d: r["flow_run_id"] for d, r in rows.items()}
    assert {r["status"] for r in rows2.values()} == {"skipped"}
    assert {d: r["run_uri"] for d, r in rows2.items()} == {d: r["run_uri"] for d, r in rows.items()}, \
        "a date skipped as done names the run folder its flow run made"
