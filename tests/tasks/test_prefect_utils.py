"""When flow runs send heartbeats (tasks.prefect_utils.no_default_flow_heartbeats)."""

from __future__ import annotations

import sys

import pytest
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from tasks.prefect_utils import PREFECT_DEFAULT_HEARTBEAT_S, no_default_flow_heartbeats


def _freq():
    return get_current_settings().flows.heartbeat_frequency


@pytest.mark.parametrize(
    "setting,env,inside",
    [
        (PREFECT_DEFAULT_HEARTBEAT_S, None, None),  # Prefect's default: off inside
        (30, None, 30),  # set in a profile: kept
        (PREFECT_DEFAULT_HEARTBEAT_S, str(PREFECT_DEFAULT_HEARTBEAT_S), PREFECT_DEFAULT_HEARTBEAT_S),  # asked for, even 180
    ],
)
def test_heartbeats_are_off_only_at_prefects_default(monkeypatch, setting, env, inside):
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    if env is None:
        monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    else:
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", env)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: setting}):
        with no_default_flow_heartbeats():
            assert _freq() == inside
        assert _freq() == setting, "restored after"


def test_the_aeflow_console_script_runs_its_commands_without_default_heartbeats(monkeypatch):
    import flows.cli
    import flows.lifeline

    seen = []
    for var in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):  # asked for: kept (other tests)
        monkeypatch.delenv(var, raising=False)
    # a command (main runs --help, and no arguments, without touching Prefect's settings): not pytest's own argv,
    # which under pytest-xdist is empty and failed this test
    monkeypatch.setattr(sys, "argv", ["aeflow", "runs", "list"])
    monkeypatch.setattr(flows.cli, "app", lambda: seen.append(_freq()))
    monkeypatch.setattr(flows.lifeline, "guard_prefect_ephemeral_server", lambda: None)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: PREFECT_DEFAULT_HEARTBEAT_S}):
        flows.cli.main()
    assert seen == [None]


class _Lines:
    """A logger that keeps what it is told (report_slot_wait's lines)."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg, *args):
        self.lines.append(msg % args)


def test_a_task_waiting_for_its_tags_slot_says_so_and_by_whom(prefect_server):
    """The engine waits for a full tag limit silently (a run behind another training looked hung): the
    watcher logs the wait with the slots taken, then that the slot came; nothing once started or without a limit."""
    import threading
    import time

    from prefect.client.orchestration import get_client

    from tasks.prefect_utils import report_slot_wait

    from prefect import flow, task

    tag = "aeflow-test-slot"  # never `training`: other tests' fits would wait on it
    holding, let_go = threading.Event(), threading.Event()

    @task(name="hold", task_run_name="hold-slot", tags=[tag])
    def hold():
        holding.set()
        let_go.wait(60)

    @flow(name="slot-holder", flow_run_name="the-other-training")
    def holder():
        hold()

    with get_client(sync_client=True) as c:
        c.upsert_global_concurrency_limit_by_name(f"tag:{tag}", 1)
    other = threading.Thread(target=holder, daemon=True)
    other.start()  # a real task run takes the one slot through Prefect's engine
    try:
        assert holding.wait(60), "the holding task started"
        log, started = _Lines(), threading.Event()
        with report_slot_wait(tag, started, log, first_s=0.2, every_s=0.3):
            deadline = time.monotonic() + 30
            while len(log.lines) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            started.set()  # the task got its slot and began
        assert len(log.lines) >= 3, log.lines
        assert all(f"for a '{tag}' slot: 1 of 1 taken, by hold-slot of flow run the-other-training" in line
                   for line in log.lines[:-1]), log.lines
        assert log.lines[-1].startswith(f"got a '{tag}' slot after"), log.lines

        quiet, started = _Lines(), threading.Event()
        started.set()  # began at once: nothing to say
        with report_slot_wait(tag, started, quiet, first_s=0.1, every_s=0.1):
            time.sleep(0.5)
        no_limit = _Lines()
        with report_slot_wait("aeflow-test-no-such-limit", threading.Event(), no_limit, first_s=0.1, every_s=0.1):
            time.sleep(0.8)
        assert quiet.lines == [] and no_limit.lines == []
    finally:
        let_go.set()
        other.join(60)
        with get_client(sync_client=True) as c:
            c.delete_global_concurrency_limit_by_name(f"tag:{tag}")
