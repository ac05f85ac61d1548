"""The pieces of ``aeflow platform`` that need no servers: processes, ports, state, run-time defaults, errors."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from flows.platform.procs import ProcRecord, free_ports, port_free, spawn, stop, tree
from flows.platform.state import PlatformState
from tasks.errors import PlatformError

pytestmark = [pytest.mark.flows]

# A parent that starts a child in a session of its own (as Prefect starts a flow run) and waits.
PARENT = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
    "time.sleep(300)\n"
)


def test_stop_takes_the_whole_tree_even_a_child_in_its_own_session(tmp_path):
    rec = spawn("parent", [sys.executable, "-c", PARENT], log=tmp_path / "parent.log", env=dict(os.environ))
    deadline = time.monotonic() + 30
    while len(tree(rec)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    procs = tree(rec)
    assert len(procs) == 2, "the parent and its child"
    assert os.getpgid(rec.pid) == rec.pid, "a component leads its own process group"
    assert os.getsid(procs[1].pid) != os.getsid(rec.pid), "the child left the parent's session"
    assert stop(rec, grace=5) is True
    gone = [p for p in procs if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
    assert len(gone) == 2
    assert "starting parent" in (tmp_path / "parent.log").read_text()


def test_a_record_never_names_a_reused_pid(tmp_path):
    rec = spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], log=tmp_path / "s.log", env=dict(os.environ))
    assert rec.alive
    forged = ProcRecord(name="sleeper", pid=rec.pid, create_time=rec.create_time - 3600, log=rec.log)
    assert not forged.alive and tree(forged) == [], "same pid, another start time: not ours, never signalled"
    stop(rec, grace=5)
    assert not rec.alive


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(12)
    assert len(set(ports)) == 12 and all(port_free("127.0.0.1", p) for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free("127.0.0.1", s.getsockname()[1])


def test_state_round_trips_and_keeps_secrets_private(tmp_path):
    st = PlatformState(dir=tmp_path)
    key = st.secret("s3_secret_access_key")
    assert st.secret("s3_secret_access_key") == key and len(key) == 48, "generated once, then kept"
    st.ports["prefect"] = 4321
    st.components["x"] = ProcRecord(name="x", pid=1, create_time=0.0, log="x.log", ports={"a": 1})
    st.save()
    assert stat.S_IMODE((tmp_path / "platform.json").stat().st_mode) == 0o600
    back = PlatformState.load(tmp_path)
    assert back.ports == {"prefect": 4321} and back.secrets == st.secrets and back.components["x"].ports == {"a": 1}
    (tmp_path / "platform.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(PlatformError, match="format 99"):
        PlatformState.load(tmp_path)


@pytest.fixture
def another_program():
    """`python -m http.server` on a free port of 127.0.0.1: the port is another program's."""
    import subprocess

    from flows.platform.procs import port_open

    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("option", "names"), [("--prefect-port", "prefect-server (the Prefect API and UI)"),
                                               ("--s3-port", "seaweedfs (the S3 endpoint)")])
