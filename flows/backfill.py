"""Backfills: one run of an application per date, in-process or as flow runs of a deployment.

In process (the default), each date runs the application's flow with its input
template filled for that date and ``skip_existing`` on, so a date whose run
already has a complete manifest for the same input and config is skipped, and
a second backfill redoes only what failed (a failed, cancelled or crashed run
leaves no manifest). ``force`` runs every date again. Dates run ``parallel`` at a
time, each with its own LocalCluster unless one cluster is shared (``_shared_dask``).
Ctrl-C (or SIGTERM, from the CLI) starts no further date and interrupts the running ones.

Through a deployment, each date becomes a flow run of that deployment on the
server (visible in the UI, tagged ``backfill``), created with an idempotency key
per date and parameters, so repeating a backfill does not duplicate runs; a date
whose earlier flow run failed, crashed or was cancelled gets a new flow run.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tasks.errors import AeflowError, ConfigError, Terminated

log = logging.getLogger("aeflow.backfill")


class ServerUnreachable(AeflowError):
    """The Prefect server of ``--via-deployment`` cannot be reached (exit 4, like ``aeflow serve --api-url``)."""

    exit_code = 4

FAILED_STATES = {"FAILED", "CRASHED", "CANCELLED", "CANCELLING"}
FINAL_STATES = FAILED_STATES | {"COMPLETED"}


@dataclass
class DateOutcome:
    """What happened to one date of a backfill."""

    date: dt.date
    status: str  # completed | skipped | failed | crashed | cancelled | scheduled | pending | running ...
    run_uri: str = ""
    message: str = ""
    flow_run_id: str = ""
    flow_run_name: str = ""
    flow_run_url: str = ""  # via a deployment: the flow run in the UI (its id without a UI URL)

    @property
    def ok(self) -> bool:
        return self.status not in {"failed", "crashed", "cancelled", "cancelling", "error", "interrupted", "not run"}

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date.isoformat(),
            "status": self.status,
            "run_uri": self.run_uri,
            "message": self.message,
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "flow_run_url": self.flow_run_url,
        }


def date_options(template: str, model: str | None) -> dict[str, Any]:
    """The config keys a backfill sets: the template is the training input, or with a model the data to apply to."""
    if model:
        return {"model_run": model, "load.apply_to": template}
    return {"load.input": template}


@contextmanager
def _shared_dask(address: str | None, needed: bool) -> Iterator[str | None]:
    """One Dask cluster of worker processes for every date of the backfill when ``needed`` (unless the
    user or AEFLOW_DASK_ADDRESS gave a scheduler); otherwise each date's run has its own LocalCluster."""
    from tasks.execution import default_dask_address

    address = address or default_dask_address()
    if address or not needed:
        yield address
        return
    from tasks.dask_client import dask_client

    with dask_client(None) as client:
        yield client.scheduler.address


class BackfillInterrupted(KeyboardInterrupt):
    """Ctrl-C during an in-process backfill: ``outcomes`` holds every date, in date order, the ones
    that did not finish as ``interrupted`` (it was running) or ``not run`` (it was still queued).

    ``detached``: Ctrl-C of a backfill through a deployment, which stops only this command: the flow
    runs it created go on on the workers (their outcomes hold the state last read); ``not run`` dates
    got no flow run.
    """

    def __init__(self, outcomes: list[DateOutcome], detached: bool = False, terminated: bool = False) -> None:
        super().__init__("backfill interrupted")
        self.outcomes = outcomes
        self.detached = detached
        self.terminated = terminated  # SIGTERM (exit 143), not Ctrl-C (130)


