"""Processes of the platform: start each in its own session, recognise it later, stop its whole tree.

Every component runs in a new session (its own process group), with its output
appended to a log file. A component is recorded by pid *and* start time, so a
pid reused by an unrelated process is never taken for it (nor signalled).
Stopping sends SIGTERM to the component's group and to every process below it
(Prefect starts each flow run in a session of its own), waits, then SIGKILLs
whatever is left.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tasks.errors import PortInUse


@dataclass
class ProcRecord:
    """One started process: what the state file keeps about it."""

    name: str
    pid: int
    create_time: float
    log: str
    cmd: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcRecord:
        return cls(**d)

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None (gone, a zombie, or a reused pid)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > 1.0 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    @property
    def alive(self) -> bool:
        return self.process() is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1", avoid: set[int] | None = None) -> list[int]:
    """``n`` distinct free ports (each bound at once, so no two are equal), none in ``avoid``."""
    socks, ports = [], []
    avoid = set(avoid or ())
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((host, 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port not in avoid:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` (nothing listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def require_free_port(host: str, port: int, *, user: str, change: str) -> None:
    """The one check before a server of aeflow's starts on ``host:port`` (``serve``, ``platform up``).

    A server that cannot bind says so only in its log, after the components started before it;
    checked first, the command refuses with nothing started.

    Args:
        user: What would listen there, e.g. ``"the Prefect server this command starts"``.
        change: How to proceed, e.g. ``"pass another --port"``.

    Raises:
        PortInUse: naming the port, ``user`` and ``change`` (exit 2).
    """
    if not port_free(host, port):
        raise PortInUse(f"port {port} on {host} is in use by another program, so {user} cannot listen there; {change}")


def spawn(
    name: str,
    cmd: list[str],
    *,
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    user: str | None = None,
    ports: dict[str, int] | None = None,
) -> ProcRecord:
    """Start ``cmd`` in a new session with stdout and stderr appended to ``log``.

    Args:
        name: The component's name (recorded, and written into the log).
        user: Run as this user (only when we are root), e.g. PostgreSQL's.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cwd) if cwd else None,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
        )
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # exited at once; the health check reports it with the log
        created = time.time()
    # The Popen object is dropped on purpose: the component outlives this command. A child that
    # exits while we still run is reaped by the health check's poll below (see ``reap``).
    _CHILDREN[proc.pid] = proc
    return ProcRecord(name=name, pid=proc.pid, create_time=created, log=str(log), cmd=list(cmd), ports=dict(ports or {}))


_CHILDREN: dict[int, subprocess.Popen] = {}


def reap() -> None:
    """Collect exit statuses of our own children that have exited (no zombies while we run)."""
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def exit_code(rec: ProcRecord) -> int | None:
    """Exit status of a component started by this process, once it has exited."""
    proc = _CHILDREN.get(rec.pid)
    if proc is None:
        return None
    return proc.poll()


def tree(rec: ProcRecord) -> list[psutil.Process]:
    """The component's live process and everything below it (flow runs in their own sessions too)."""
    p = rec.process()
    if p is None:
        return []
    try:
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop(rec: ProcRecord, grace: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Stop the component, its process group and every descendant; SIGKILL after ``grace`` seconds.

    Returns:
        True when it exited within the grace period (False: it had to be killed, or was gone).
    """
    procs = tree(rec)
    if not procs:
        return False
    _signal_all(rec, procs, sig)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    reap()
    if not alive:
        return True
    # Descendants that appeared meanwhile are caught by a second look at the tree.
    alive = list({p.pid: p for p in alive + tree(rec)}.values())
    _signal_all(rec, alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    reap()
    return False


def kill_tree(rec: ProcRecord) -> None:
    """SIGKILL the component and everything below it at once (a crash, as a test injects it)."""
    procs = tree(rec)
    _signal_all(rec, procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)
    reap()


def _signal_all(rec: ProcRecord, procs: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(rec.pid, sig)  # the component's own group (it is its session leader)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def listening_ports(procs: list[psutil.Process]) -> set[int]:
    """TCP ports the given processes listen on."""
    ports: set[int] = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
    return ports


def tail(path: str | Path, n: int = 2000) -> str:
    """The last ``n`` characters of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
