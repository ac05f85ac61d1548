"""The Dask client every run's parallel stages use: an existing scheduler, or a LocalCluster.

``--dask-address tcp://host:8786`` (``RunConfig.dask_address``) connects to a running
scheduler (the platform's, on a cluster); otherwise a ``LocalCluster`` of worker
processes lives as long as the run. Either way the client is Dask's default scheduler
for the duration, so ``.compute()`` anywhere in the flow runs on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from tasks.errors import InputError

log = logging.getLogger("aeflow.dask")


class _ClosingTasks(logging.Filter):
    """A worker closing with tasks still running (a run that failed on bad input closes its cluster at once)
    warns "Async instruction for <Task ...> ended with CancelledError" per task: expected, not the user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Async instruction for") and message.endswith("ended with CancelledError"))


class _QuietUserErrors(WorkerPlugin):
    """Dask worker plugin: a user's bad input is reported once by aeflow, not also as a
    worker "Compute Failed" log with a traceback. On the run's own LocalCluster (``local``),
    the heartbeat that races the cluster's shutdown at the end of every run is not an error
    either."""

    name = "aeflow-quiet-user-errors"

    def __init__(self, local: bool = False) -> None:
        self.local = local

    def setup(self, worker: Any) -> None:
        from tasks.errors import AeflowError

        names = tuple(f"{c.__name__}(" for c in AeflowError.family())
        local = self.local

        class _Filter(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                if str(record.msg).startswith("Compute Failed") and isinstance(record.args, tuple):
                    return not any(str(a).startswith(names) for a in record.args)
                if local and str(record.msg).startswith("Failed to communicate with scheduler during heartbeat"):
                    return False
                return True

        logging.getLogger("distributed.worker").addFilter(_Filter())
        logging.getLogger("distributed.worker.state_machine").addFilter(_ClosingTasks())

    def teardown(self, worker: Any) -> None:
        return None


def _install_plugins(client: Any, local: bool = False) -> None:
    try:
        client.register_plugin(_QuietUserErrors(local), name=_QuietUserErrors.name)
    except Exception as e:  # a scheduler that refuses plugins still works; logs are just noisier
        log.debug("could not register the worker plugin: %s", e)


LOCAL_THREADS_MAX_BYTES = 256 << 20  # local_cluster=auto: inputs up to this size run on worker threads
LOCAL_CLUSTERS = ("auto", "processes", "threads")


def local_processes(mode: str, input_bytes: int) -> bool:
    """Whether a run's own ``LocalCluster`` has worker processes (``mode`` is the run's ``local_cluster``).

    ``processes``: pandas/pandera work in parallel, but each worker process imports the libraries
    its tasks use (torch, pandas, sklearn: ~10 s on 2 busy cores, at every run) and stops at the end.
    ``threads``: workers in this process, up in about a second with everything already imported;
    Python-bound work (pandera's checks) then shares one GIL. ``auto``: threads when the inputs
    total at most ``LOCAL_THREADS_MAX_BYTES`` (256 MB), processes beyond. Measured on 2 cores (reduce, 1
    epoch): 0.2 MB 37 -> 20 s, 77 MB 34 -> 19 s, 295 MB 43 -> 34 s of wall time from processes to threads."""
    if mode not in LOCAL_CLUSTERS:
        raise ValueError(f"local_cluster must be one of {list(LOCAL_CLUSTERS)}, got {mode!r}")
    return mode == "processes" or (mode == "auto" and input_bytes > LOCAL_THREADS_MAX_BYTES)


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None, processes: bool = True) -> Iterator[Any]:
    """A distributed client: the scheduler at ``address``, or a new ``LocalCluster`` (of worker
    processes, or with ``processes=False`` of worker threads in this process: :func:`local_processes`).

    The client becomes Dask's default scheduler for the duration, so
    ``.compute()`` anywhere in the flow (and in its tasks' threads) runs on it. It is the
    *current* client of this context (``Client.as_current``, a context variable that Prefect
    copies into task threads), not merely the newest in the process: runs in parallel in one
    process (``aeflow backfill --parallel``) each use their own, and one closing its client
    does not pull another's from under it (it did: "Stream is closed" mid-scatter).
    """
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as e:
            raise InputError(f"cannot connect to the Dask scheduler at {address}: {e}") from e
        _install_plugins(client)
        try:
            with client.as_current():  # this run's client, even beside other runs in this process
                yield client
        finally:
            client.close()
        return
    workers = n_workers or max(1, min(4, os.cpu_count() or 1))
    # Worker processes read their logging config from the environment when they start.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # A worker still busy when the cluster closes is killed after a grace period; that is expected here.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    with dask.config.set({"distributed.worker.daemon": False, "logging.distributed": "warning"}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=processes,
            # worker threads share this process: its memory is not theirs to watch (a limit per worker
            # would pause them whenever the run's own arrays are large)
            **({} if processes else {"memory_limit": 0}),
            # The scheduler serves HTTP (health, metrics) whatever this says; None means distributed's 8787,
            # and a second cluster on the machine then warned "Port 8787 is already in use" on every run.
            dashboard_address="127.0.0.1:0",
            # and each worker serves HTTP too: on every interface unless told (the threads' cluster did)
            worker_dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        )
        client = Client(cluster)
        try:
            _install_plugins(client, local=True)
            with client.as_current():
                yield client
        finally:
            # Shutting the local cluster down is cleanup: on a loaded machine it can outlast its
            # timeout, which must not fail a run whose work is done (the workers are killed anyway).
            for closer in (client.close, cluster.close):
                try:
                    closer()
                except Exception as e:
                    log.warning("Dask LocalCluster shutdown: %s", e)


