"""End-to-end fixtures: ``aeflow serve`` as a user runs it, and ``aeflow platform up``.

``aeflow serve --port P`` starts a real ``prefect server start`` (SQLite in its own
PREFECT_HOME), registers the deployments of the repository's ``prefect.yaml`` (a
copy whose training is shortened and which uses the session's Dask cluster) and
executes their runs. Everything it starts shares one process group, which the
teardown interrupts (Ctrl-C) and, should anything survive, kills.

``platform`` runs ``aeflow platform up`` (as ``python -m flows.platform``, the same
sub-app without loading the applications) once for the module that uses it, in a
directory under /tmp that PostgreSQL's unprivileged user can reach, and
``aeflow platform down`` after it; the directory (data and logs) is removed unless a
test failed or ``AEFLOW_KEEP_PLATFORM`` is set.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DAILY = [dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)]
BAD_DAY = DAILY[1]


@dataclass
class Served:
    api_url: str
    ui_url: str
    workdir: Path
    proc: subprocess.Popen
    log: Path

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def deployment(self, name: str) -> Any:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
        )

        with self.client() as c:
            found = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        assert len(found) == 1, f"deployment {name!r}: {found}"
        return found[0]

    def wait_final(self, flow_run_id: Any, timeout: float = 240.0) -> Any:
        """Poll a flow run until it is in a final state; fail with the serve log when it does not get there."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                fr = c.read_flow_run(flow_run_id)
                if fr.state is not None and fr.state.is_final():
                    return fr
                assert self.proc.poll() is None, f"aeflow serve exited early:\n{self.log_tail()}"
                time.sleep(0.3)
        pytest.fail(f"flow run {flow_run_id} not finished after {timeout:.0f}s (state {fr.state}):\n{self.log_tail()}")


def write_partitions(root: Path, frame, days: list[dt.date], bad: dt.date | None = None) -> None:
    """One CSV partition per day (``root/{date}/part.csv``); ``bad`` gets a non-numeric cell."""
    rows = len(frame) // len(days)
    for i, day in enumerate(days):
        part = frame.iloc[i * rows:(i + 1) * rows].copy()
        if day == bad:
            part = part.astype(object)
            part.iloc[3, 5] = "twelve"
        (root / day.isoformat()).mkdir(parents=True, exist_ok=True)
        part.to_csv(root / day.isoformat() / "part.csv", index=False)


