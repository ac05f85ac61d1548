"""Child servers die with their parent: a watchdog wrapped around the commands we (or Prefect) spawn.

A SIGKILLed ``aeflow run`` cannot clean up, so a server it started (Prefect's temporary
API server in ephemeral mode, a uvicorn process of ~220 MB; or the server of
``aeflow serve``) would keep running as an orphan. Every such child is started as::

    python -m flows.lifeline PARENT_PID -- -m uvicorn ...      (any ``python`` arguments)

which starts a watchdog thread and then runs the real command in the same process. The
watchdog checks every :data:`POLL_S` seconds whether its parent is still ``PARENT_PID``;
when the parent is gone (killed, crashed, or exited without stopping it) it sends SIGTERM
to the server (to its whole process group when the server leads its own session, as
``aeflow serve``'s does), and SIGKILL after :data:`GRACE_S` seconds. This works from any
thread that spawned the child (``PR_SET_PDEATHSIG`` fires when the spawning *thread*
exits, and Prefect starts its server from whichever thread first needs an API client)
and needs nothing but the standard library.

A stale server therefore cannot outlive its run; and it could not block the next run
anyway: the temporary server takes a random free port, and ``aeflow serve`` reuses a
healthy server already listening on its port.

:func:`guard_prefect_ephemeral_server` makes Prefect's own ``SubprocessASGIServer`` start
its uvicorn child through this wrapper (the CLI calls it at start).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

POLL_S = 0.25
GRACE_S = 5.0


def command(args: Sequence[str], parent: int | None = None) -> list[str]:
    """``[python, *args]`` wrapped so that the process dies with ``parent`` (default: this process).

    Args:
        args: What follows the interpreter, e.g. ``["-m", "prefect", "server", "start"]``.
    """
    return [sys.executable, "-m", "flows.lifeline", str(os.getpid() if parent is None else parent), "--", *args]


def _stop_self(leader: bool) -> None:
    target = os.getpgid(0) if leader else os.getpid()
    kill = os.killpg if leader else os.kill
    try:
        kill(target, signal.SIGTERM)
    except ProcessLookupError:
        return
    time.sleep(GRACE_S)
    try:
        kill(target, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(1)


def _watch(parent: int) -> None:
    leader = os.getpgid(0) == os.getpid()
    while os.getppid() == parent:
        time.sleep(POLL_S)
    _stop_self(leader)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.lifeline PARENT -- (-m MODULE | -c CODE | SCRIPT) ARGS...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m flows.lifeline PARENT_PID -- (-m MODULE | -c CODE | SCRIPT) [ARGS...]")
    parent, rest = int(argv[0]), argv[2:]
    if os.getppid() != parent:  # the parent died before we started
        raise SystemExit(1)
    threading.Thread(target=_watch, args=(parent,), name="aeflow-lifeline", daemon=True).start()
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "-c":
        sys.argv = ["-c", *rest[2:]]
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(rest)
        runpy.run_path(rest[0], run_name="__main__")


class _GuardedSubprocess:
    """The ``subprocess`` module as Prefect's server module sees it, with ``Popen`` wrapped."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Popen(self, args: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(args, (list, tuple)) and args and args[0] == sys.executable:
            args = command(list(args[1:]))
            # Its own session: Ctrl-C in the terminal interrupts the run, not the API server the run
            # still needs to record that it was interrupted (with the server gone too, the run
            # spent minutes retrying it, then reported an object-store outage). The lifeline
            # stops the server, and its process group, when the run is gone.
            kw.setdefault("start_new_session", True)
        return self._real.Popen(args, *a, **kw)


_SERVER_MODULE = "prefect.server.api.server"


def _guard_module(module: Any) -> None:
    if not isinstance(module.subprocess, _GuardedSubprocess):
        module.subprocess = _GuardedSubprocess(module.subprocess)


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Patch Prefect's server module when it is first imported (importing it eagerly costs seconds)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _SERVER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            _guard_module(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


class _FirstLineOfServerNotice(logging.Filter):
    """Prefect's "Starting temporary server on http://127.0.0.1:PORT" goes on with "See https://www.prefect.io/docs/...
    for more information on running a dedicated Prefect server": on every run's stderr, for aeflow's users advice
    that the README gives them in aeflow's terms (``aeflow platform up``). The first line stays. Its "Stopping
    temporary server on ..." at exit is dropped: it came after the run's result or error, so a refusal's
    ``error:`` line was not the last line of stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server on") and "\n" in record.msg:
            record.msg = record.msg.split("\n", 1)[0]
        return not (isinstance(record.msg, str) and record.msg.startswith("Stopping temporary server on"))


def shorten_prefect_server_notice() -> None:
    """Keep only the first line of Prefect's notice that it starts a temporary server (see the filter)."""
    lg = logging.getLogger("prefect")
    if not any(isinstance(f, _FirstLineOfServerNotice) for f in lg.filters):
        lg.addFilter(_FirstLineOfServerNotice())


def guard_prefect_ephemeral_server() -> None:
    """Make Prefect's temporary API server (ephemeral mode, no PREFECT_API_URL) die with this process."""
    if _SERVER_MODULE in sys.modules:
        _guard_module(sys.modules[_SERVER_MODULE])
    elif not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())


if __name__ == "__main__":
    main()