def _raise_in_thread(ident: int, exc: type[BaseException]) -> None:
    """Raise ``exc`` in the thread ``ident`` at its next Python instruction (how Ctrl-C reaches a date's run)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))


def _exit_now(signum: int, _frame: Any) -> None:
    """A second Ctrl-C while the running dates wind down: leave at once (the temporary server and
    Dask processes go with their lifelines)."""
    import os
    import sys

    sys.stderr.write("\ninterrupted again: exiting now\n")
    sys.stderr.flush()
    os._exit(130)


def run_in_process(
    app_name: str,
    dates: list[dt.date],
    config: Any,
    *,
    parallel: int = 1,
    force: bool = False,
    on_done: Callable[[DateOutcome], None] | None = None,
    grace_s: float = 30.0,
) -> list[DateOutcome]:
    """Run ``app_name``'s flow once per date (``config`` holds the templates); return outcomes in date order.

    Ctrl-C (KeyboardInterrupt in the main thread) starts no further date, interrupts the running
    ones (up to ``grace_s`` for them to stop) and raises :class:`BackfillInterrupted`; a second
    Ctrl-C exits at once with code 130.
    """
    import queue
    import signal

    from prefect import tags

    from flows.pipeline import FLOWS
    from tasks.execution import with_environment_defaults
    from tasks.schedule import LATEST, has_template, latest_model_run

    flow_fn = FLOWS[app_name]
    config = config.model_copy(update={"skip_existing": not force})
    if getattr(config, "model_run", None) == LATEST:
        # One model for every date, chosen now: each date's run chose it as it started, so a training that
        # finished meanwhile (the nightly one, a colleague's) gave the later dates another model than the first.
        # None there: one refusal (exit 4) instead of the same failure for every date.
        newest = latest_model_run(app_name, with_environment_defaults(config).output)
        log.info("--model latest: %s for every date", newest)
        config = config.model_copy(update={"model_run": newest})
    output = with_environment_defaults(config).output
    if not has_template(output):
        # An output bucket that does not exist (or a store that refuses us) failed every date alike, each with
        # "run the same command again" advice that cannot help: one refusal (exit 4) before any date runs. Not
        # for a local folder: checking creates it, and a backfill refused later (no Prefect server) left it.
        from tasks.storage import ArtifactStore, is_local

        store = ArtifactStore(output)
        if not is_local(store.fs):
            store.check_writable()
    lock = threading.Lock()
    stop = threading.Event()
    running: dict[dt.date, int] = {}  # date -> thread ident, while its run is in progress

    def one(day: dt.date, dask_address: str | None) -> DateOutcome:
        cfg = config.model_copy(update={"dask_address": dask_address}) if dask_address else config
        try:
            with tags("backfill", app_name):
                state = flow_fn(config=cfg, date=day, return_state=True)
        except BaseException as e:  # the flow engine re-raises a few things (e.g. bad parameters)
            if stop.is_set():
                return DateOutcome(day, "interrupted", message="interrupted (Ctrl-C or SIGTERM)")
            return DateOutcome(day, "failed", message=_message(e))
        run_id = str(state.state_details.flow_run_id) if state.state_details and state.state_details.flow_run_id else ""
        ids = {"flow_run_id": run_id, "flow_run_name": "" if stop.is_set() else _flow_run_name(run_id)}
        if state.is_completed():
            result = state.result()
            return DateOutcome(day, "skipped" if result.skipped else "completed", result.run_uri, **ids)
        if stop.is_set():
            return DateOutcome(day, "interrupted", message="interrupted (Ctrl-C or SIGTERM)", **ids)
        exc = state.result(raise_on_failure=False)
        msg = _message(exc) if isinstance(exc, BaseException) else (state.message or "")
        return DateOutcome(day, state.type.value.lower(), message=msg, **ids)

    _connect_once()
    outcomes: dict[dt.date, DateOutcome] = {}
    todo: queue.Queue[dt.date] = queue.Queue()
    for d in dates:
        todo.put(d)
    results: queue.Queue[DateOutcome] = queue.Queue()
    # Each date runs in a copy of this context, so Prefect settings (API URL, profile) and
    # tags set by the caller reach the worker threads.
    contexts = {d: contextvars.copy_context() for d in dates}

    def worker(address: str | None) -> None:
        while not stop.is_set():
            try:
                day = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                if stop.is_set():
                    return
                running[day] = threading.get_ident()
            try:
                outcome = contexts[day].run(one, day, address)
            except BaseException as e:  # noqa: BLE001 - an interrupt that landed outside the flow
                outcome = DateOutcome(day, "interrupted" if stop.is_set() else "failed", message=_message(e))
            finally:
                with lock:
                    running.pop(day, None)
            results.put(outcome)

    # Worker processes import the libraries when they start (~10 s on 2 cores): started once and shared
    # when the config asks for processes. Otherwise each date's run decides as `aeflow run` does
    # (local_cluster=auto: worker threads in this process, up in a second, for inputs up to 256 MB).
    with _shared_dask(config.dask_address, needed=config.local_cluster == "processes") as address:
        # Daemon threads, not a ThreadPoolExecutor: leaving one waits for every queued date, and
        # interpreter exit waits for its threads, so Ctrl-C could not end a backfill.
        threads = [threading.Thread(target=worker, args=(address,), name=f"backfill-{i}", daemon=True)
                   for i in range(max(1, min(parallel, len(dates))))]
        for t in threads:
            t.start()
        try:
            while len(outcomes) < len(dates):
                try:
                    outcome = results.get(timeout=0.2)  # a timed wait, so Ctrl-C is seen at once
                except queue.Empty:
                    if not any(t.is_alive() for t in threads) and results.empty():
                        break
                    continue
                outcomes[outcome.date] = outcome
                if on_done:
                    on_done(outcome)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as Terminated (the CLI's sigterm_as_interrupt)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, _exit_now)
            with lock:
                stop.set()
                idents = list(running.values())
                was_running = set(running)
            for ident in idents:
                _raise_in_thread(ident, KeyboardInterrupt)
            deadline = time.monotonic() + grace_s
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            while not results.empty():
                o = results.get_nowait()
                outcomes[o.date] = o
            final = [outcomes.get(d) or DateOutcome(d, "interrupted" if d in was_running else "not run") for d in dates]
            raise BackfillInterrupted(final, terminated=isinstance(e, Terminated)) from None
    return [outcomes.get(d) or DateOutcome(d, "failed", message="did not run (its worker thread ended)") for d in dates]


def _flow_run_name(flow_run_id: str) -> str:
    """The flow run's name as the server knows it (what the UI lists); "" when it cannot be read."""
    if not flow_run_id:
        return ""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).name or ""
    except Exception:  # noqa: BLE001 - a name is metadata: never fail a finished date for it
        return ""


