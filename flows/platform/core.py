"""``up``, ``status`` and ``down`` of the shared installation.

``up`` is idempotent: on a platform directory whose components all run and answer,
it changes nothing; a component that is not running (stopped, crashed, killed) is
started again on its recorded ports with its data, so ``up`` both starts the
platform and repairs it. Independent components start side by side (the object
store and the Dask scheduler while PostgreSQL initialises), then each is waited
for until it answers its health check; a failure names the component and its log
and stops what this ``up`` started.

Over 400 lines on purpose: ``up``, ``status`` and ``down`` share the state file and the start
order of the components, and each handles partial failure of the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.platform import components as C
from flows.platform.procs import (
    ProcRecord,
    free_ports,
    port_free,
    require_free_port,
    stop,
)
from flows.platform.state import PORT_NAMES, PlatformState, locked
from tasks.errors import ConfigError, PlatformError, PortInUse

DEFAULT_DIR = Path(".aeflow") / "platform"


class NoPlatform(PlatformError):
    """``status``/``down`` on a directory that holds no platform: nothing there (exit 4, as a run that
    does not exist), not a component that did not start (6)."""

    exit_code = 4


DEFAULTS: dict[str, Any] = {
    "workers": 2,            # Prefect worker processes on the work pool
    "worker_limit": 1,       # flow runs each worker executes at once (0: unlimited)
    "dask_workers": 2,
    "dask_threads": 1,
    "pool": "aeflow-process",
    "bucket": "aeflow",
    "prefix": "artifacts",
    "poll_seconds": 5,       # how often a Prefect worker asks for runs
    "training_slots": 1,     # the `training` tag concurrency limit (one per GPU)
    "pg_user": None,
}
# Seconds a component may take to answer after it starts (loaded 2-core machines are slow).
START_TIMEOUT = {"prefect-server": 240.0, "seaweedfs": 90.0, "dask": 90.0, "prefect-worker": 120.0, "watchdog": 60.0}
STOP_GRACE = {"seaweedfs": 3.0}
STOP_PHASES = (("watchdog", "prefect-worker"), ("dask-worker",), ("dask-scheduler", "seaweedfs", "prefect-server"), ("postgres",))  # weed's graceful stop takes ~30 s; its volumes are safe to kill


@dataclass
class Event:
    """Progress of ``up``/``down``: a component and what happened to it."""

    component: str
    action: str  # running | starting | started | stopping | stopped | skipped | deployed
    detail: str = ""


Listener = Callable[[Event], None]


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(1, n + 1)]


def component_order(state: PlatformState) -> list[str]:
    """Every component of the platform, in start order."""
    s = state.settings
    return (["postgres", "prefect-server", "seaweedfs", "dask-scheduler"]
            + _names("dask-worker", int(s["dask_workers"]))
            + _names("prefect-worker", int(s["workers"]))
            + ["watchdog"])


class _Up:
    """One run of ``up`` on a locked state."""

    def __init__(self, state: PlatformState, emit: Listener) -> None:
        self.state = state
        self.emit = emit
        self.started: list[str] = []
        self.spawned_at: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------
    def running(self, name: str) -> ProcRecord | None:
        rec = self.state.components.get(name)
        return rec if rec is not None and rec.alive else None

    def record(self, rec: ProcRecord) -> None:
        self.state.components[rec.name] = rec
        self.started.append(rec.name)
        self.spawned_at[rec.name] = time.time()
        self.state.save()
        self.emit(Event(rec.name, "starting", f"pid {rec.pid}, log {rec.log}"))

    def keep_or_restart(self, name: str, healthy: Callable[[], bool], grace: float = 20.0) -> bool:
        """True when ``name`` runs and answers (given ``grace`` seconds); a wedged one is stopped here."""
        rec = self.running(name)
        if rec is None:
            return False
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if healthy():
                    self.emit(Event(name, "running", f"pid {rec.pid}"))
                    return True
            except Exception:
                pass
            time.sleep(0.5)
        self.emit(Event(name, "stopping", "running but not answering its health check; restarting it"))
        stop(rec, grace=STOP_GRACE.get(name, 10.0))
        return False

    def done(self, name: str, t0: float) -> None:
        self.state.timings[name] = round(time.monotonic() - t0, 2)
        self.emit(Event(name, "started", f"{self.state.timings[name]:.1f}s"))

    # -- the sequence ----------------------------------------------------------------------
    def run(self) -> None:
        st = self.state
        t_all = time.monotonic()
        t = {n: time.monotonic() for n in component_order(st)}
        # 1. no waiting: the object store and the scheduler start while PostgreSQL initialises
        need_weed = not self.keep_or_restart("seaweedfs", lambda: C.seaweedfs_healthy(st))
        if need_weed:
            C.remove_weed_sockets(st)
            self.record(C.start_seaweedfs(st))
        need_sched = not self.keep_or_restart("dask-scheduler", lambda: C.dask_scheduler_healthy(st))
        if need_sched:
            self.record(C.start_dask_scheduler(st))
        # 2. PostgreSQL (blocking: initdb the first time, pg_ctl -w)
        if not self.keep_or_restart("postgres", lambda: C.postgres_healthy(st), grace=30):
            t["postgres"] = time.monotonic()
            self.emit(Event("postgres", "starting", "initdb + pg_ctl start" if not (C.Layout(st.dir).pg_data / "PG_VERSION").exists() else "pg_ctl start"))
            rec = C.start_postgres(st)
            self.state.components["postgres"] = rec
            self.started.append("postgres")
            st.save()
            self.done("postgres", t["postgres"])
        # 3. the Prefect server on it, and the Dask workers
        need_server = not self.keep_or_restart("prefect-server", lambda: C.prefect_healthy(st))
        if need_server:
            t["prefect-server"] = time.monotonic()
            self.record(C.start_prefect_server(st))
        # A running worker is kept: it reconnects by itself to a scheduler or server that restarted.
        dask_names = _names("dask-worker", int(st.settings["dask_workers"]))
        need_dask = []
        for name in dask_names:
            if self.running(name):
                self.emit(Event(name, "running", f"pid {self.state.components[name].pid}"))
                continue
            t[name] = time.monotonic()
            self.record(C.start_dask_worker(st, name))
            need_dask.append(name)
        self._stop_extra("dask-worker", dask_names)
        # 4. wait for what was started
        if need_weed:
            C.ensure_bucket(st, st.components["seaweedfs"], START_TIMEOUT["seaweedfs"])
            self.done("seaweedfs", t["seaweedfs"])
        else:
            C.ensure_bucket(st, st.components["seaweedfs"], 30)
        if need_sched:
            C.wait_healthy(st.components["dask-scheduler"], lambda: C.dask_scheduler_healthy(st),
                           START_TIMEOUT["dask"], "/health")
            self.done("dask-scheduler", t["dask-scheduler"])
        for name in need_dask:
            C.wait_healthy(st.components[name], lambda n=name: n in C.dask_workers(st), START_TIMEOUT["dask"],
                           "registered with the scheduler")
            self.done(name, t[name])
        if need_server:
            C.wait_healthy(st.components["prefect-server"], lambda: C.prefect_healthy(st), START_TIMEOUT["prefect-server"],
                           f"{C.api_url(st)}/ready")
            self.done("prefect-server", t["prefect-server"])
        # 5. the work pool and the training limit; the deployments while the workers start
        C.ensure_pool_and_limits(st)
        deploying = _Background(lambda: C.deploy(st, force=bool(st.settings.get("redeploy"))))
        # 6. the Prefect workers and the watchdog
        worker_names = _names("prefect-worker", int(st.settings["workers"]))
        need_workers = []
        for name in worker_names:
            if self.running(name):
                self.emit(Event(name, "running", f"pid {self.state.components[name].pid}"))
                continue
            t[name] = time.monotonic()
            self.record(C.start_prefect_worker(st, name))
            need_workers.append(name)
        self._stop_extra("prefect-worker", worker_names)
        need_watchdog = not self.keep_or_restart("watchdog", lambda: C.watchdog_healthy(st, time.time() - 10), grace=5)
        if need_watchdog:
            t["watchdog"] = time.monotonic()
            self.record(C.start_watchdog(st))
        if deploying.result():
            st.timings["deploy"] = round(deploying.seconds, 2)
            names = C.deployment_names(Path(st.settings["deploy_file"]))
            self.emit(Event(f"{len(names)} deployment{'s' if len(names) != 1 else ''}", "deployed",
                            f"from {st.settings['deploy_file']} ({st.timings['deploy']:.1f}s)"))
        for name in need_workers:
            since = self.spawned_at[name]

            def heard(n: str = name, since: float = since) -> bool:
                w = C.online_workers(st).get(n)
                beat = getattr(w, "last_heartbeat_time", None) if w is not None else None
                return beat is not None and beat.timestamp() >= since - 1

            C.wait_healthy(st.components[name], heard, START_TIMEOUT["prefect-worker"], f"online in pool {st.settings['pool']!r}")
            self.done(name, t[name])
        if need_watchdog:
            since = self.spawned_at["watchdog"]
            C.wait_healthy(st.components["watchdog"], lambda: C.watchdog_healthy(st, since), START_TIMEOUT["watchdog"],
                           "heartbeat file")
            self.done("watchdog", t["watchdog"])
        if self.started:
            st.timings["up"] = round(time.monotonic() - t_all, 2)
        st.save()

    def _stop_extra(self, prefix: str, wanted: list[str]) -> None:
        for name in [n for n in self.state.components if n.startswith(prefix + "-") and n not in wanted]:
            self.emit(Event(name, "stopping", "no longer wanted"))
            stop(self.state.components.pop(name))
            self.emit(Event(name, "stopped"))
        self.state.save()

    def rollback(self) -> None:
        """Stop what this ``up`` started (after a failure)."""
        for name in reversed(self.started):
            rec = self.state.components.get(name)
            if rec is None:
                continue
            _stop_component(self.state, name, rec)
            self.state.components.pop(name, None)
        self.state.save()


class _Background:
    """A call running in a thread; ``result()`` joins it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        t0 = time.monotonic()

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as e:  # handed to the caller by result()
                self._error = e
            self.seconds = time.monotonic() - t0

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


