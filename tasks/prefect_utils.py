"""Shared Prefect settings: what is retried, what is never cached, and when flow runs send heartbeats."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.cache_policies import NO_CACHE

from tasks.errors import AeflowError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (network, object storage outages), never a user's bad input.

    An object-store outage arrives as :class:`~tasks.errors.StorageUnavailable` (one line for
    the user, mapped in ``tasks/storage.py``), which is an :class:`AeflowError` marked
    ``transient``: retried, and if the retries fail too, that one line is the run's error.
    """
    try:
        state.result()
    except AeflowError as e:
        return e.transient
    except Exception:
        return True
    return False


# Tasks pass references and small dataclasses; nothing is worth caching by input hash
# (hashing a Dask graph or a model would be slow and meaningless), so caching is off.
IO_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_user_error,
}
COMPUTE_TASK: dict[str, Any] = {"cache_policy": NO_CACHE}


# Prefect's own default for flow-run heartbeats (seconds); see :func:`no_default_flow_heartbeats`.
PREFECT_DEFAULT_HEARTBEAT_S = 180


@contextmanager
def no_default_flow_heartbeats() -> Iterator[None]:
    """Flow runs started in this process send no heartbeats, unless heartbeats were asked for.

    Prefect 3.9 sends a heartbeat every 180 s by default from a thread that the flow run
    joins at its end, which costs up to a second per flow run (measured: 1.09 s against
    0.11 s for a trivial flow). Heartbeats only matter where something watches for them
    (the zombie-run automation of a containerised installation, whose workers set
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30``), and with the 90 s automation a 180 s
    heartbeat would even crash a healthy run. So an ad-hoc run in this process (the
    ``aeflow`` CLI) sends none when the setting is Prefect's default; an explicit value
    (environment or profile) is kept.
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    asked = any(os.environ.get(k) for k in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"))
    if asked or get_current_settings().flows.heartbeat_frequency != PREFECT_DEFAULT_HEARTBEAT_S:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
