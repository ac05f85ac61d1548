"""When flow runs send heartbeats (tasks.prefect_utils.no_default_flow_heartbeats)."""

from __future__ import annotations

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
    monkeypatch.setattr(flows.cli, "app", lambda: seen.append(_freq()))
    monkeypatch.setattr(flows.lifeline, "guard_prefect_ephemeral_server", lambda: None)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: PREFECT_DEFAULT_HEARTBEAT_S}):
        flows.cli.main()
    assert seen == [None]