# The ports clients are given (each set by an option of `up`), and what listens there.
CLIENT_PORTS = {
    "prefect": ("--prefect-port", "prefect-server", "the Prefect API and UI"),
    "s3": ("--s3-port", "seaweedfs", "the S3 endpoint"),
    "dask": ("--dask-port", "dask-scheduler", "the Dask scheduler"),
    "postgres": ("--postgres-port", "postgres", "PostgreSQL"),
}


def _port_owner(name: str) -> str:
    return CLIENT_PORTS[name][1] if name in CLIENT_PORTS else ("dask-scheduler" if name == "dask_http" else "seaweedfs")


def _allocate_ports(state: PlatformState, requested: dict[str, int | None]) -> None:
    """Ports: as given, else as recorded (so clients' settings stay valid), else free ones.

    Checked before anything starts (a component that cannot bind only says so in its log, after
    the ones started before it): a port given for two roles, or one another program holds, is
    refused (:class:`PortInUse`, exit 2) naming the option that moves it; an internal port
    (SeaweedFS's own, the scheduler's HTTP) that another program took is chosen afresh.
    """
    for name, port in requested.items():
        if not port:
            continue
        have = state.ports.get(name)
        owner = _port_owner(name)
        rec = state.components.get(owner)
        if have and have != port and rec is not None and rec.alive:
            option = CLIENT_PORTS[name][0] if name in CLIENT_PORTS else "the option"
            raise ConfigError(f"{owner} already runs on port {have} in {state.dir}, so {option} {port} cannot move it "
                              f"while it runs; run `aeflow platform down --dir {state.dir}` first (or drop {option}); "
                              "nothing was changed")
        state.ports[name] = port
    given = {n: p for n, p in requested.items() if p}
    clients = {n: p for n, p in state.ports.items() if n in CLIENT_PORTS}
    for name, port in clients.items():
        twice = [n for n, p in clients.items() if p == port and n != name]
        if twice:
            pair = sorted([name, *twice], key=lambda n: n not in given)
            opts = " and ".join(CLIENT_PORTS[n][0] for n in pair)
            raise PortInUse(f"port {port} is set for both {opts} (one port, one server); pass another "
                            f"{CLIENT_PORTS[pair[0]][0]}; nothing was started")
    for name, port in list(state.ports.items()):  # an internal port that a given one now collides with
        if name not in CLIENT_PORTS and port in clients.values():
            owner, rec = _port_owner(name), state.components.get(_port_owner(name))
            if rec is not None and rec.alive:
                option = next(CLIENT_PORTS[n][0] for n, p in clients.items() if p == port)
                raise PortInUse(f"port {port} is one of {owner}'s, running in {state.dir}; pass another {option}; "
                                "nothing was started")
            del state.ports[name]
    missing = [n for n in PORT_NAMES if n not in state.ports]
    for name, port in zip(missing, free_ports(len(missing), avoid=set(state.ports.values())), strict=True):
        state.ports[name] = port
    # a recorded port that another program took meanwhile: say which, before starting anything
    for name, port in state.ports.items():
        owner = _port_owner(name)
        rec = state.components.get(owner)
        if rec is not None and rec.alive:
            continue
        if name not in CLIENT_PORTS:
            if not port_free(C.HOST, port):  # no client knows it: another free one does as well
                state.ports[name] = free_ports(1, avoid=set(state.ports.values()))[0]
            continue
        option, _, what = CLIENT_PORTS[name]
        require_free_port(C.HOST, port, user=f"{owner} ({what})",
                          change=f"free it, or pass another {option}; nothing was started")


