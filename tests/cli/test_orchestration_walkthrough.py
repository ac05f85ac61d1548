"""Defects of the orchestration walkthrough (backfill, serve, platform), each pinned by a test.

The Ctrl-C tests run ``aeflow backfill`` in a subprocess in its own process group, as a terminal
would, with the application's flow replaced by a stand-in that only sleeps (so they take seconds):
what is tested is the backfill's own handling of the interrupt, not a flow's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = [pytest.mark.cli]
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

# A stand-in for the reduce flow: marks its date started, then sleeps in small steps (so an interrupt
# lands between them) for `seconds`, then marks it finished. STUBBORN: it swallows the first interrupt.
_DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import flows.backfill as bf
    import flows.pipeline as pipeline

    marks = Path(sys.argv[1])
    stubborn = sys.argv[2] == "stubborn"

    class _State:
        def __init__(self, day):
            self.day = day
            self.state_details = None
        def is_completed(self):
            return True
        def result(self):
            class R:
                skipped = False
                run_uri = f"file://done/{self.day}"
            return R()

    def fake_flow(config, date, return_state):
        (marks / f"started-{date}").touch()
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:
                if not stubborn:
                    raise
        (marks / f"finished-{date}").touch()
        return _State(date)

    pipeline.FLOWS = {"reduce": fake_flow}
    bf._connect_once = lambda: None  # no Prefect server needed by the stand-in
    from flows.cli import app
    app(sys.argv[3:], prog_name="aeflow")
    """
)


def _backfill_then_ctrl_c(tmp_path: Path, mode: str, signals: int, sig: int = signal.SIGINT) -> tuple[int, str, float]:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "driver.py").write_text(_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1", COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(tmp_path / "driver.py"), str(marks), mode, "backfill", "reduce", "-i", "d/{date}.csv",
           "--start", "2026-11-01", "--end", "2026-11-03", "-o", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: what a terminal's Ctrl-C reaches
    try:
        deadline = time.monotonic() + 60
        while not (marks / "started-2026-11-01").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (marks / "started-2026-11-01").exists(), proc.communicate(timeout=5)[0][-3000:] if proc.poll() is not None else ""
        t0 = time.monotonic()
        for i in range(signals):
            if i:
                time.sleep(0.5)
            os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=15)  # the bug: every queued date ran first (60 s here)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert not (marks / "started-2026-11-02").exists(), "a queued date was started after Ctrl-C"
    assert not (marks / "started-2026-11-03").exists(), "a queued date was started after Ctrl-C"
    assert not (marks / "finished-2026-11-01").exists(), "the running date was not interrupted"
    return proc.returncode, rest, took