def _connect_once() -> None:
    """Reach the API once from this thread, so that in ephemeral mode (no PREFECT_API_URL) the
    temporary server starts once here instead of racing to start in every worker thread."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


def _message(e: BaseException) -> str:
    if isinstance(e, AeflowError):
        return str(e)
    return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------
# through a deployment


def explicit_overrides(file: Any = None, options: dict[str, Any] | None = None, sets: list[str] | None = None) -> dict[str, Any]:
    """Only what the user gave (``--config`` file, options that are not None, ``--set``), nested.

    A deployment's parameters are the base of a backfill through it; overriding them
    with a whole validated config would reset every key of a touched section to the
    application's defaults (``-i`` would drop the deployment's ``load.id_column``).
    """
    from tasks.config import given_config

    return json.loads(json.dumps(given_config(file, options, sets), default=str))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def find_deployment(client: Any, name: str) -> Any:
    """A deployment by ``flow/deployment`` or by its bare deployment name (when unique)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound as e:
            raise ConfigError(f"no deployment {name!r} on the server") from e
    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if not found:
        raise ConfigError(f"no deployment named {name!r} on the server")
    if len(found) > 1:
        raise ConfigError(f"several deployments are named {name!r}; use FLOW/DEPLOYMENT")
    return found[0]