def test_up_on_a_port_another_program_holds_refuses_before_anything_starts(tmp_path, another_program, option, names):
    """As `aeflow serve` does (one check, one exit code: 2, the option moves it); it was exit 6, as for a component
    that did not start, and left the new DIR behind with its lock file."""
    from flows.cli import app

    directory = tmp_path / "new" / "p"
    res = CliRunner().invoke(app, ["platform", "up", "--dir", str(directory), option, str(another_program)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert (f"port {another_program} on 127.0.0.1 is in use by another program, so {names} cannot listen there; "
            f"free it, or pass another {option}; nothing was started") in text, text
    assert not (tmp_path / "new").exists(), "nothing half-created: the DIR (and its parent) it made are gone again"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]


def test_up_with_one_port_for_two_servers_refuses_before_anything_starts(tmp_path):
    """--prefect-port P --s3-port P started PostgreSQL, SeaweedFS (on P) and the Dask cluster, then the Prefect server
    could not bind P: exit 6 after ~25 s, and the state kept both on P, so every later `up` failed the same way."""
    from flows.cli import app

    port = free_ports(1)[0]
    directory = tmp_path / "p"
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["platform", "up", "--dir", str(directory), "--prefect-port", str(port),
                                   "--s3-port", str(port)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"port {port} is set for both --prefect-port and --s3-port (one port, one server); pass another" in text, text
    assert time.monotonic() - t0 < 10, "nothing was started"
    assert not directory.exists()
    # a state that recorded one port for two servers (written by that earlier `up`) is refused the same way
    PlatformState(dir=directory, ports={"prefect": port, "s3": port}).save()
    res = CliRunner().invoke(app, ["platform", "up", "--dir", str(directory)])
    assert res.exit_code == 2 and "is set for both --prefect-port and --s3-port" in " ".join(res.output.split())
    assert PlatformState.load(directory).ports == {"prefect": port, "s3": port}, "refused before the state changed"


def test_an_internal_port_another_program_took_is_chosen_afresh(tmp_path):
    """SeaweedFS's own ports and the scheduler's HTTP port are known to no client: another free one does."""
    from flows.platform.core import _allocate_ports
    from flows.platform.state import PORT_NAMES

    state = PlatformState(dir=tmp_path, ports=dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True)))
    before = dict(state.ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", before["weed_master"]))
        s.listen()
        _allocate_ports(state, {})
    assert state.ports["weed_master"] != before["weed_master"]
    assert {k: v for k, v in state.ports.items() if k != "weed_master"} == {k: v for k, v in before.items() if k != "weed_master"}
    assert len(set(state.ports.values())) == len(PORT_NAMES)
    # and one that a given port now asks for (--dask-port on SeaweedFS's volume port)
    _allocate_ports(state, {"dask": state.ports["weed_volume"]})
    assert len(set(state.ports.values())) == len(PORT_NAMES)


def test_a_component_that_dies_while_starting_is_named_with_its_log(tmp_path):
    from flows.platform.components import wait_healthy

    rec = spawn("prefect-server", [sys.executable, "-c", "print('cannot reach the database'); raise SystemExit(3)"],
                log=tmp_path / "prefect-server.log", env=dict(os.environ))
    with pytest.raises(PlatformError) as e:
        wait_healthy(rec, lambda: False, timeout=30)
    msg = str(e.value)
    assert msg.startswith("prefect-server exited with code 3 while starting")
    assert str(tmp_path / "prefect-server.log") in msg and "cannot reach the database" in msg


def test_environment_defaults_fill_only_what_the_config_leaves_unset(monkeypatch):
    from tasks.apps import get_app
    from tasks.config import resolve_config
    from tasks.execution import with_environment_defaults

    cls = get_app("reduce").RunConfig
    monkeypatch.delenv("AEFLOW_OUTPUT", raising=False)
    monkeypatch.delenv("AEFLOW_DASK_ADDRESS", raising=False)
    plain = resolve_config(cls)
    assert with_environment_defaults(plain) is plain, "nothing set: nothing changes"
    monkeypatch.setenv("AEFLOW_OUTPUT", "s3://aeflow/artifacts")
    monkeypatch.setenv("AEFLOW_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    filled = with_environment_defaults(resolve_config(cls))
    assert (filled.output, filled.dask_address) == ("s3://aeflow/artifacts", "tcp://127.0.0.1:8786")
    given = with_environment_defaults(resolve_config(cls, options={"output": "./artifacts", "dask_address": "tcp://h:1"}))
    assert (given.output, given.dask_address) == ("./artifacts", "tcp://h:1"), "explicit values win"
    # a deployment's parameters without `output` (what Prefect validates into the flow's config)
    from_params = with_environment_defaults(cls.model_validate({"load": {"input": "x.csv"}}))
    assert from_params.output == "s3://aeflow/artifacts"


def test_execution_info_outside_a_flow_run(monkeypatch):
    import functools

    from tasks import execution
    from tasks.apps import get_app
    from tasks.execution import execution_info

    # an unreachable scheduler is given up on after the timeout (10 s by default): 1 s here
    monkeypatch.setattr(execution, "dask_cluster_info", functools.partial(execution.dask_cluster_info, timeout=1.0))
    monkeypatch.setenv("AEFLOW_WORKER_NAME", "prefect-worker-7")
    monkeypatch.delenv("PREFECT__WORKER_NAME", raising=False)
    info = execution_info(get_app("reduce").RunConfig(), "cpu")
    assert info["device"] == "cpu" and info["pid"] == os.getpid()
    assert info["prefect"] == {"worker": "prefect-worker-7"}
    assert info["dask"]["scheduler"] is None
    unreachable = execution_info(get_app("reduce").RunConfig(dask_address="tcp://127.0.0.1:9"), "cpu")
    assert unreachable["dask"]["scheduler"] == "tcp://127.0.0.1:9" and "error" in unreachable["dask"], "recorded, never raised"


def test_platform_commands_on_a_directory_without_a_platform(tmp_path):
    from flows.cli import app

    runner = CliRunner()
    for cmd in ("status", "down"):
        res = runner.invoke(app, ["platform", cmd, "--dir", str(tmp_path)])
        # nothing there: 4 (as a run that does not exist), not 6 ("a component did not start")
        assert res.exit_code == 4, res.output
        assert f"{tmp_path} holds no platform" in " ".join(res.output.split())
    res = runner.invoke(app, ["platform", "status", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "else ./.aeflow/platform" in " ".join(res.output.replace("│", " ").split()), res.output


def test_status_of_a_stopped_platform_is_not_healthy(tmp_path):
    """After `down` the state has no component: status says nothing runs and exits 1, as its help says."""
    from flows.cli import app

    PlatformState(dir=tmp_path).save()
    runner = CliRunner()
    res = runner.invoke(app, ["platform", "status", "--dir", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "nothing is running" in " ".join(res.output.split()), res.output
    assert f"aeflow platform up --dir {tmp_path}" in " ".join(res.output.split()), "the hint names the directory"
    res = runner.invoke(app, ["platform", "status", "--dir", str(tmp_path), "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["healthy"] is False, res.output
    # the directory `up` exported (AEFLOW_PLATFORM_DIR) is the default of status and down
    res = runner.invoke(app, ["platform", "status", "--json"], env={"AEFLOW_PLATFORM_DIR": str(tmp_path)})
    assert res.exit_code == 1 and json.loads(res.stdout)["dir"] == str(tmp_path), res.output
    res = runner.invoke(app, ["platform", "down"], env={"AEFLOW_PLATFORM_DIR": str(tmp_path)})
    assert res.exit_code == 0 and "nothing was running (stopped 0 processes)" in res.output, res.output
    res = runner.invoke(app, ["platform", "status", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "or when nothing is running" in " ".join(res.output.replace("│", " ").split()), res.output


def test_watchdog_knows_a_flow_run_process_only_below_a_platform_worker(tmp_path):
    from flows.platform.watchdog import _started_by

    rec = spawn("prefect-worker-1", [sys.executable, "-c", PARENT], log=tmp_path / "w.log", env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while len(tree(rec)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        child = tree(rec)[1]
        assert _started_by(child.pid, {rec.pid: "prefect-worker-1"}) == (child.create_time(), "prefect-worker-1")
        assert _started_by(child.pid, {}) is None
        assert _started_by(os.getpid(), {rec.pid: "prefect-worker-1"}) is None
    finally:
        stop(rec, grace=5)


@pytest.fixture(autouse=True)
def _no_leftovers():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    for p in psutil.Process().children(recursive=True):
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE:
            p.kill()
            pytest.fail(f"a test left process {p.pid} ({p.cmdline()[:3]}) running")



@pytest.mark.skipif(os.geteuid() != 0, reason="the PostgreSQL user is only switched to when root")
def test_a_failed_up_names_the_component_and_stops_what_it_started(tmp_path):
    """PostgreSQL cannot start (its user does not exist): the error says so; SeaweedFS and the scheduler go again."""
    from flows.platform.components import weed_binary
    from flows.platform.core import up

    try:
        weed_binary()
    except PlatformError as e:
        pytest.skip(str(e))
    directory = tmp_path / "p"
    with pytest.raises(PlatformError, match="postgres: .*the user 'no-such-user-aeflow' does not exist"):
        up(directory, settings={"pg_user": "no-such-user-aeflow"}, deploy_file=None, project_dir=tmp_path)
    state = PlatformState.load(directory)
    assert state.components == {}, "rolled back"
    logs = {p.name for p in (directory / "logs").iterdir()}
    assert {"seaweedfs.log", "dask-scheduler.log"} <= logs, "they had started"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(directory) in " ".join(p.info["cmdline"] or [])]


def test_watchdog_ends_runs_a_stopped_platform_left_running(prefect_server, capsys):
    """Rule 3: after `down` mid-run (or a reboot) and `up`, a flow run still RUNNING or CANCELLING from before the
    watchdog started, whose process is gone, is crashed (cancelled) and its task runs freed (the `fit` task kept
    the training slot: every later training waited); one whose process still runs is left alone."""
    import datetime as dt
    import subprocess

    from prefect import get_client, task
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Running

    from flows.platform.watchdog import Watchdog

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    @task
    def fit_step():
        return None

    with get_client(sync_client=True) as c:
        pool = f"wd-{os.getpid()}-{time.time_ns()}"
        c.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        dep = c.create_deployment(flow_id=c.create_flow_from_name("wd-flow"), name="d", work_pool_name=pool)
        runs = {}
        for name, pid in (("gone", dead.pid), ("alive", os.getpid()), ("cancelling", dead.pid)):
            fr = c.create_flow_run_from_deployment(dep, name=name)
            c.set_flow_run_state(fr.id, Running(), force=True)
            c.update_flow_run(fr.id, infrastructure_pid=str(pid))
            runs[name] = fr.id
        tr = c.create_task_run(fit_step, runs["gone"], "0", state=Running())
        from prefect.states import State

        c.set_flow_run_state(runs["cancelling"], State(type="CANCELLING"), force=True)
        wd = Watchdog(None)
        wd.started = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        young = Watchdog(None)  # a watchdog older than the runs: they are its own to track, not stale
        young.started = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        young.end_stale_runs(c, pool)
        assert c.read_flow_run(runs["gone"]).state.type.value == "RUNNING"
        wd.end_stale_runs(c, pool)
        states = {n: c.read_flow_run(i).state for n, i in runs.items()}
        assert states["gone"].type.value == "CRASHED" and "platform stopped" in states["gone"].message
        assert states["cancelling"].type.value == "CANCELLED"
        assert states["alive"].type.value == "RUNNING", "its process still runs (this one)"
        assert c.read_task_run(tr.id).state.type.value == "CRASHED", "its task run is freed"
        said = capsys.readouterr()
        said = said.out + said.err
        # the log names the state it set (it printed the API's answer: "-> ACCEPT")
        assert "RUNNING since before this watchdog started, process gone -> CRASHED" in said, said
        assert "CANCELLING since before this watchdog started, process gone -> CANCELLED" in said, said
        assert "-> ACCEPT" not in said


def test_watchdog_logs_every_crash_also_the_ones_a_worker_reported(prefect_server, capsys):
    """A flow-run process killed under a live worker is marked CRASHED by the worker: watchdog.log said nothing (it
    logged only the runs it ended itself). Now each crash seen while it watches is logged once, with its message."""
    import datetime as dt
    import subprocess

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Crashed, Running

    from flows.platform.watchdog import Watchdog

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a flow-run process that is gone
    dead.wait()
    with get_client(sync_client=True) as c:
        pool = f"wd-log-{os.getpid()}-{time.time_ns()}"
        c.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        dep = c.create_deployment(flow_id=c.create_flow_from_name("wd-log-flow"), name="d", work_pool_name=pool)

        def run(name, pid):
            fr = c.create_flow_run_from_deployment(dep, name=name)
            c.set_flow_run_state(fr.id, Running(), force=True)
            c.update_flow_run(fr.id, infrastructure_pid=str(pid))
            return fr.id

        def worker_reports_crash(frid):  # what a Prefect worker does when its flow-run process exits non-zero
            c.set_flow_run_state(frid, Crashed(message="Flow run infrastructure exited with non-zero status code -9."))

        before = run("crashed-before", dead.pid)
        worker_reports_crash(before)
        time.sleep(0.5)
        wd = Watchdog(None)
        time.sleep(0.5)
        killed, gone = run("killed", dead.pid), run("gone", dead.pid)
        worker_reports_crash(killed)
        started, wd.started = wd.started, wd.started + dt.timedelta(seconds=60)
        wd.end_stale_runs(c, pool)  # the watchdog crashes `gone` itself (rule 3): logged as it does so
        wd.started = started
        assert f"flow run gone ({gone}), RUNNING since before this watchdog started" in capsys.readouterr().out
        wd.free_orphaned_tasks(c, pool)
        wd.free_orphaned_tasks(c, pool)  # the next pass: nothing twice
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "flow run" in ln]
    said = (f"watchdog: flow run killed ({killed}): CRASHED, reported by its worker or its own process "
            f"(pid {dead.pid}): Flow run infrastructure exited with non-zero status code -9.")
    assert [ln[len("2026-12-01 04:22:51 "):] for ln in lines] == [said], lines
    assert str(before) not in " ".join(lines), "it ended before the watchdog watched"
    assert str(gone) not in " ".join(lines), "the watchdog's own crash was logged when it made it, not again"


def test_ctrl_c_of_up_says_what_it_left(tmp_path, monkeypatch):
    """It exited 130 without a word (found by the eighth walkthrough); up itself stops what it started."""
    import flows.platform.core
    from flows.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.platform.core, "up", interrupted)
    res = CliRunner().invoke(app, ["platform", "up", "--dir", str(tmp_path)])
    assert res.exit_code == 130, res.output
    text = " ".join(res.output.split())
    assert "interrupted: what this `up` had started is stopped again" in text and f"--dir {tmp_path}" in text, text


def test_up_that_would_move_the_port_of_a_running_component_is_refused_as_a_setting(tmp_path):
    """`up --prefect-port Q` on a platform whose server runs on P: exit 6 ("a component did not start") and a hint
    without --dir (it named ./.aeflow/platform's down). A refused setting is exit 2, as the other port refusals."""
    from flows.cli import app

    p, q = free_ports(2)
    server = spawn("prefect-server", [sys.executable, "-c", "import time; time.sleep(60)"], log=tmp_path / "s.log",
                   env=dict(os.environ), ports={"prefect": p})
    try:
        PlatformState(dir=tmp_path / "p", ports={"prefect": p}, components={"prefect-server": server}).save()
        res = CliRunner().invoke(app, ["platform", "up", "--dir", str(tmp_path / "p"), "--prefect-port", str(q),
                                       "--project-dir", str(tmp_path)])
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert f"prefect-server already runs on port {p}" in text and f"--prefect-port {q} cannot move it" in text, text
        assert f"`aeflow platform down --dir {tmp_path / 'p'}` first" in text, text
        assert PlatformState.load(tmp_path / "p").ports == {"prefect": p}, "nothing was changed"
    finally:
        stop(server, grace=5)


def test_up_with_a_project_dir_or_file_that_does_not_exist_refuses_before_anything_starts(tmp_path):
    """--project-dir /nonexistent started PostgreSQL, SeaweedFS, Dask and the Prefect server (12 s), then the first
    worker's Popen(cwd=...) raised FileNotFoundError: a traceback, exit 1, and the bad directory kept in the state."""
    from flows.cli import app

    runner = CliRunner()
    directory = tmp_path / "new" / "p"
    t0 = time.monotonic()
    res = runner.invoke(app, ["platform", "up", "--dir", str(directory), "--project-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), "one message, no traceback"
    text = " ".join(res.output.split())
    assert f"--project-dir {tmp_path / 'nope'} is not a directory" in text and "nothing was started" in text, text
    assert time.monotonic() - t0 < 10 and not (tmp_path / "new").exists()
    # a recorded project directory that has gone since (the checkout moved) says where it came from
    PlatformState(dir=directory, settings={"project_dir": str(tmp_path / "moved")}).save()
    res = runner.invoke(app, ["platform", "up", "--dir", str(directory)])
    assert res.exit_code == 2, res.output
    assert f"the project directory an earlier `up` recorded in {directory} {tmp_path / 'moved'} is not a directory" \
        in " ".join(res.output.split()), res.output
    # a --file that does not exist: a setting (2), not a component that did not start (6)
    res = runner.invoke(app, ["platform", "up", "--dir", str(tmp_path / "q"), "--project-dir", str(tmp_path),
                              "--file", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and f"the deployment file {tmp_path / 'nope.yaml'} does not exist" in res.output, res.output
    assert not (tmp_path / "q").exists()


def test_status_names_what_is_not_healthy_and_how_to_repair_it(tmp_path):
    """A killed worker showed as `stopped` in a folded table and exit 1, with no word on what to do; after `down`
    status printed an empty table above its hint."""
    from flows.cli import app

    dead = spawn("prefect-worker-1", [sys.executable, "-c", "pass"], log=tmp_path / "w.log", env=dict(os.environ))
    stop(dead, grace=5)
    PlatformState(dir=tmp_path, components={"prefect-worker-1": dead}).save()
    res = CliRunner().invoke(app, ["platform", "status", "--dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "not healthy: prefect-worker-1 (stopped) (exit code 1)" in text, text
    assert f"`aeflow platform up --dir {tmp_path}` starts what is stopped again" in text, text
    PlatformState(dir=tmp_path).save()
    res = CliRunner().invoke(app, ["platform", "status", "--dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "┏" not in res.output and "nothing is running" in res.output, res.output


def test_up_progress_lines_stay_whole_in_a_captured_log(capsys, monkeypatch):
    # `aeflow platform up 2> up.log`: rich wraps at 80 columns off a terminal, which cut a log path in two
    from flows.platform.cli import _progress
    from flows.platform.core import Event

    monkeypatch.delenv("COLUMNS", raising=False)
    log = "/tmp/" + "a-rather-long-platform-directory/" * 4 + "logs/dask-scheduler.log"
    _progress(False)(Event("dask-scheduler", "starting", f"pid 5370, log {log}"))
    _progress(True)(Event("dask-scheduler", "started", "quiet: nothing printed"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(log) and "starting dask-scheduler" in lines[0], lines