def test_ctrl_c_stops_an_in_process_backfill_promptly(tmp_path):
    code, output, took = _backfill_then_ctrl_c(tmp_path, "plain", signals=1)
    assert code == 130, output[-3000:]
    assert took < 10, f"{took:.1f} s from Ctrl-C to exit"
    text = " ".join(output.split())
    assert "interrupted: 3 date(s) not done; run the same command again" in text, output[-3000:]
    # the table so far: the running date interrupted, the queued ones not run
    assert "2026-11-01 │ interrupted" in output and "2026-11-03 │ not run" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_sigterm_stops_an_in_process_backfill_as_ctrl_c_does_with_exit_143(tmp_path):
    """`kill`, systemd or a container's stop: the default action ended the backfill on the spot (no table,
    no message, the running date's claim left to go stale)."""
    code, output, took = _backfill_then_ctrl_c(tmp_path, "plain", signals=1, sig=signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert took < 10, f"{took:.1f} s from SIGTERM to exit"
    text = " ".join(output.split())
    assert "terminated: 3 date(s) not done; run the same command again" in text, output[-3000:]
    assert "2026-11-01 │ interrupted" in output and "2026-11-03 │ not run" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_second_ctrl_c_ends_a_backfill_whose_date_does_not_stop(tmp_path):
    """The running date swallows the interrupt (as a blocking call could): the second Ctrl-C leaves at once."""
    code, output, took = _backfill_then_ctrl_c(tmp_path, "stubborn", signals=2)
    assert code == 130, output[-3000:]
    assert took < 10, f"{took:.1f} s from Ctrl-C to exit"
    assert "interrupted again: exiting now" in output, output[-3000:]


# ------------------------------------------------------------------------------------------
# --via-deployment: the deployment must run APP; an unreachable server is one line, exit 4


class _FakeClient:
    """The few client calls of a backfill through a deployment; records the flow runs it would create."""

    def __init__(self, flow_name: str) -> None:
        import uuid
        from types import SimpleNamespace

        self.flow_name = flow_name
        self.created: list[dict] = []
        self.dep = SimpleNamespace(id=uuid.uuid4(), name="detect", flow_id=uuid.uuid4(),
                                   parameters={"config": {"load": {"input": "x.csv"}}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployments(self, **_kw):
        return [self.dep]

    def read_flow(self, flow_id):
        from types import SimpleNamespace

        assert flow_id == self.dep.flow_id
        return SimpleNamespace(name=self.flow_name)

    def create_flow_run_from_deployment(self, dep_id, **kw):
        self.created.append(kw)
        raise AssertionError("a flow run was created")


@pytest.mark.parametrize("flow_name", ["detect", "detect-train-apply"])
def test_backfill_refuses_a_deployment_of_another_application(monkeypatch, flow_name):
    import datetime as dt

    from prefect.client import orchestration

    from flows.backfill import run_via_deployment
    from tasks.errors import ConfigError

    fake = _FakeClient(flow_name)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(orchestration, "get_client", lambda **_kw: fake)
    with pytest.raises(ConfigError) as e:
        run_via_deployment("detect", [dt.date(2026, 11, 4)], {}, app_name="reduce")
    assert e.value.exit_code == 2
    assert f"deployment 'detect' runs flow '{flow_name}', not 'reduce'" in str(e.value)
    assert fake.created == []


def test_backfill_accepts_a_deployment_of_its_application_or_its_pipeline():
    from flows.backfill import check_deployment_app

    for flow_name in ("reduce", "reduce-train-apply"):
        fake = _FakeClient(flow_name)
        check_deployment_app(fake, fake.dep, "reduce")  # no error


def test_backfill_via_deployment_with_no_server_is_one_line_exit_4():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # what PREFECT_API_URL in the environment gives a fresh `aeflow` process
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        res = runner.invoke(app, ["backfill", "reduce", "--via-deployment", "reduce", "--start", "2026-11-04",
                                  "--end", "2026-11-04"])
    assert res.exit_code == 4, res.output
    assert "no healthy Prefect server at http://127.0.0.1:9/api" in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and "httpx" not in res.output, res.output


# ------------------------------------------------------------------------------------------
# aeflow serve on a port that another program holds


def test_serve_on_a_busy_port_refuses_before_starting_and_keeps_the_server_log(tmp_path):
    from prefect.settings import PREFECT_HOME, temporary_settings

    home = tmp_path / "home"
    home.mkdir()
    (home / "server.log").write_text("the running server's log\n")
    with socket.socket() as s, temporary_settings(updates={PREFECT_HOME: str(home)}):
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]

        def hang_up() -> None:  # another program: it answers no HTTP (so the health check fails at once)
            try:
                while True:
                    s.accept()[0].close()
            except OSError:
                return

        threading.Thread(target=hang_up, daemon=True).start()
        t0 = time.monotonic()
        res = runner.invoke(app, ["serve", "--file", str(REPO / "prefect.yaml"), "--port", str(busy)])
        took = time.monotonic() - t0
    assert res.exit_code == 2, res.output
    assert f"port {busy} on 127.0.0.1 is in use by another program" in " ".join(res.output.split()), res.output
    assert took < 8, f"{took:.1f} s: a server was started"
    assert (home / "server.log").read_text() == "the running server's log\n"


def test_the_via_deployment_table_says_why_a_date_failed(monkeypatch):
    """With --wait the table named a failed date's flow run but not why (only --json had the message)."""
    import flows.backfill as backfill
    from flows.backfill import DateOutcome

    def fake(deployment, dates, overrides, **_kw):
        return [DateOutcome(dates[0], "completed", "./artifacts/runs/reduce/20261201-a", flow_run_name="reduce-2026-11-01-a",
                            flow_run_url="http://ui/runs/flow-run/1"),
                DateOutcome(dates[1], "failed", "", flow_run_name="reduce-2026-11-02-b", flow_run_url="http://ui/runs/flow-run/2",
                            message="InputError: input data/2026-11-02/part.csv does not exist")]

    monkeypatch.setattr(backfill, "run_via_deployment", fake)
    res = runner.invoke(app, ["backfill", "reduce", "--via-deployment", "reduce", "--start", "2026-11-01",
                              "--end", "2026-11-02", "--wait"], terminal_width=200)
    assert res.exit_code == 1, res.output
    assert "reduce-2026-11-02-b" in res.stdout and "InputError: input data/2026-11-02/part.csv" in res.stdout, res.stdout
    # a completed date shows its flow run in the UI and the run folder it made
    assert "http://ui/runs/flow-run/1" in res.stdout and "./artifacts/runs/reduce/20261201-a" in res.stdout, res.stdout


def test_ctrl_c_of_a_backfill_through_a_deployment_stops_only_the_waiting(monkeypatch):
    """The flow runs go on on the workers: Ctrl-C says so and lists them (it said 'interrupted: the run is
    incomplete', with no table); dates that got no flow run yet are 'not run'. Found by the eighth walkthrough."""
    import types
    import uuid

    import prefect.client.orchestration

    import flows.backfill
    import flows.deploy

    state = types.SimpleNamespace(type=types.SimpleNamespace(value="SCHEDULED"), message="")
    created: list[str] = []

    class FakeClient:
        def __init__(self, ctrl_c_at: str):
            self.ctrl_c_at = ctrl_c_at

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def create_flow_run_from_deployment(self, dep_id, parameters, tags, idempotency_key):
            if self.ctrl_c_at == parameters["date"]:
                raise KeyboardInterrupt
            created.append(parameters["date"])
            return types.SimpleNamespace(id=uuid.uuid4(), name=f"run-{parameters['date']}", state=state)

        def read_flow_run(self, frid):
            raise KeyboardInterrupt  # Ctrl-C while waiting

    dep = types.SimpleNamespace(id=uuid.uuid4(), name="reduce", flow_id=uuid.uuid4(), parameters={"config": {}})
    monkeypatch.setattr(flows.backfill, "find_deployment", lambda client, name: dep)
    monkeypatch.setattr(flows.backfill, "check_deployment_app", lambda client, d, app_name: None)
    monkeypatch.setattr(flows.deploy, "api_healthy", lambda url: True)
    args = ["backfill", "reduce", "--via-deployment", "reduce", "-i", "s3://b/daily/{date}/part.csv",
            "--start", "2026-11-01", "--end", "2026-11-03", "--wait"]
    for ctrl_c_at, going, never in (("", 3, 0), ("2026-11-03", 2, 1)):
        created.clear()
        monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda at=ctrl_c_at, **kw: FakeClient(at))
        res = runner.invoke(app, args, terminal_width=200)
        text = " ".join(res.output.split())
        assert res.exit_code == 130, res.output
        assert f"stopped waiting (Ctrl-C): {going} flow run(s) listed above go on on the workers" in text, res.output
        assert ("got no flow run" in text) == bool(never), res.output
        assert "the run is incomplete" not in text and "Traceback" not in res.output, res.output
        for day in created:
            assert f"run-{day}" in res.output, "the table lists the flow runs that go on"
        if never:
            assert "2026-11-03 │ not run" in res.output, res.output


def test_a_refused_backfill_leaves_no_empty_progress_bar(monkeypatch):
    import flows.backfill
    import flows.deploy
    from tasks.errors import ConfigError

    def no_such(client, name):
        raise ConfigError(f"no deployment named {name!r} on the server")

    class NoServer:  # find_deployment is all it is asked
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import prefect.client.orchestration

    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda **kw: NoServer())
    monkeypatch.setattr(flows.backfill, "find_deployment", no_such)
    monkeypatch.setattr(flows.deploy, "api_healthy", lambda url: True)
    res = runner.invoke(app, ["backfill", "reduce", "--via-deployment", "nope", "-i", "s3://b/{date}.csv",
                              "--start", "2026-11-01", "--end", "2026-11-02"], terminal_width=200)
    assert res.exit_code == 2 and "no deployment named 'nope'" in res.output, res.output
    assert "0/2" not in res.output, res.output