def run_via_deployment(
    deployment_name: str,
    dates: list[dt.date],
    config_overrides: dict[str, Any],
    *,
    app_name: str,
    force: bool = False,
    wait: bool = False,
    poll_s: float = 2.0,
    on_done: Callable[[DateOutcome], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> list[DateOutcome]:
    """Create one flow run of the deployment per date (tagged ``backfill``); optionally wait for them,
    telling ``on_wait`` after each look what the unfinished ones do (:func:`waiting_summary`).

    Raises:
        ServerUnreachable: no healthy Prefect server at PREFECT_API_URL (before creating anything).
        ConfigError: no such deployment, or it runs another application's flow (before creating anything).
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import api_healthy

    api_url = PREFECT_API_URL.value()
    if api_url and not api_healthy(api_url):
        raise ServerUnreachable(f"no healthy Prefect server at {api_url} (PREFECT_API_URL)")
    try:
        return _run_via_deployment(deployment_name, dates, config_overrides, app_name=app_name, force=force,
                                   wait=wait, poll_s=poll_s, on_done=on_done, on_wait=on_wait)
    except httpx.TransportError as e:  # the server went away mid-way
        raise ServerUnreachable(f"the Prefect server at {api_url or '(ephemeral)'} became unreachable: {e}") from e


def check_deployment_app(client: Any, dep: Any, app_name: str) -> None:
    """Refuse a deployment whose flow is not ``app_name``'s (its flow, or its ``APP-...`` pipeline flow)."""
    flow_name = client.read_flow(dep.flow_id).name
    if flow_name != app_name and not flow_name.startswith(f"{app_name}-"):
        raise ConfigError(f"deployment {dep.name!r} runs flow {flow_name!r}, not {app_name!r}: "
                          f"use `aeflow backfill {flow_name.split('-')[0]} --via-deployment {dep.name}` or a deployment of {app_name}")


def _run_via_deployment(
    deployment_name: str,
    dates: list[dt.date],
    config_overrides: dict[str, Any],
    *,
    app_name: str,
    force: bool,
    wait: bool,
    poll_s: float,
    on_done: Callable[[DateOutcome], None] | None,
    on_wait: Callable[[str], None] | None = None,
) -> list[DateOutcome]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL

    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    outcomes: list[DateOutcome] = []
    with get_client(sync_client=True) as client:
        dep = find_deployment(client, deployment_name)
        check_deployment_app(client, dep, app_name)
        try:
            _create_and_wait(client, dep, dates, config_overrides, outcomes, app_name=app_name, force=force, wait=wait,
                             poll_s=poll_s, on_done=on_done, on_wait=on_wait, ui=ui)
        except KeyboardInterrupt as e:  # stops this command only: the flow runs created go on on the workers
            created = {o.date for o in outcomes}
            raise BackfillInterrupted([*outcomes, *(DateOutcome(d, "not run") for d in dates if d not in created)],
                                      detached=True, terminated=isinstance(e, Terminated)) from None
    return outcomes


def _create_and_wait(client: Any, dep: Any, dates: list[dt.date], config_overrides: dict[str, Any],
                     outcomes: list[DateOutcome], *, app_name: str, force: bool, wait: bool, poll_s: float,
                     on_done: Callable[[DateOutcome], None] | None, ui: str,
                     on_wait: Callable[[str], None] | None = None) -> None:
    """The body of :func:`_run_via_deployment`: ``outcomes`` grows as flow runs are created (and, with
    ``wait``, their states are read until final)."""
    base_cfg = (dep.parameters or {}).get("config") or {}
    cfg = _deep_merge(base_cfg, config_overrides)
    cfg["skip_existing"] = not force
    for day in dates:
        params = {**(dep.parameters or {}), "config": cfg, "date": day.isoformat()}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
        base_key = f"aeflow-backfill/{dep.id}/{day.isoformat()}/{digest}"
        if force:
            base_key += f"/force-{time.time_ns()}"
        fr = None
        for attempt in range(100):
            key = base_key if attempt == 0 else f"{base_key}/retry-{attempt}"
            try:
                fr = client.create_flow_run_from_deployment(
                    dep.id, parameters=params, tags=["backfill", app_name], idempotency_key=key
                )
            except Exception as e:  # e.g. parameters rejected by the deployment's schema
                outcomes.append(DateOutcome(day, "error", message=_message(e)))
                fr = None
                break
            if fr.state is None or fr.state.type.value not in FAILED_STATES:
                break  # a new run, or one that is scheduled, running or complete: keep it
        if fr is None:
            if on_done:
                on_done(outcomes[-1])
            continue
        state = fr.state.type.value if fr.state else "PENDING"
        outcome = DateOutcome(
            day,
            "skipped" if state == "COMPLETED" else state.lower(),
            flow_run_id=str(fr.id),
            flow_run_name=fr.name,
            flow_run_url=f"{ui}/runs/flow-run/{fr.id}" if ui else str(fr.id),
        )
        if outcome.status == "skipped":  # its flow run completed earlier: the run folder it made or found
            outcome.run_uri = run_folder(client, outcome.flow_run_id, app_name)
        outcomes.append(outcome)
        if on_done and not wait:
            on_done(outcome)
    if wait:
        pending = {o.flow_run_id: o for o in outcomes if o.flow_run_id}
        for o in outcomes:
            if o.status == "skipped" or not o.flow_run_id:
                pending.pop(o.flow_run_id, None)
                if on_done and o.flow_run_id:
                    on_done(o)
        while pending:
            time.sleep(poll_s)
            for frid, o in list(pending.items()):
                fr = client.read_flow_run(frid)
                st = fr.state.type.value if fr.state else "PENDING"
                o.status = st.lower()
                o.flow_run_name = fr.name or o.flow_run_name  # a run renames itself (reduce-DATE-...) as it starts
                if st in FINAL_STATES:
                    if st != "COMPLETED":
                        o.message = fr.state.message or ""
                    else:
                        o.run_uri = run_folder(client, frid, app_name)
                    del pending[frid]
                    if on_done:
                        on_done(o)
            if on_wait and pending:
                on_wait(waiting_summary(client, [o.status for o in pending.values()], list(pending)))


def waiting_summary(client: Any, states: list[str], flow_run_ids: list[str]) -> str:
    """What the unfinished flow runs of a backfill do, for its progress line: "2 running, 1 waiting for a
    'training' slot, 1 scheduled". A run whose fit task waits for the ``training`` tag's slot is counted as
    waiting (Prefect shows it RUNNING, and its wait was silent); best effort, the states alone otherwise."""
    from uuid import UUID

    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
        TaskRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    counts: dict[str, int] = {}
    for st in states:
        counts[st] = counts.get(st, 0) + 1
    if counts.get("running"):
        try:
            fits = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(i) for i in flow_run_ids]),
                tags=TaskRunFilterTags(all_=["training"]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.PENDING]))))
            slot = len({f.flow_run_id for f in fits})
        except Exception:  # noqa: BLE001 - a progress line never fails the backfill
            slot = 0
        if slot:
            counts["running"] -= slot
            counts = {"running": counts.pop("running"), "waiting for a 'training' slot": slot, **counts}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def run_folder(client: Any, flow_run_id: str, app_name: str) -> str:
    """The run folder a completed flow run made (or, skipped as already done, found): its link artifact
    (:func:`tasks.report.publish_run_link`); "" when it has none (a flow run of an older aeflow)."""
    from uuid import UUID

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    from tasks.report import RUN_LINK_KEY

    try:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
            key=ArtifactFilterKey(any_=[RUN_LINK_KEY.format(app=app_name)])))
    except Exception as e:  # noqa: BLE001 - a lookup for the table, which still names the flow run
        log.debug("no run link for flow run %s: %s", flow_run_id, e)
        return ""
    for a in found:
        data = a.data
        if isinstance(data, str) and "](" in data:  # a link artifact's data: "[text](link)"
            return data.rsplit("](", 1)[1].removesuffix(")")
    return ""


def exit_code(outcomes: list[DateOutcome]) -> int:
    return 0 if all(o.ok for o in outcomes) else 1