def up(
    directory: Path = DEFAULT_DIR,
    *,
    settings: dict[str, Any] | None = None,
    ports: dict[str, int | None] | None = None,
    project_dir: Path | None = None,
    deploy_file: Path | None = None,
    emit: Listener | None = None,
) -> dict[str, Any]:
    """Start (or repair) the platform in ``directory`` and return what a client needs (see :func:`info`).

    Args:
        settings: Overrides of :data:`DEFAULTS` (None values are ignored); the rest comes from
            the directory's earlier ``up`` or the defaults.
        ports: Ports by role (``postgres``, ``prefect``, ``s3``, ``dask``, ...); unset ones are
            kept from an earlier ``up`` or chosen free.
        project_dir: Where ``prefect deploy`` runs and the workers start (the deployments'
            working directory): the repository root by default.
        deploy_file: The ``prefect.yaml`` to deploy (None: keep the earlier one, else the
            project's own ``prefect.yaml`` when it exists).

    Raises:
        PlatformError: naming the component that failed and its log.
    """
    emit = emit or (lambda e: None)
    directory = directory.resolve()
    with locked(directory):
        state = PlatformState.load(directory)
        merged = {**DEFAULTS, **state.settings, **{k: v for k, v in (settings or {}).items() if v is not None}}
        project = (project_dir or Path(merged.get("project_dir") or _repo_root())).resolve()
        if not project.is_dir():  # the workers start there: refused before anything starts, not after 12 s
            given = "--project-dir" if project_dir is not None else f"the project directory an earlier `up` recorded in {directory}"
            raise ConfigError(f"{given} {project} is not a directory (the workers start there and run "
                              "`prefect deploy` from it); pass --project-dir with the aeflow checkout; nothing was started")
        merged["project_dir"] = str(project)
        if deploy_file is not None:
            merged["deploy_file"] = str(deploy_file.resolve())
        elif not merged.get("deploy_file") and (project / "prefect.yaml").exists():
            merged["deploy_file"] = str(project / "prefect.yaml")
        if merged.get("deploy_file") and not Path(merged["deploy_file"]).is_file():
            raise ConfigError(f"the deployment file {merged['deploy_file']} does not exist (pass --file); nothing was started")
        for key in ("workers", "dask_workers", "dask_threads"):
            if int(merged[key]) < 1:
                raise PlatformError(f"--{key.replace('_', '-')} must be at least 1, got {merged[key]}")
        state.settings = merged
        _allocate_ports(state, ports or {})
        state.save()
        run = _Up(state, emit)
        try:
            run.run()
        except BaseException:
            run.rollback()
            raise
        finally:
            state.settings.pop("redeploy", None)
            state.save()
        return {**info(state), "started": list(run.started)}


