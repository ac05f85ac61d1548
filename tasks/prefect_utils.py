"""Shared Prefect settings: what is retried, what is never cached, and when flow runs send heartbeats."""

from __future__ import annotations

import os
import time
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


@contextmanager
def report_slot_wait(tag: str, started: Any, log: Any, first_s: float = 10.0, every_s: float = 60.0) -> Iterator[None]:
    """Say in the run's log while a task tagged ``tag`` waits for the tag's concurrency slot.

    Prefect's task engine waits for a free slot of ``tag:{tag}`` (the platform's ``training``
    limit: one training at a time per GPU) silently, so a run behind another training looked
    hung: its log and ``aeflow backfill --wait`` said nothing for as long as the other trained.
    While ``started`` (a :class:`threading.Event` the task's body sets) is unset, a thread asks
    the API after ``first_s`` and then every ``every_s`` seconds and, when the tag's limit is
    full, logs how many slots are taken and by which task runs. Nothing is logged when the task
    starts at once or the API has no such limit; the watcher never fails the run.
    """
    import threading

    from tasks.train import periodically

    t0 = time.monotonic()
    said = threading.Event()

    def look() -> bool:
        if started.is_set():
            return False
        try:
            line = _slot_wait_line(tag)
        except Exception:  # noqa: BLE001 - the API or the limit went away: nothing to say, the engine still waits
            return False
        if line is None:
            return False
        if line:
            log.info("waiting %.0f s so far for a %r slot: %s; the run goes on when one is free",
                     time.monotonic() - t0, tag, line)
            said.set()
        return True

    try:
        with periodically(look, first_s, every_s, f"aeflow-{tag}-slot-wait"):
            yield
    finally:
        if said.is_set() and started.is_set():
            log.info("got a %r slot after %.0f s", tag, time.monotonic() - t0)


def _slot_wait_line(tag: str) -> str | None:
    """What takes the tag's slots ("1 of 1 taken, by fit-detect of flow run detect-..."); "" when one is free
    (the engine takes it at its next try); None when the API has no limit for the tag."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
        TaskRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        except ObjectNotFound:
            return None
        if not limit.active or limit.active_slots < limit.limit:
            return ""
        holders = client.read_task_runs(task_run_filter=TaskRunFilter(
            tags=TaskRunFilterTags(all_=[tag]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))), limit=5)
        flow_ids = {tr.flow_run_id for tr in holders if tr.flow_run_id}
        names = {fr.id: fr.name for fr in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_ids))))} if flow_ids else {}
    by = ", ".join(f"{tr.name} of flow run {names.get(tr.flow_run_id, tr.flow_run_id)}" for tr in holders)
    return f"{limit.active_slots} of {limit.limit} taken" + (f", by {by}" if by else "")
