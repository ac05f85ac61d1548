"""Object-store outages are one line (exit 4) naming the endpoint and the operation; nothing partial is
kept; the same command succeeds once the store is back. On a private moto S3 server that the tests
stop and restart (the session's server stays up for the other tests)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import InputError, StorageUnavailable
from tests.conftest import free_port
from tests.refusals import assert_refused, refusal

pytestmark = [pytest.mark.cli, pytest.mark.s3]
runner = CliRunner()
BUCKET = "aeflow-outage"
FAST = ["--epochs", "2", "--patience", "2", "--set", "train.threads=1"]


def _point_s3_at(monkeypatch, endpoint: str) -> None:
    import s3fs

    # One attempt per request (botocore retries refused connections with backoff otherwise): the
    # outage is met sooner, which changes nothing but the test's duration.
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def store_server(monkeypatch):
    """A moto S3 server of this test only: ``(endpoint, stop, start)``."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    servers = []

    def start() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    def stop() -> None:
        servers[-1].stop()

    start()
    endpoint = f"http://127.0.0.1:{port}"
    _point_s3_at(monkeypatch, endpoint)
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield endpoint, stop, start
    stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def thread_cluster():
    """Dask workers as threads of this process: they see the endpoint the test points s3fs at."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


def _table(tmp_path) -> str:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(80, 4)), columns=list("abcd"))
    df.to_csv(tmp_path / "t.csv", index=False)
    return str(tmp_path / "t.csv")


@refusal("an object store that cannot be reached, at the start or mid-run (the message names endpoint and "
         "operation; rerun when it is back)", 4, "storage")
def test_unreachable_at_the_start_is_one_line(prefect_server, monkeypatch, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    _point_s3_at(monkeypatch, closed)
    res = runner.invoke(app, ["run", "reduce", "--input", _table(tmp_path), "--output", f"s3://{BUCKET}/x", *FAST])
    assert_refused(res, test_unreachable_at_the_start_is_one_line,
                   f"error: cannot reach the artifact root s3://{BUCKET}/x: the object store at {closed} is unreachable "
                   "(connection refused)")
    # The input side says the same, and is not mistaken for bad input (exit 3).
    from tasks.config import LoadConfig
    from tasks.load import inspect_table

    with pytest.raises(StorageUnavailable, match=rf"cannot list s3://{BUCKET}/raw/\*.csv: the object store at {closed}"):
        inspect_table(f"s3://{BUCKET}/raw/*.csv", LoadConfig())


def test_cut_mid_run_then_rerun_after_it_returns(prefect_server, store_server, thread_cluster, monkeypatch, tmp_path):
    import s3fs

    from tasks.apps.tabular import TableApp

    endpoint, stop, start = store_server
    apply = TableApp.apply

    def apply_during_an_outage(self, ctx, fitted):
        stop()  # the store goes away after preprocessing, training and the model were written
        return apply(self, ctx, fitted)

    monkeypatch.setattr(TableApp, "apply", apply_during_an_outage)
    args = ["run", "reduce", "--input", _table(tmp_path), "--output", f"s3://{BUCKET}/root",
            "--dask-address", thread_cluster, "--json", *FAST]
    res = runner.invoke(app, args)
    assert res.exit_code == 4, res.output
    # apply's first I/O: reading back the prepared partition
    assert f"error: cannot read s3://{BUCKET}/root/runs/reduce/" in res.stderr
    assert f"/preprocessed/part.00000.parquet: the object store at {endpoint} is unreachable (connection refused); " \
           "run the same command again when it is back" in res.stderr
    assert "Traceback" not in res.output and res.stderr.count("error:") == 1

    monkeypatch.setattr(TableApp, "apply", apply)
    start()
    s3fs.S3FileSystem.clear_instance_cache()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_uri = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    fs = s3fs.S3FileSystem()
    runs = fs.ls(f"{BUCKET}/root/runs/reduce")
    assert len(runs) == 1 and run_uri.endswith(runs[0]), "the rerun resumes the same run folder"
    manifest = json.loads(fs.cat_file(f"{runs[0]}/manifest.json"))
    files = sorted(p[len(runs[0]) + 1:] for p in fs.find(runs[0]))
    assert files == sorted([o["path"] for o in manifest["outputs"]] + ["manifest.json"]), \
        "nothing partial is left: every file is a listed output (no claim, checkpoint or temporary file)"


def test_retries_retry_an_outage_but_never_bad_input(prefect_server):
    from prefect import flow, task

    from tasks.prefect_utils import IO_TASK

    calls = {"outage": 0, "bad": 0}

    @task(**{**IO_TASK, "retry_delay_seconds": 0})
    def flaky() -> str:
        calls["outage"] += 1
        if calls["outage"] < 3:
            raise StorageUnavailable("cannot read s3://b/k: the object store at http://x is unreachable")
        return "read"

    @task(**{**IO_TASK, "retry_delay_seconds": 0})
    def bad() -> None:
        calls["bad"] += 1
        raise InputError("t.csv: column 'a' has non-numeric values")

    @task(**{**IO_TASK, "retry_delay_seconds": 0})
    def down() -> None:
        raise StorageUnavailable("cannot read s3://b/k: the object store at http://x is unreachable")

    @flow
    def run_them() -> tuple:
        return flaky(), bad(return_state=True).result(raise_on_failure=False), \
            down(return_state=True).result(raise_on_failure=False)

    read, bad_error, outage = run_them()
    assert read == "read" and calls["outage"] == 3, "an outage is retried"
    assert isinstance(bad_error, InputError) and calls["bad"] == 1, "bad input is never retried"
    assert isinstance(outage, StorageUnavailable), "after the retries, the error is the one line"


@refusal("Prefect's temporary API server (no PREFECT_API_URL) not answering within "
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (aeflow's default 180 s; Prefect's 20 s failed on a "
         "busy machine); the message names the setting and `aeflow platform up`", 4, "storage")
def test_a_temporary_prefect_server_that_does_not_start_in_time_is_one_line(tmp_path):
    """It was a RuntimeError with a traceback, exit 1, "a bug" (two walkthroughs met it at load 4-10). A timeout
    of 0 s makes Prefect give up before its server could answer: the same path, for real, at once."""
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    aeflow = os.path.join(os.path.dirname(sys.executable), "aeflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    data = _table(tmp_path)
    for args in (["run", "reduce", "-i", data, "-o", str(tmp_path / "out"), "--json", *FAST],
                 ["backfill", "reduce", "-i", str(tmp_path / "{date}.csv"), "--start", "2026-01-01", "--end",
                  "2026-01-02", "-o", str(tmp_path / "out"), "--json"]):
        p = subprocess.run([aeflow, *args], env=env, capture_output=True, text=True, timeout=300)
        res = SimpleNamespace(exit_code=p.returncode, stderr=p.stderr, output=p.stdout + p.stderr)
        assert_refused(res, test_a_temporary_prefect_server_that_does_not_start_in_time_is_one_line,
                       "Prefect's temporary API server (started because PREFECT_API_URL is unset) did not answer "
                       "within 0 s", "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher",
                       "`aeflow platform up` starts one")
        assert json.loads(p.stdout) == {"error": json.loads(p.stdout)["error"], "kind": "storage", "exit_code": 4}
        assert not (tmp_path / "out").exists()


def test_settings_refused_without_the_data_are_refused_before_prefect_starts(tmp_path):
    """A device this machine lacks and an id column named like an output column were refused inside the flow,
    after Prefect's temporary server had started (8 s; minutes under load). With a server that cannot start
    (a 0 s timeout), the refusal itself is what the user gets: it came first."""
    import os
    import subprocess
    import sys

    aeflow = os.path.join(os.path.dirname(sys.executable), "aeflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    data = _table(tmp_path)
    for extra, message in ((["--device", "tpu"], "'tpu' is not a device"),
                           (["--id-column", "z_0"], "--id-column 'z_0' is also the name of a column that reduce writes")):
        p = subprocess.run([aeflow, "run", "reduce", "-i", data, "-o", str(tmp_path / "out"), *extra], env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert "temporary" not in p.stderr, p.stderr


def test_the_cli_gives_prefects_temporary_server_three_minutes_unless_told(monkeypatch):
    """main() sets the start-up timeout only where the environment does not: a user's own value is kept."""
    import os
    import sys

    from flows.cli import EPHEMERAL_STARTUP_TIMEOUT_S, main

    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.setattr(sys, "argv", ["aeflow", "--help"])
    for given, expected in ((None, str(EPHEMERAL_STARTUP_TIMEOUT_S)), ("45", "45")):
        if given is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, given)
        with pytest.raises(SystemExit):
            main()
        assert os.environ[key] == expected
    assert EPHEMERAL_STARTUP_TIMEOUT_S >= 120
