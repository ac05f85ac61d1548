"""``aeflow backfill`` and ``aeflow serve`` refuse bad arguments with one clear message, before running anything."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = [pytest.mark.cli]
runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["reduce", "-i", "raw/day.csv", "--start", "2026-11-01", "--end", "2026-11-02"], 2, "has no date field"),
        (["reduce", "--start", "2026-11-01", "--end", "2026-11-02"], 2, "--input-template is required"),
        (["reduce", "-i", "raw/{date}.csv", "--start", "2026-11-05", "--end", "2026-11-02"], 2, "is before start date"),
        (["reduce", "-i", "raw/{date}.csv", "--start", "2026-11-31", "--end", "2026-12-02"], 2, "invalid date '2026-11-31': not a day of the calendar"),
        # an unknown application is a bad argument, exit 2 as `aeflow run nope` (it was 5, "does not fit the model")
        (["nope", "-i", "raw/{date}.csv", "--start", "2026-11-01", "--end", "2026-11-02"], 2, "unknown application 'nope'"),
        # options that would do nothing are refused (they were silently ignored)
        (["reduce", "-i", "raw/{date}.csv", "--start", "2026-11-01", "--end", "2026-11-02", "--wait"], 2,
         "--wait only applies with --via-deployment"),
        (["reduce", "--via-deployment", "reduce", "--start", "2026-11-01", "--end", "2026-11-02", "--parallel", "2"], 2,
         "--parallel only applies in process"),
        (["reduce", "-i", "raw/{date}.csv", "--start", "2026-11-01", "--end", "2026-11-02", "--set", "train.epochs=0"], 2,
         "train.epochs"),
        # a typo in --end (2126) queued 36,525 dates; a long backfill raises --max-dates
        (["reduce", "-i", "raw/{date}.csv", "--start", "2026-01-01", "--end", "2126-01-01"], 2,
         "is 36,525 dates, more than --max-dates 1,000"),
        (["reduce", "--via-deployment", "reduce", "--start", "2026-01-01", "--end", "2026-01-03", "--max-dates", "2"], 2,
         "is 3 dates, more than --max-dates 2"),
    ],
)
def test_backfill_rejects_bad_arguments(args, code, message):
    res = runner.invoke(app, ["backfill", *args])
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.replace("│", " ").split()), res.output
    # one `error:` line, not typer's usage box; with --json also the error object on stdout (the refusals of
    # --wait, --parallel, --max-dates, a template without a date field printed no JSON: the 12th walkthrough)
    assert res.stderr.count("error:") == 1 and "Usage:" not in res.output, res.output
    res = runner.invoke(app, ["backfill", *args, "--json"])
    assert res.exit_code == code, res.output
    got = json.loads(res.stdout)
    assert got["exit_code"] == code and got["kind"] == "configuration" and message in got["error"], res.stdout


def test_backfill_help_says_each_date_has_its_own_local_cluster():
    res = runner.invoke(app, ["backfill", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    text = " ".join(res.output.replace("│", " ").split())
    assert "one LocalCluster for the backfill" not in text
    assert "each date's run starts its own LocalCluster" in text, text


def test_serve_rejects_a_missing_file_and_an_unreachable_server(tmp_path):
    res = runner.invoke(app, ["serve", "--file", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["serve", "--api-url", "http://127.0.0.1:9/api"])
    assert res.exit_code == 4 and "no healthy Prefect server at http://127.0.0.1:9/api" in res.output


def test_backfill_through_a_deployment_overrides_only_what_was_given(tmp_path):
    """-i and --set change those keys; the deployment's other parameters (id column, latent size) stay."""
    from flows.backfill import _deep_merge, explicit_overrides

    (tmp_path / "c.yaml").write_text("train: {batch_size: 32}\n")
    over = explicit_overrides(tmp_path / "c.yaml", {"load.input": "s3://b/{date}.csv", "load.id_column": None},
                              ["train.epochs=3", "model.hidden=[32]"])
    assert over == {"load": {"input": "s3://b/{date}.csv"}, "train": {"batch_size": 32, "epochs": 3}, "model": {"hidden": [32]}}
    base = {"load": {"input": "x.csv", "label_column": "target", "id_column": "id"}, "model": {"latent_dim": 2},
            "train": {"epochs": 30, "patience": 5}}
    assert _deep_merge(base, over) == {
        "load": {"input": "s3://b/{date}.csv", "label_column": "target", "id_column": "id"},
        "model": {"latent_dim": 2, "hidden": [32]},
        "train": {"epochs": 3, "patience": 5, "batch_size": 32},
    }


def test_backfill_wait_says_which_runs_wait_for_the_training_slot(prefect_server):
    """`backfill --via-deployment --wait`'s progress line: a run whose fit task waits for the `training` slot is
    RUNNING to Prefect; it is counted as waiting for the slot (the wait was silent: the eighth walkthrough)."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    from flows.backfill import waiting_summary

    @flow(name="slot-summary")
    def f():
        pass

    @task(name="fit", tags=["training"])
    def fit():
        pass

    with get_client(sync_client=True) as c:
        waiting, training = (c.create_flow_run(f, state=Running()) for _ in range(2))
        c.create_task_run(fit, waiting.id, "fit-0", state=Pending())  # waits for the slot
        c.create_task_run(fit, training.id, "fit-0", state=Running())  # trains
        ids = [str(waiting.id), str(training.id)]
        assert waiting_summary(c, ["running", "running", "scheduled"], ids) == \
            "1 running, 1 waiting for a 'training' slot, 1 scheduled"
        assert waiting_summary(c, ["running"], ids[1:]) == "1 running"
        assert waiting_summary(c, ["scheduled", "pending"], []) == "1 scheduled, 1 pending"
