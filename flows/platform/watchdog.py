"""The platform's watchdog: no flow run stays "running" after its process is gone, no slot stays taken.

Prefect 3.9 starts each flow run in a session of its own below the worker. When the
worker *and* its flow run are killed (a lost container or machine: SIGKILL), nobody
reports a final state: the flow run would stay RUNNING forever, and its running
``fit`` task would keep the ``training`` tag's concurrency slot, so no later run
could train. Prefect's server frees the task runs of a *cancelled* flow run, not of
a crashed one. The watchdog closes both gaps for the platform's own workers:

1. it remembers, for each RUNNING flow run of the work pool, the process that a
   platform worker started for it (``infrastructure_pid``, checked to descend from
   that worker, and its start time); when that process is gone and the flow run is
   still RUNNING a few seconds later, it sets the flow run to CRASHED;
2. a task run still RUNNING or PENDING inside a flow run that has ended (crashed,
   failed or cancelled: by the watchdog, by its worker after the process died, by an
   operator) is set to CRASHED too, which releases its tag concurrency slots —
   unless the flow run's process still runs on this machine;
3. (with a platform directory, whose workers run on this machine) a flow run of the pool
   still RUNNING or CANCELLING that started before this watchdog did, and whose process
   is no longer alive here, was left by a platform that stopped under it (``platform
   down`` mid-run, a reboot): RUNNING is set to CRASHED, CANCELLING to CANCELLED, and its
   task runs are freed. Without this, its ``fit`` task kept the ``training`` slot after the
   next ``up`` and every later training waited for ever.

Every crash of a flow run of the pool that it sees end while it watches is in its log, once:
the ones it marks itself (rules 1 and 3, with why), and the ones that its worker, the flow
run's own process or the server marked CRASHED first (a flow-run process killed under a
live worker: the worker reports it), with their message — so ``watchdog.log`` lists every
crash, whichever worker's log holds the details.

A heartbeat file (``DIR/watchdog.alive``) is touched every loop: ``platform status``
reads it. Run by ``aeflow platform up``; ``python -m flows.platform.watchdog --dir DIR``
(or ``--api-url URL --pool NAME`` where the workers run in other containers: rule 2 only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from flows.platform.state import PlatformState


@dataclass
class Tracked:
    pid: int
    create_time: float
    worker: str
    gone_since: float | None = None


def log(msg: str) -> None:
    print(f"{dt.datetime.now():%Y-%m-%d %H:%M:%S} watchdog: {msg}", flush=True)


def _worker_pids(state: PlatformState) -> dict[int, str]:
    return {rec.pid: name for name, rec in state.components.items() if name.startswith("prefect-worker-") and rec.alive}


def _started_by(pid: int, workers: dict[int, str]) -> tuple[float, str] | None:
    """(start time, worker name) when ``pid`` runs below one of our workers."""
    try:
        p = psutil.Process(pid)
        for parent in p.parents():
            if parent.pid in workers:
                return p.create_time(), workers[parent.pid]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return None


def _gone(t: Tracked) -> bool:
    try:
        p = psutil.Process(t.pid)
        return abs(p.create_time() - t.create_time) > 1.0 or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _pid_alive(pid_text: str | None) -> bool:
    try:
        p = psutil.Process(int(pid_text or ""))
        return p.status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.NoSuchProcess):
        return False
    except psutil.AccessDenied:
        return True


def _process_of(pid_text: str | None, started: dt.datetime | None) -> bool:
    """Whether ``pid_text`` is a live process here that could be the flow run started at ``started`` (not a
    later process that reuses the number: one created after the flow run started is not it)."""
    try:
        p = psutil.Process(int(pid_text or ""))
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or p.create_time() <= started.timestamp() + 5.0
    except (ValueError, psutil.NoSuchProcess):
        return False
    except psutil.AccessDenied:
        return True


class Watchdog:
    """One watchdog over one platform directory, or (``directory`` None) over a pool on a remote API.

    Without a platform directory it cannot see the workers' processes: it only frees
    the task runs of ended flow runs (rule 2); Prefect's heartbeat automation marks
    the flow runs of lost containers crashed (``flows.platform.setup``).
    """

    def __init__(self, directory: Path | None, grace: float = 3.0, api_url: str | None = None,
                 pool: str = "aeflow-process") -> None:
        self.dir = directory
        self.grace = grace
        self.api_url = api_url
        self.pool = pool
        self.tracked: dict[Any, Tracked] = {}
        self.last_error = ""
        self.started = dt.datetime.now(dt.UTC)  # rule 3: flow runs older than this watchdog
        self.logged: dict[Any, float] = {}  # crashed flow runs already in the log (id -> when), each once

    def tick(self) -> None:
        """One pass: track new flow-run processes, crash orphaned runs, free their task runs."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType

        if self.dir is None:
            with SyncPrefectClient(self.api_url) as c:
                self.free_orphaned_tasks(c, self.pool)
            return
        state = PlatformState.load(self.dir)
        (self.dir / "watchdog.alive").touch()
        workers = _worker_pids(state)
        pool = state.settings.get("pool", "aeflow-process")
        with SyncPrefectClient(f"http://127.0.0.1:{state.ports['prefect']}/api") as c:
            running = c.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
                limit=200,
            )
            now = time.monotonic()
            seen = set()
            for fr in running:
                seen.add(fr.id)
                t = self.tracked.get(fr.id)
                if t is None:
                    if fr.infrastructure_pid and fr.infrastructure_pid.isdigit():
                        found = _started_by(int(fr.infrastructure_pid), workers)
                        if found is not None:
                            self.tracked[fr.id] = Tracked(int(fr.infrastructure_pid), found[0], found[1])
                    continue
                if not _gone(t):
                    t.gone_since = None
                    continue
                if t.gone_since is None:
                    t.gone_since = now  # its worker may still be about to report the exit
                    continue
                if now - t.gone_since >= self.grace:
                    self.crash(c, fr.id, t)
            for frid in set(self.tracked) - seen:
                del self.tracked[frid]
            self.end_stale_runs(c, pool)
            self.free_orphaned_tasks(c, pool)

    def end_stale_runs(self, c: Any, pool: str) -> None:
        """Rule 3: RUNNING/CANCELLING flow runs of the pool older than this watchdog whose process is gone."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled, Crashed

        stale = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.CANCELLING])),
                start_time=FlowRunFilterStartTime(before_=self.started),
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            limit=200,
        )
        for fr in stale:
            if fr.id in self.tracked or _process_of(fr.infrastructure_pid, fr.start_time):
                continue
            was = fr.state.type.value
            why = (f"Its process (pid {fr.infrastructure_pid or '?'}) is gone: the platform stopped while it ran "
                   "(aeflow platform down, or the machine restarted).")
            if was == "CANCELLING":
                new_state = Cancelled(message=f"{why} Cancelled by the aeflow platform watchdog.")
            else:
                new_state = Crashed(message=f"{why} Marked crashed by the aeflow platform watchdog; running it again "
                                            "resumes from its training checkpoint.")
            result = c.set_flow_run_state(fr.id, new_state, force=True)
            # the state set, not the API's answer (the log said "-> ACCEPT")
            said = new_state.type.value if result.status.value == "ACCEPT" else f"not set ({result.status.value})"
            log(f"flow run {fr.name} ({fr.id}), {was} since before this watchdog started, process gone -> {said}")
            self.logged[fr.id] = time.time()
            self.free_tasks_of(c, c.read_flow_run(fr.id))

    def crash(self, c: Any, flow_run_id: Any, t: Tracked) -> None:
        from prefect.states import Crashed

        fr = c.read_flow_run(flow_run_id)
        if fr.state is None or fr.state.type.value != "RUNNING":
            self.tracked.pop(flow_run_id, None)
            return
        msg = (f"The flow run's process (pid {t.pid}, started by {t.worker}) is gone without reporting a final "
               f"state: its worker or machine was killed. Marked crashed by the aeflow platform watchdog.")
        result = c.set_flow_run_state(flow_run_id, Crashed(message=msg), force=False)
        said = "CRASHED" if result.status.value == "ACCEPT" else f"not set ({result.status.value}: reported first)"
        log(f"flow run {fr.name} ({flow_run_id}): process {t.pid} of {t.worker} is gone -> {said}")
        if result.status.value == "ACCEPT":  # else another reported first: logged as such (note_crash)
            self.logged[flow_run_id] = time.time()
        self.tracked.pop(flow_run_id, None)
        self.free_tasks_of(c, c.read_flow_run(flow_run_id))

    def free_orphaned_tasks(self, c: Any, pool: str) -> None:
        """Task runs still running in flow runs of the pool that ended within the last hour; each crash logged."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterEndTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterName,
        )
        from prefect.client.schemas.objects import StateType

        ended = c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.CRASHED, StateType.FAILED, StateType.CANCELLED])),
                end_time=FlowRunFilterEndTime(after_=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)),
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            limit=200,
        )
        for fr in ended:
            if fr.state is not None and fr.state.type.value == "CRASHED":
                self.note_crash(fr)
            if not _pid_alive(fr.infrastructure_pid):
                self.free_tasks_of(c, fr)
        cutoff = time.time() - 2 * 3600  # past the hour that is read: never seen again
        self.logged = {k: v for k, v in self.logged.items() if v > cutoff}

    def note_crash(self, fr: Any) -> None:
        """Log, once, a crash that this watchdog did not mark: the flow run's worker or its own process did."""
        if fr.id in self.logged:
            return
        self.logged[fr.id] = time.time()
        if fr.end_time is not None and fr.end_time < self.started:
            return  # it ended before this watchdog watched
        message = " ".join((fr.state.message or "no message").split())
        if len(message) > 300:
            message = message[:297] + "..."
        log(f"flow run {fr.name} ({fr.id}): CRASHED, reported by its worker or its own process "
            f"(pid {fr.infrastructure_pid or '?'}): {message}")

    def free_tasks_of(self, c: Any, fr: Any) -> None:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            TaskRunFilter,
            TaskRunFilterState,
            TaskRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        stuck = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))),
        )
        for tr in stuck:
            state = fr.state.type.value.lower() if fr.state else "ended"
            c.set_task_run_state(tr.id, Crashed(message=f"Its flow run {fr.name} {state}; marked crashed by the "
                                                          f"aeflow platform watchdog (frees its concurrency slots)."),
                                 force=True)
            log(f"task run {tr.name} ({tr.id}) of {state} flow run {fr.name} -> CRASHED (tags {tr.tags})")

    def run(self, interval: float) -> None:
        log(f"watching {self.dir or self.api_url} every {interval:g}s")
        while True:
            try:
                self.tick()
                if self.last_error:
                    log("the Prefect API answers again")
                self.last_error = ""
            except Exception as e:  # the server restarting, a network blip: keep watching
                text = f"{type(e).__name__}: {e}"
                if text != self.last_error:
                    log(f"pass failed ({text}); retrying")
                self.last_error = text
                if self.dir is not None:
                    try:
                        (self.dir / "watchdog.alive").touch()
                    except OSError:
                        pass
            time.sleep(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path, help="The platform directory (holds platform.json).")
    where.add_argument("--api-url", help="A Prefect API whose workers run elsewhere: only free the task runs of ended runs.")
    parser.add_argument("--pool", default="aeflow-process", help="With --api-url: the work pool watched.")
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between passes.")
    parser.add_argument("--grace", type=float, default=3.0, help="Seconds a vanished process's run may still report itself.")
    args = parser.parse_args(argv)
    try:
        Watchdog(args.dir.resolve() if args.dir else None, grace=args.grace, api_url=args.api_url,
                 pool=args.pool).run(args.interval)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