def test_prefect_yaml(dest: Path, dask_address: str) -> Path:
    """The repository's prefect.yaml with short training and the session's Dask cluster."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for d in doc["deployments"]:
        cfg = d.setdefault("parameters", {}).setdefault("config", {})
        cfg.setdefault("train", {}).update({"epochs": 4, "patience": 2, "batch_size": 64})
        cfg["dask_address"] = dask_address
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


test_prefect_yaml.__test__ = False  # a helper, not a test


def _stop(proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> bool:
    """Ctrl-C ``aeflow serve``; SIGKILL whatever is left of it and of its server. True when it stopped on its own."""
    m = re.search(rb"prefect server pid (\d+)", log.read_bytes())
    server_pid = int(m.group(1)) if m else None
    clean = True
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
    for pgid in (proc.pid, server_pid):  # the serve group (flow run processes) and the server's group
        if pgid is None:
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.wait(10)
    return clean


@pytest.fixture(scope="package")
def served(tmp_path_factory, dask_address, digits_frame):
    """``aeflow serve`` on a free port with its own PREFECT_HOME, data and artifact root in a temp dir."""
    from flows.deploy import api_healthy

    work = tmp_path_factory.mktemp("served")
    (work / "artifacts" / "sample-data").mkdir(parents=True)
    digits_frame.to_csv(work / "artifacts" / "sample-data" / "digits.csv", index=False)
    write_partitions(work / "data" / "daily", digits_frame.drop(columns=["target"]), DAILY)
    spec = test_prefect_yaml(work / "prefect.yaml", dask_address)

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # schedule runs within seconds of registering a deployment, not after a minute
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    })
    env.pop("PREFECT_PROFILES_PATH", None)
    log = work / "serve.log"
    with open(log, "wb") as log_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--file", str(spec)],
            cwd=work, env=env, stdout=log_f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    s = Served(api_url, f"http://127.0.0.1:{port}", work, proc, log)
    try:
        deadline = time.monotonic() + 240
        names: set[str] = set()
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"aeflow serve exited with {proc.returncode}:\n{s.log_tail()}"
            if api_healthy(api_url):
                with s.client() as c:
                    names = {d.name for d in c.read_deployments()}
                if {"reduce", "reduce-nightly", "reduce-weekly-retrain"} <= names and b"Your deployments are being served" in log.read_bytes():
                    break
            time.sleep(1.0)
        else:
            pytest.fail(f"deployments not registered after 240s (have {sorted(names)}):\n{s.log_tail()}")
        yield s
    finally:
        clean = _stop(proc, log)
        still_up = api_healthy(api_url, timeout=1.0)
    assert clean, f"aeflow serve did not stop on Ctrl-C:\n{s.log_tail()}"
    assert not still_up, "the Prefect server outlived aeflow serve"


# ------------------------------------------------------------------------------------------
# The shared installation: `aeflow platform up` once per session (tests/e2e/test_platform.py)


PLATFORM_DEPLOYMENTS = ("reduce",)


class PlatformHandle:
    """A platform brought up by ``python -m flows.platform up`` (the ``aeflow platform`` sub-app) for the tests."""

    def __init__(self, directory: Path, env: dict[str, str], info: dict[str, Any]) -> None:
        self.dir = directory
        self.env = env
        self.info = info
        self.api_url = info["prefect_api_url"]

    # -- commands, as a user runs them -----------------------------------------------------
    def command(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.platform", *args, "--dir", str(self.dir)],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self, *extra: str) -> dict[str, Any]:
        """``up --json`` again (starts what is not running); fails the test with the output when it fails."""
        res = self.command("up", "--json", *extra)
        if res.returncode != 0:
            pytest.fail(f"platform up failed ({res.returncode}):\n{res.stderr[-4000:]}")
        self.info = json.loads(res.stdout)
        return self.info

    def state(self) -> Any:
        from flows.platform.core import load

        return load(self.dir)

    # -- clients ---------------------------------------------------------------------------
    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    @property
    def fs(self) -> Any:
        from flows.platform.components import s3_filesystem

        return s3_filesystem(self.state())

    def dask(self) -> Any:
        from distributed import Client

        return Client(self.info["dask_scheduler"], timeout=30)

    def log(self, name: str, n: int = 3000) -> str:
        from flows.platform.procs import tail

        return tail(self.dir / "logs" / f"{name}.log", n)

    def worker_logs(self, n: int = 2500) -> str:
        return "\n".join(f"--- {p.name}\n{self.log(p.stem, n)}" for p in sorted((self.dir / "logs").glob("prefect-worker-*.log")))

    # -- data, runs ------------------------------------------------------------------------
    def put_table(self, key: str, frame) -> str:
        """Write ``frame`` as CSV to s3://aeflow/KEY; return its URI."""
        uri = f"s3://{self.info['bucket']}/{key}"
        self.fs.pipe_file(uri, frame.to_csv(index=False).encode())
        return uri

    def deployment(self, name: str = "reduce") -> Any:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
        )

        with self.client() as c:
            found = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        assert len(found) == 1, f"deployment {name!r}: {found}"
        return found[0]

    def trigger(self, config: dict[str, Any], deployment: str = "reduce") -> Any:
        """What the UI's Run button does (with a custom config): a flow run of the deployment."""
        dep = self.deployment(deployment)
        with self.client() as c:
            return c.create_flow_run_from_deployment(dep.id, parameters={"config": config})

    def wait_final(self, flow_run_id: Any, timeout: float = 300.0) -> Any:
        deadline = time.monotonic() + timeout
        fr = None
        with self.client() as c:
            while time.monotonic() < deadline:
                fr = c.read_flow_run(flow_run_id)
                if fr.state is not None and fr.state.is_final():
                    return fr
                time.sleep(0.3)
        pytest.fail(f"flow run {flow_run_id} not final after {timeout:.0f}s (state {fr.state if fr else None}):\n"
                    f"{self.worker_logs()}")

    def task_runs(self, flow_run_id: Any) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as c:
            return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    def run_dir_of(self, input_uri: str) -> str | None:
        """The run directory (``bucket/artifacts/runs/reduce/ID``) whose marker or manifest names ``input_uri``."""
        fs = self.fs
        root = f"{self.info['output'].removeprefix('s3://')}/runs/reduce"
        if not fs.exists(root):
            return None
        for d in sorted(fs.ls(root, detail=False)):
            for name in ("_run.json", "manifest.json"):
                if fs.exists(f"{d}/{name}"):
                    doc = json.loads(fs.cat_file(f"{d}/{name}"))
                    if doc["config"]["load"]["input"] == input_uri:
                        return d
        return None

    def manifest_of(self, flow_run_id: Any) -> dict[str, Any] | None:
        fs = self.fs
        for path in fs.glob(f"{self.info['output'].removeprefix('s3://')}/runs/*/*/manifest.json"):
            doc = json.loads(fs.cat_file(path))
            if doc.get("extra", {}).get("prefect", {}).get("flow_run_id") == str(flow_run_id):
                return doc
        return None


