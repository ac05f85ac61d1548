"""tasks.dask_client: each run uses its own client, even beside other runs in the same process."""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.tasks]


def _double(x: int) -> int:
    return 2 * x


def test_runs_in_parallel_in_one_process_each_keep_their_own_client(dask_address):
    """B opens its client, then A (now the newest client of the process); A closes while B still
    works. B's stages must keep using B's client (they used the newest: A's, closed under them)."""
    from tasks.dask_client import current_client, dask_client, run_parallel

    b_open, a_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            b_open.wait(60)
            with dask_client(dask_address) as client:
                seen["a"] = client
                seen["a_current"] = current_client()
                a_open.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            a_open.set()
            a_closed.set()

    def run_b() -> None:
        try:
            with dask_client(dask_address) as client:
                seen["b"] = client
                b_open.set()
                a_open.wait(60)
                seen["b_current_beside_a"] = current_client()
                a_closed.wait(60)
                seen["b_current"] = current_client()
                seen["b_result"] = run_parallel(_double, [1, 2, 3], on_done=None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            b_open.set()

    threads = [threading.Thread(target=run_b), threading.Thread(target=run_a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen["a_current"] is seen["a"]
    assert seen["b_current_beside_a"] is seen["b"], "B's stages would run on A's client"
    assert seen["b_current"] is seen["b"] and seen["b_result"] == [2, 4, 6]
    assert current_client() is None or current_client() not in (seen["a"], seen["b"]), "nothing left current here"


def test_prefect_task_threads_see_their_runs_client(dask_address, prefect_server):
    """What the flows rely on: a task submitted to Prefect's thread pool sees the run's client."""
    from prefect import flow, task

    from tasks.dask_client import current_client, dask_client

    @task
    def which() -> object:
        return current_client()

    @flow
    def a_run() -> tuple[object, object]:
        with dask_client(dask_address) as client:
            return client, which.submit().result()

    client, in_task = a_run()
    assert in_task is client


def test_local_cluster_kind_by_mode_and_input_size():
    from tasks.dask_client import LOCAL_THREADS_MAX_BYTES, local_processes

    assert not local_processes("auto", 0) and not local_processes("auto", LOCAL_THREADS_MAX_BYTES)
    assert local_processes("auto", LOCAL_THREADS_MAX_BYTES + 1)
    assert local_processes("processes", 0) and not local_processes("threads", 10 * LOCAL_THREADS_MAX_BYTES)
    with pytest.raises(ValueError, match="local_cluster must be one of"):
        local_processes("fork", 0)


def test_a_local_cluster_of_threads_runs_tasks_in_this_process():
    import os

    from tasks.dask_client import current_client, dask_client, run_parallel

    with dask_client(None, n_workers=2, processes=False) as client:
        assert current_client() is client
        pids = client.run(os.getpid)
        assert len(pids) == 2 and set(pids.values()) == {os.getpid()}, "both workers are threads of this process"
        assert run_parallel(_double, [1, 2, 3], on_done=None) == [2, 4, 6]
    assert current_client() is None or current_client() is not client


def test_a_run_s_local_cluster_does_not_warn_when_port_8787_is_taken():
    """Another cluster on the machine held distributed's default 8787: every run warned "Port 8787 is already
    in use" on the console, --quiet or not."""
    import socket
    import warnings

    from tasks.dask_client import dask_client

    held = socket.socket()
    try:
        held.bind(("0.0.0.0", 8787))
        held.listen()
    except OSError:
        pass  # already taken (another cluster of this session): the case itself
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with dask_client(None, processes=False) as client:
                assert client.submit(sum, [1, 2]).result() == 3
        assert not [w for w in seen if "8787" in str(w.message)], [str(w.message) for w in seen]
    finally:
        held.close()


@pytest.mark.parametrize("processes", [False, True])
def test_a_run_s_local_cluster_listens_on_loopback_only(processes):
    """Each worker's HTTP server listened on every interface (0.0.0.0 and ::) in a run's cluster of threads."""
    import psutil

    from tasks.dask_client import dask_client

    def listening():  # this process and its children (other fixtures' servers among them: taken out below)
        me = psutil.Process()
        found = set()
        for p in [me, *me.children(recursive=True)]:
            try:
                found |= {(p.pid, c.laddr) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                pass
        return found

    before = listening()
    with dask_client(None, n_workers=1, processes=processes) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        opened = listening() - before
    assert opened, "the cluster serves something (scheduler and workers' HTTP)"
    listening = sorted(opened)
    assert all(a.ip == "127.0.0.1" for _, a in listening), listening


def test_workers_closing_with_running_tasks_do_not_warn_about_each_one():
    """A run refused for bad input (inputs over 256 MB: worker processes) printed a Dask warning per cancelled task
    ("Async instruction for <Task ...> ended with CancelledError") before its one clear error line."""
    import logging

    from tasks.dask_client import _QuietUserErrors

    logger = logging.getLogger("distributed.worker.state_machine")
    before = list(logger.filters)
    try:
        _QuietUserErrors(local=True).setup(worker=None)
        added = [f for f in logger.filters if f not in before]
        assert added, "the plugin filters the worker state machine's log"

        def passes(msg: str) -> bool:
            record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)
            return all(f.filter(record) for f in added)

        assert not passes("Async instruction for <Task cancelled name=\"execute(('x', 2))\" coro=<...>> ended with "
                          "CancelledError")
        assert passes("Async instruction for <Task finished> ended with RuntimeError('boom')")
        assert passes("some other warning")
    finally:
        logger.filters[:] = before
        logging.getLogger("distributed.worker").filters[:] = [
            f for f in logging.getLogger("distributed.worker").filters if type(f).__name__ != "_Filter"]


def _tiles(n: int) -> int:
    from tasks.dask_client import report_progress

    for i in range(n):
        report_progress({"item": n, "done": i + 1, "detail": f"tile {i + 1}/{n}"})
    return n


def test_progress_within_an_item_reaches_the_caller_from_the_workers(monkeypatch):
    """Progress inside one item (the tiles of a large image) is sent from the Dask worker through the scheduler's
    events to run_parallel's on_progress, in the calling process; only this call's, not another run's."""
    from tasks.dask_client import PROGRESS_TOPIC, dask_client, run_parallel

    monkeypatch.setattr("tasks.dask_client.PROGRESS_EVERY_S", 0.0)  # worker threads share this module
    got: list[dict] = []
    with dask_client(processes=False, n_workers=1) as client:
        client.log_event(PROGRESS_TOPIC, {"item": 99, "done": 1, "token": "another run"})
        assert run_parallel(_tiles, [3, 4], on_progress=got.append) == [3, 4]
    assert got, "no progress arrived"
    assert {e["item"] for e in got} <= {3, 4} and all(e["detail"].startswith("tile ") for e in got), got
    # without a cluster, the same reports reach on_progress directly
    local: list[dict] = []
    monkeypatch.setattr("tasks.dask_client.current_client", lambda: None)
    assert run_parallel(_tiles, [2], on_progress=local.append) == [2]
    assert [e["detail"] for e in local] == ["tile 1/2", "tile 2/2"]


def _fail_fast_or_write_late(item: tuple[str, str]) -> str:
    """Item ("fail", _) raises soon (once the other has started); ("write", path) sleeps, then writes its
    file (a partition mid-write)."""
    import time
    from pathlib import Path

    kind, path = item
    if kind == "fail":
        time.sleep(0.3)
        raise ValueError("bad partition")
    time.sleep(1.5)
    Path(path).write_text("late")
    return path


def test_a_failed_compute_raises_only_after_its_other_tasks_have_written(tmp_path):
    """Dask raises on the first failed task while the others still run: a partition mid-write wrote its
    parquet after the failed run had cleared its folder (CI: a refused --apply-to run left
    preprocessed-apply/part.00000.parquet behind). Every parallel stage now raises only once every task
    has finished, so the cleanup after it finds everything that will ever be written."""
    import dask

    from tasks.dask_client import compute_settled, dask_client, run_parallel

    late_a, late_b, late_c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    with pytest.raises(ValueError, match="bad partition"):  # no client: Dask's threads in this process
        compute_settled(dask.delayed(_fail_fast_or_write_late)(("write", str(late_c))),
                        dask.delayed(_fail_fast_or_write_late)(("fail", "")))
    assert late_c.exists(), "the failed local compute raised while another thread was still writing"
    assert compute_settled(dask.delayed(_double)(3)) == (6,)
    with dask_client(None, n_workers=2, processes=False):
        with pytest.raises(ValueError, match="bad partition"):
            compute_settled(dask.delayed(_fail_fast_or_write_late)(("write", str(late_a))),
                            dask.delayed(_fail_fast_or_write_late)(("fail", "")))
        assert late_a.exists(), "the failed compute raised while another task was still writing"
        assert compute_settled(dask.delayed(_double)(2), ()) == (4, ()), "results in order, plain values as they are"

        with pytest.raises(ValueError, match="bad partition"):
            run_parallel(_fail_fast_or_write_late, [("write", str(late_b)), ("fail", "")], on_done=None)
        assert late_b.exists(), "run_parallel raised while another item was still writing"


def _sleep_then(x: float) -> float:
    import time

    time.sleep(x)
    return x


def test_a_long_compute_says_how_many_partitions_are_done(caplog):
    """A pass over a large file (categories, validation and encoding) ran for minutes without a line in the
    run's log (the twelfth walkthrough: ~5 min on 1.36 GB); with ``progress`` it says how far it is, and a
    compute that ends before the first line says nothing."""
    import logging
    import re

    import dask

    from tasks.dask_client import compute_settled, dask_client

    with dask_client(None, n_workers=1, processes=False), caplog.at_level(logging.INFO):
        got = compute_settled(*[dask.delayed(_sleep_then)(0.4) for _ in range(4)], dask.delayed(_double)(1),
                              progress="t.csv: encoding", progress_parts=4, first_s=0.5, every_s=0.5)
        assert got == (0.4, 0.4, 0.4, 0.4, 2)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("t.csv: encoding")]
        assert lines, caplog.text
        done = [int(re.match(r"t.csv: encoding: (\d) of 4 partitions done after \d+ s$", m).group(1)) for m in lines]
        assert done == sorted(done) and 0 < done[0] < 4, lines
        caplog.clear()
        compute_settled(dask.delayed(_double)(2), progress="quick", first_s=5)
        assert "quick" not in caplog.text
