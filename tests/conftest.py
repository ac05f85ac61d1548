"""Shared fixtures: real components started by the tests themselves.

- one Prefect API server for the session (``prefect_test_harness``),
- one Dask ``LocalCluster`` (2 worker processes) for the session,
- one S3 endpoint (moto's ``ThreadedMotoServer`` on 127.0.0.1) for the session,
- small tables synthesised from scikit-learn's bundled datasets.
"""

from __future__ import annotations

import os
import socket

# No network here: keep Prefect from phoning home. Set before anything imports prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

import pandas as pd
import pytest

from tasks.apps import load_all
from tasks.sample_data import sample_frame

# `aeflow run`'s commands are built when first used (flows/cli/run.py), and importing the applications
# sets up Prefect's logging, whose console handler keeps the stderr of that moment. Import them now, not
# inside the first CliRunner invocation, whose captured stream is closed when it returns (a later log line
# would print "--- Logging error ---" with a traceback into another test's output).
load_all()

TEST_BUCKET = "aeflow-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _no_default_flow_heartbeats():
    """In-process flow runs skip Prefect's default heartbeat thread, as the ``aeflow`` CLI does
    (``tasks.prefect_utils.no_default_flow_heartbeats``): about a second per flow run."""
    from tasks.prefect_utils import no_default_flow_heartbeats

    with no_default_flow_heartbeats():
        yield


@pytest.fixture(autouse=True)
def _no_leaked_dask_scheduler():
    """Each test starts with the dask scheduler setting it would have alone.

    A distributed ``Client`` sets ``scheduler="dask.distributed"`` and restores the old value only when
    it is the last live client to close; two clients whose lives overlap (a test's own and a run's)
    leave it set to a closed cluster, and a later test computing "locally" then failed only in the full
    suite. The CLI is one process per command, so only tests met it.
    """
    import dask

    before = dask.config.get("scheduler", None)
    yield
    if dask.config.get("scheduler", None) == before:
        return
    try:
        from distributed.client import _get_global_client

        live = _get_global_client() is not None
    except ImportError:
        live = False
    if not live:
        if before is None:
            dask.config.config.pop("scheduler", None)
        else:
            dask.config.set(scheduler=before)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_address(s3_endpoint):
    """A real Dask LocalCluster with 2 worker processes; flows connect via dask_address.

    Workers read S3 credentials from their environment, as in production, so the
    S3 endpoint's variables are set before the worker processes start.
    """
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, with credentials in the environment as s3fs reads them."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(TEST_BUCKET)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem()


@pytest.fixture(scope="session")
def digits_frame() -> pd.DataFrame:
    """400 rows of scikit-learn's digits: id, 64 pixels, target."""
    return sample_frame("digits").iloc[:400].reset_index(drop=True)


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory, digits_frame) -> str:
    path = tmp_path_factory.mktemp("data") / "digits.csv"
    digits_frame.to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="session")
def wine_parquet(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "wine.parquet"
    sample_frame("wine").to_parquet(path, index=False)
    return str(path)


def files_under(root) -> list[str]:
    """Every file below ``root`` (empty list if it does not exist)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def pytest_collection_modifyitems(config, items):
    """Markers that follow from what a test uses: ``s3`` for the moto S3 server, ``slow`` for a
    real flow run or the end-to-end tier (deselect both with ``-m "not slow"`` for a quick pass)."""
    import inspect

    for item in items:
        names = set(getattr(item, "fixturenames", ()))  # everything it uses, fixtures of fixtures included
        direct = set(inspect.signature(item.function).parameters) if hasattr(item, "function") else set()
        if direct & {"s3_endpoint", "s3fs_client"}:
            item.add_marker(pytest.mark.s3)
        if "prefect_server" in names or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)
    # The platform tier last: the tests that share `aeflow serve` (tests/e2e, package-scoped) then run
    # together and its idle server and polling runner stop before the rest of the suite, not at its end.
    items.sort(key=lambda item: "platform" in getattr(item, "fixturenames", ()))


FAST_TRAIN = {"train.epochs": 6, "train.patience": 3, "train.batch_size": 64}



@pytest.fixture(autouse=True)
def _claims_forgotten_after_each_test():
    """Claims a test's runs took and never gave back stop being refreshed when the test ends.

    Tests that drive the store directly (a writer opened and left unfinished, a failure simulated mid-run)
    end with the run still claimed by this process; the CLI's process would exit and its heartbeat thread
    with it, but pytest's lives on and rewrote those claims every 20 s for the rest of the session (on
    moto's S3 server too, into every later test's captured log). The files stay as the test left them,
    and, no attempt of this process holding them any more, they read as stale, as a dead process's would.
    """
    from tasks import storage

    with storage._ACTIVE_LOCK:
        before = set(storage._ACTIVE)
    yield
    with storage._BEAT_LOCK, storage._ACTIVE_LOCK:
        for key in [k for k in storage._ACTIVE if k not in before]:
            del storage._ACTIVE[key]