def _repo_root() -> Path:
    """The project checkout this package runs from (where prefect.yaml and flows/ are)."""
    return Path(__file__).resolve().parents[2]


def _stop_component(state: PlatformState, name: str, rec: ProcRecord) -> bool:
    if name == "postgres":
        C.stop_postgres(state, rec)
    clean = stop(rec, grace=STOP_GRACE.get(name, 10.0))
    if name == "seaweedfs":
        C.remove_weed_sockets(state)
    return clean


def stop_component(directory: Path, name: str) -> None:
    """Stop one component (the others keep running); ``up`` starts it again. For operators and fault tests."""
    directory = directory.resolve()
    with locked(directory):
        state = PlatformState.load(directory)
        rec = state.components.get(name)
        if rec is None:
            raise PlatformError(f"{directory} has no component {name!r}; it has {sorted(state.components)}")
        _stop_component(state, name, rec)
        state.components.pop(name)
        state.save()


def down(directory: Path = DEFAULT_DIR, emit: Listener | None = None) -> list[str]:
    """Stop every process this platform directory started (nothing else); keep its data and logs.

    Returns:
        The components that were running and were stopped.
    """
    emit = emit or (lambda e: None)
    directory = directory.resolve()
    if not (directory / "platform.json").exists():
        raise NoPlatform(f"{directory} holds no platform (no platform.json); nothing to stop")
    stopped: list[str] = []
    with locked(directory):
        state = PlatformState.load(directory)

        def one(name: str) -> None:
            rec = state.components[name]
            if rec.alive:
                t0 = time.monotonic()
                emit(Event(name, "stopping", f"pid {rec.pid}"))
                _stop_component(state, name, rec)
                stopped.append(name)
                emit(Event(name, "stopped", f"{time.monotonic() - t0:.1f}s"))
            elif name == "seaweedfs":
                C.remove_weed_sockets(state)

        # Clients first (they would only log errors while their servers go), servers side by side, the database last.
        for phase in STOP_PHASES:
            names = [n for n in _all_names(state) if any(n == p or n.startswith(p + "-") for p in phase)]
            with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
                list(pool.map(one, names))
            for name in names:
                state.components.pop(name, None)
            state.save()
        for name in list(state.components):  # anything of an unknown kind
            one(name)
            state.components.pop(name)
        state.save()
    return stopped


