"""Child servers die with their parent, also when the parent is SIGKILLed (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows import lifeline
from tests.conftest import free_port

pytestmark = pytest.mark.flows
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# A parent that starts a "server" through the lifeline (optionally in its own session, as
# `aeflow serve` does, with a grandchild in that session) and waits to be killed.
PARENT = """
import subprocess, sys, time
from flows.lifeline import command
server = "import subprocess, sys, time; " + (
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); print(g.pid, flush=True); "
    if sys.argv[1] == "session" else "print(0, flush=True); ") + "time.sleep(300)"
p = subprocess.Popen(command(["-c", server]), stdout=subprocess.PIPE, text=True,
                     start_new_session=sys.argv[1] == "session")
grandchild = int(p.stdout.readline())
print(p.pid, grandchild, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("topology", ["same-group", "session"])
def test_a_server_dies_with_its_sigkilled_parent(topology):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, topology], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server, grandchild = map(int, parent.stdout.readline().split())
        watched = [server] + ([grandchild] if grandchild else [])
        assert all(_alive(p) for p in watched)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    assert _gone_within(watched, lifeline.POLL_S + lifeline.GRACE_S + 5) == [], "orphans survived their parent"


def test_a_server_whose_parent_is_already_gone_does_not_start():
    res = subprocess.run([sys.executable, "-m", "flows.lifeline", "1", "--", "-c", "print('started')"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "started" not in res.stdout


def test_prefects_temporary_server_is_spawned_through_the_lifeline():
    """Prefect's own spawn of its uvicorn server goes through the watchdog once guarded."""
    import prefect.server.api.server as server_mod

    original = server_mod.subprocess
    try:
        lifeline.guard_prefect_ephemeral_server()
        proc = server_mod.SubprocessASGIServer(port=free_port())._run_uvicorn_command()
        try:
            assert proc.args[:5] == [sys.executable, "-m", "flows.lifeline", str(os.getpid()), "--"]
            assert proc.args[5:7] == ["-m", "uvicorn"]
        finally:
            proc.kill()
            proc.wait(30)
    finally:
        server_mod.subprocess = original


ENTERS_EPHEMERAL_MODE = """
import sys, time
from flows.lifeline import guard_prefect_ephemeral_server
guard_prefect_ephemeral_server()
from prefect import flow

@flow
def hold(seconds: float) -> str:
    print("inside", flush=True)
    time.sleep(seconds)
    return "done"

print(hold(float(sys.argv[1])), flush=True)
"""


@pytest.mark.slow
def test_sigkilled_ephemeral_mode_leaves_no_orphan_and_the_next_run_works(tmp_path):
    """A process in Prefect's ephemeral mode (no PREFECT_API_URL), SIGKILLed inside a flow: its
    temporary API server goes with it, and the next run in the same PREFECT_HOME works."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    first = subprocess.Popen([sys.executable, "-c", ENTERS_EPHEMERAL_MODE, "300"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout.readline().strip() == "inside"
        children = _descendants(first.pid)
        servers = [p for p in children if "flows.lifeline" in open(f"/proc/{p}/cmdline").read()]
        assert servers, f"no temporary server among the children {children}"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert _gone_within(children, lifeline.POLL_S + lifeline.GRACE_S + 5) == [], "orphans survived the kill"
    second = subprocess.run([sys.executable, "-c", ENTERS_EPHEMERAL_MODE, "0"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.split() == ["inside", "done"], second.stderr[-2000:]


def test_prefects_temporary_server_notice_keeps_its_first_line(caplog):
    """"Starting temporary server on ..." went on with Prefect's advice to run a dedicated server, on every run's
    stderr; the first line stays, other records of the logger are untouched."""
    import logging

    from flows.lifeline import shorten_prefect_server_notice

    shorten_prefect_server_notice()
    shorten_prefect_server_notice()  # once only
    lg = logging.getLogger("prefect")
    with caplog.at_level(logging.INFO, logger="prefect"):
        lg.info("Starting temporary server on http://127.0.0.1:8301\nSee https://www.prefect.io/docs/v3/concepts/"
                "server#how-to-guides for more information on running a dedicated Prefect server.")
        lg.info("something else\nwith two lines")
        lg.info("Stopping temporary server on http://127.0.0.1:8301")  # at exit, after the error line: dropped
    assert [r.getMessage() for r in caplog.records if r.name == "prefect"] == [
        "Starting temporary server on http://127.0.0.1:8301", "something else\nwith two lines"]
    assert sum(type(f).__name__ == "_FirstLineOfServerNotice" for f in lg.filters) == 1