def platform_deploy_file(dest: Path) -> Path:
    """The repository's prefect.yaml, only the deployments the tests use, schedules off (no 02:30 runs in CI)."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    doc["deployments"] = [d for d in doc["deployments"] if d["name"] in PLATFORM_DEPLOYMENTS]
    for d in doc["deployments"]:
        for s in d.get("schedules") or []:
            s["active"] = False
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def _platform_missing() -> str | None:
    from flows.platform.components import pg_bindir, weed_binary
    from tasks.errors import PlatformError

    try:
        pg_bindir()
        weed_binary()
    except PlatformError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def platform(request):
    """``aeflow platform up`` in a directory under /tmp (PostgreSQL's user must reach it), down at the end.

    Module-scoped: one platform for tests/e2e/test_platform.py, stopped before the rest of the
    suite runs (its idle servers and polling workers would otherwise slow every later test).
    """
    import tempfile

    missing = _platform_missing()
    if missing:
        pytest.skip(f"the platform tier needs PostgreSQL and SeaweedFS: {missing}")
    directory = Path(tempfile.mkdtemp(prefix="aeflow-platform-", dir="/tmp"))
    directory.chmod(0o755)
    spec = platform_deploy_file(directory / "prefect.yaml")
    env = dict(os.environ)
    env.update({
        "PREFECT_LOGGING_LEVEL": "INFO",  # the worker logs say which worker ran which flow run
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # a new schedule's first run within seconds
        "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",  # workers are seen to reconnect within seconds
    })
    for k in [k for k in env if k.startswith("AWS_")]:  # the session's moto endpoint is not the platform's
        env.pop(k)
    res = subprocess.run(
        [sys.executable, "-m", "flows.platform", "up", "--dir", str(directory), "--workers", "2", "--dask-workers", "2",
         "--poll-seconds", "1", "--file", str(spec), "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    if res.returncode != 0:
        subprocess.run([sys.executable, "-m", "flows.platform", "down", "--dir", str(directory)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
        pytest.fail(f"aeflow platform up failed ({res.returncode}):\n{res.stderr[-6000:]}")
    handle = PlatformHandle(directory, env, json.loads(res.stdout))
    with handle.dask() as client:
        client.get_task_stream()  # installs the scheduler's task-stream recorder the tests read
    try:
        yield handle
    finally:
        down = handle.command("down", timeout=300)
    assert down.returncode == 0, down.stderr
    if request.session.testsfailed == 0 and not os.environ.get("AEFLOW_KEEP_PLATFORM"):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)  # kept, with its logs, when a test failed