def current_client() -> Any | None:
    """The Dask distributed client of this run (``dask_client``: the context's current one), or None outside one."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _settle(futures: Sequence[Any]) -> None:
    """Wait until every one of ``futures`` has finished, failed or not (errors are the caller's to read).

    A Dask compute raises on its first failed task while the others still run: a partition
    that was mid-write would write its file after the failed run had cleared its folder.
    Cancelling does not stop a task already running on a worker, so what is running is
    waited for. Interruption (Ctrl-C, SIGTERM) is not waited for: that run stops now."""
    from distributed import wait

    with contextlib.suppress(Exception):
        wait(list(futures))


PROGRESS_LOG_FIRST_S, PROGRESS_LOG_EVERY_S = 30.0, 60.0  # compute_settled's progress lines: the first, then


def _log_done_parts(futures: Sequence[Any], label: str, first_s: float, every_s: float,
                    unit: str = "partitions") -> contextlib.AbstractContextManager[None]:
    """While the body runs: after ``first_s`` and then every ``every_s`` seconds, one line in the run's log
    saying how many of ``futures`` (one per partition) are done. Nothing for a compute that ends sooner."""
    from tasks.train import periodically, run_logger

    run_log = run_logger()  # here: a Prefect run's logger is found from this thread's context, not the watcher's
    t0 = time.monotonic()

    def say() -> None:
        with contextlib.suppress(Exception):  # progress is a nicety; never fail the work for it
            done = sum(1 for f in futures if f.done())
            run_log.info("%s: %s of %s %s done after %.0f s", label, f"{done:,}", f"{len(futures):,}", unit,
                         time.monotonic() - t0)

    return periodically(say, first_s, every_s, "aeflow-compute-progress")


def compute_settled(*collections: Any, progress: str | None = None, progress_parts: int | None = None,
                    unit: str = "partitions", first_s: float | None = None,
                    every_s: float | None = None) -> tuple[Any, ...]:
    """``dask.compute(*collections)`` (one graph: shared inputs computed once) that raises only
    after every task has finished, so no task of a failed compute writes afterwards.

    On the run's Dask client the first failed result in input order is raised (the task's own
    exception, e.g. an ``InputError``). Without a client the tasks run on a thread pool of this
    process (Dask's local threaded scheduler, which too raises while other threads still run),
    shut down and waited for before the error leaves; a scheduler set in ``dask.config`` is used
    as it is.

    ``progress``: on the client, a compute that takes longer than ``first_s`` (default
    ``PROGRESS_LOG_FIRST_S``) says in the run's log how many partitions are done (the first
    ``progress_parts`` collections, default all, one per partition), then every ``every_s`` seconds
    (``PROGRESS_LOG_EVERY_S``): a pass over a large file was minutes without a line."""
    client = current_client()
    if client is None:
        if dask.config.get("scheduler", None) is not None:
            return dask.compute(*collections)
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="aeflow-compute")
        settle = True
        try:
            return dask.compute(*collections, scheduler="threads", pool=pool)
        except BaseException as e:
            settle = isinstance(e, Exception)  # Ctrl-C / SIGTERM: stop now, do not wait
            raise
        finally:
            pool.shutdown(wait=settle, cancel_futures=True)
    from distributed import Future

    results = client.compute(list(collections))
    futures = [f for f in results if isinstance(f, Future)]
    try:
        if progress:
            first, every = first_s or PROGRESS_LOG_FIRST_S, every_s or PROGRESS_LOG_EVERY_S
            with _log_done_parts(futures[:progress_parts], progress, first, every, unit):
                _settle(futures)
        else:
            _settle(futures)
        for f in futures:
            if f.status == "error":
                f.result()  # raises the task's exception
        return tuple(client.gather(results))
    finally:
        for f in futures:
            f.release()


PROGRESS_TOPIC = "aeflow-progress"  # the Dask event topic of progress within an item (report_progress)
PROGRESS_EVERY_S = 1.0  # an item sends its progress at most this often (what is logged is throttled again)
_progress: ContextVar[dict[str, Any] | None] = ContextVar("aeflow_progress", default=None)


def report_progress(payload: dict[str, Any]) -> None:
    """From ``fn`` of :func:`run_parallel`: how far one item is (e.g. the tiles of a large image), passed to
    its ``on_progress`` in the process that called it, at most every ``PROGRESS_EVERY_S`` per item; from a
    Dask worker through the scheduler's events, wherever the worker runs. Nothing outside such a call."""
    state = _progress.get()
    if state is None:
        return
    now = time.monotonic()
    if now - state["last"] < PROGRESS_EVERY_S:
        return
    state["last"] = now
    if state["local"] is not None:
        state["local"](payload)
        return
    try:
        from distributed import get_worker

        get_worker().log_event(PROGRESS_TOPIC, {**payload, "token": state["token"]})
    except Exception as e:  # noqa: BLE001 - progress is a nicety; never fail the work for it
        log.debug("progress not sent: %s", e)