def _all_names(state: PlatformState) -> list[str]:
    """Start order of the components recorded (including workers beyond today's counts)."""
    def rank(name: str) -> tuple[int, str]:
        for i, prefix in enumerate(("postgres", "prefect-server", "seaweedfs", "dask-scheduler", "dask-worker",
                                    "prefect-worker", "watchdog")):
            if name == prefix or name.startswith(prefix + "-"):
                return i, name
        return 99, name

    return sorted(state.components, key=rank)


def status(directory: Path = DEFAULT_DIR) -> dict[str, Any]:
    """Each component: running or not, and whether it answers its health check right now."""
    directory = directory.resolve()
    if not (directory / "platform.json").exists():
        raise NoPlatform(f"{directory} holds no platform (no platform.json); start one with `aeflow platform up --dir {directory}`")
    state = PlatformState.load(directory)
    checks: dict[str, Callable[[], bool]] = {
        "postgres": lambda: C.postgres_healthy(state),
        "prefect-server": lambda: C.prefect_healthy(state),
        "seaweedfs": lambda: C.seaweedfs_healthy(state),
        "dask-scheduler": lambda: C.dask_scheduler_healthy(state),
        "watchdog": lambda: C.watchdog_healthy(state, time.time() - 30),
    }
    dask_known: dict[str, Any] | None = None
    online: dict[str, Any] | None = None
    out = info(state)
    for comp in out["components"]:
        name = comp["name"]
        healthy = False
        if comp["alive"]:
            try:
                if name.startswith("dask-worker-"):
                    dask_known = C.dask_workers(state) if dask_known is None else dask_known
                    healthy = name in dask_known
                elif name.startswith("prefect-worker-"):
                    online = C.online_workers(state) if online is None else online
                    healthy = name in online
                else:
                    healthy = bool(checks[name]())
            except Exception:
                healthy = False
        comp["healthy"] = healthy
    out["healthy"] = bool(out["components"]) and all(c["healthy"] for c in out["components"])
    return out


def info(state: PlatformState) -> dict[str, Any]:
    """What a client needs: URLs, keys, the scheduler, and each process's pid and log."""
    s = state.settings
    comps = []
    for name in _all_names(state):
        rec = state.components[name]
        comps.append({"name": name, "pid": rec.pid, "alive": rec.alive, "log": rec.log, "ports": rec.ports})
    have_keys = "s3_access_key_id" in state.secrets and "s3" in state.ports
    return {
        "dir": str(state.dir),
        "prefect_api_url": C.api_url(state) if "prefect" in state.ports else None,
        "prefect_ui_url": C.api_url(state).removesuffix("/api") if "prefect" in state.ports else None,
        "s3_endpoint": C.s3_endpoint(state) if "s3" in state.ports else None,
        "bucket": s.get("bucket"),
        "output": C.output_root(state) if s.get("bucket") else None,
        "aws_access_key_id": state.secrets.get("s3_access_key_id"),
        "aws_secret_access_key": state.secrets.get("s3_secret_access_key"),
        "aws_region": C.REGION,
        "dask_scheduler": C.dask_address(state) if "dask" in state.ports else None,
        "work_pool": s.get("pool"),
        "deploy_file": s.get("deploy_file"),
        "database": {"host": C.HOST, "port": state.ports.get("postgres"), "name": C.PG_DB, "user": C.PG_ADMIN},
        "env": C.client_env(state) if have_keys and "prefect" in state.ports and "dask" in state.ports else {},
        "components": comps,
        "timings": dict(state.timings),
    }


def load(directory: Path = DEFAULT_DIR) -> PlatformState:
    """The state of a platform directory (for tools and tests that drive a running platform)."""
    return PlatformState.load(directory.resolve())


def shell_exports(env: dict[str, str]) -> str:
    """``export NAME=value`` lines, quoted for POSIX shells."""
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


__all__ = ["DEFAULTS", "DEFAULT_DIR", "Event", "down", "info", "load", "shell_exports", "status", "stop_component", "up"]