def _with_progress(item: Any, *, _aeflow_fn: Callable[..., Any], _aeflow_token: str | None,
                   _aeflow_local: Callable[[dict[str, Any]], None] | None = None, **shared: Any) -> Any:
    """``fn(item, **shared)`` with :func:`report_progress` sending to this call's ``on_progress``."""
    reset = _progress.set({"token": _aeflow_token, "local": _aeflow_local, "last": time.monotonic()})
    try:
        return _aeflow_fn(item, **shared)
    finally:
        _progress.reset(reset)


def run_parallel(fn: Callable[..., Any], items: Sequence[Any], *, on_done: Callable[[Any], None] | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, **shared: Any) -> list[Any]:
    """``fn(item, **shared)`` for every item, results in order.

    On the run's Dask client each item is one task, and each ``shared`` object is shipped
    once to every worker (scattered with ``broadcast``), not once per task; a worker lost
    midway costs only its items, which the scheduler runs again elsewhere (``fn`` must be
    idempotent: it writes its own files). Without a client the items run here, one by one.
    ``on_done(result)`` is called in this process as each item finishes (in completion order);
    ``on_progress(payload)`` with what ``fn`` passes to :func:`report_progress` while an item runs
    (from the client's event thread when on a cluster).
    """
    client = current_client()
    if client is None or len(items) == 0:
        results = []
        for item in items:
            if on_progress is None:
                results.append(fn(item, **shared))
            else:
                results.append(_with_progress(item, _aeflow_fn=fn, _aeflow_token=None, _aeflow_local=on_progress,
                                              **shared))
            if on_done is not None:
                on_done(results[-1])
        return results
    from distributed import as_completed

    token = uuid.uuid4().hex
    if on_progress is not None:
        def relay(event: tuple[float, Any]) -> None:  # every run on the scheduler sends to one topic: ours only
            msg = event[1]
            if isinstance(msg, dict) and msg.get("token") == token:
                try:
                    on_progress(msg)
                except Exception as e:  # noqa: BLE001 - progress is a nicety; never fail the work for it
                    log.debug("progress not shown: %s", e)

        client.subscribe_topic(PROGRESS_TOPIC, relay)
    scattered = {k: client.scatter(v, broadcast=True, hash=False) for k, v in shared.items()}
    if on_progress is None:
        futures = client.map(fn, list(items), pure=False, **scattered)
    else:
        name = getattr(fn, "__name__", "item")
        futures = client.map(_with_progress, list(items), key=[f"{name}-{uuid.uuid4().hex}" for _ in items],
                             _aeflow_fn=fn, _aeflow_token=token, **scattered)
    try:
        if on_done is not None:
            for future in as_completed(futures):
                on_done(future.result())
        return client.gather(futures)
    except Exception:
        _settle(futures)  # the items still running finish (and write) before the caller cleans up
        raise
    finally:
        if on_progress is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(PROGRESS_TOPIC)
        for f in [*futures, *scattered.values()]:
            f.release()
