"""What every command shares: the consoles, one-line user errors, result tables, and running a flow."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.errors import AeflowError, Terminated

out = Console()
err = Console(stderr=True)


class _UserErrorFilter(logging.Filter):
    """Drop console records that would repeat a user error with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, AeflowError):
            return False
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            msg = record.getMessage()
            if "Finished in state Failed" in msg or "Task run failed with exception" in msg:
                return not any(f"{c.__name__}(" in msg or f"{c.__name__}:" in msg for c in AeflowError.family())
        return True


def hide_user_error_tracebacks() -> None:
    """On the console, a user error is one line from the CLI, not Prefect's tracebacks."""
    loggers = [logging.getLogger()] + [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("prefect")
    ]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _UserErrorFilter) for f in h.filters):
                h.addFilter(_UserErrorFilter())


def quiet_prefect(quiet: bool) -> None:
    if quiet:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Prefect's event and log services say "Still processing items: 3 items remaining..." (a WARNING of
        # their own loggers, outside "prefect") while they flush at exit: not about the run, and it reached
        # the stderr of --quiet and --json runs now and then.
        for name in ("EventsWorker", "APILogWorker"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _json_requested() -> bool:
    """Whether the command being run was given ``--json`` (its parameter is ``as_json``)."""
    try:  # typer 0.2x carries its own copy of click; older typers use click itself
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


def _exit(code: int, kind: str, message: str) -> NoReturn:
    """Exit with ``code``; a ``--json`` command also says why on stdout, as one JSON object.

    A script that reads stdout found nothing there when a ``--json`` command failed (only the
    exit code, and stderr meant for people): it gets ``{"error": ..., "kind": ..., "exit_code": ...}``.
    """
    if _json_requested():
        import json

        print(json.dumps({"error": message, "kind": kind, "exit_code": code}), flush=True)
    raise typer.Exit(code)


def fail(e: BaseException, operation: str = "run") -> NoReturn:
    """A user error as one line and its exit code; anything else is a bug, with its traceback (exit 1).

    An object-store outage that escaped the storage layer's own mapping is still one line
    (exit 4); nothing printed here repeats a secret (:func:`tasks.redaction.redact`). With
    ``--json`` the same message also goes to stdout as a JSON object (see :func:`_exit`).
    """
    from tasks.redaction import redact
    from tasks.storage import causes, storage_error

    if any(isinstance(x, KeyboardInterrupt) for x in causes(e)):
        # Ctrl-C or SIGTERM: not an outage of whatever the interrupted step was talking to
        terminated = any(isinstance(x, Terminated) for x in causes(e))
        # run_app names the run it gave back on the interrupt (flows/pipeline.py)
        uri = next((x.aeflow_run_uri for x in causes(e) if getattr(x, "aeflow_run_uri", None)), None)
        kept = next((x.aeflow_run_kept for x in causes(e) if hasattr(x, "aeflow_run_kept")), None)
        if uri and kept is False:  # stopped before its first checkpoint: its folder was removed
            message = (f"run {redact(uri)} stopped before its first checkpoint and was removed: nothing to resume; "
                       "the same command again starts over")
        else:
            message = (f"{f'run {redact(uri)}' if uri else 'the run'} is incomplete; the same command again resumes "
                       "it (training goes on from its last checkpoint when it had saved one, else starts over)")
        message = message if operation != "backfill" else (
                   "the backfill stopped before its dates ran (or while creating their flow runs: those created "
                   "go on); the same command again runs every date without a complete run")
        word, code = ("terminated", 143) if terminated else ("interrupted", 130)
        err.print(f"[bold red]{word}:[/] {escape(message)}", highlight=False, soft_wrap=True)
        _exit(code, word, message)
    if not isinstance(e, AeflowError):
        e = ephemeral_server_error(e) or storage_error(e, operation, "the object store") or e
    if isinstance(e, AeflowError):
        message = redact(str(e))
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        _exit(e.exit_code, _KINDS.get(e.exit_code, "error"), message)
    err.print("[bold red]aeflow failed with an unexpected error (a bug; please report it):[/]")
    err.print(redact("".join(traceback.format_exception(e))), highlight=False, markup=False)
    _exit(1, "bug", redact(f"{type(e).__name__}: {e}"))


def ephemeral_server_error(e: BaseException) -> AeflowError | None:
    """Prefect's temporary API server (no ``PREFECT_API_URL``) did not answer in time: one line, exit 4.

    Prefect raises a bare ``RuntimeError`` ("Timed out while attempting to connect to ephemeral Prefect API
    server", with the server's output); it was printed as a bug, with a traceback. The setting that waits
    longer and the alternative (a running server) are named.
    """
    from flows.backfill import ServerUnreachable
    from tasks.storage import causes

    marker = "Timed out while attempting to connect to ephemeral Prefect API server"
    found = next((x for x in causes(e) if isinstance(x, RuntimeError) and marker in str(x)), None)
    if found is None:
        return None
    waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
    exited = re.search(r"process exited with code (-?\d+)", str(found))
    why = f"it exited with code {exited.group(1)}" if exited else "this machine may be too busy"
    return ServerUnreachable(
        f"Prefect's temporary API server (started because PREFECT_API_URL is unset) did not answer within "
        f"{waited} s ({why}): set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or point "
        "PREFECT_API_URL at a running Prefect server (`aeflow platform up` starts one)")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs: SIGTERM raises :class:`Terminated`, handled as Ctrl-C is (the run's claim given
    back, its checkpoint kept, temporary servers stopped), then ``terminated: ...`` and exit 143.

    SIGTERM's default action killed the process on the spot: no message, no cleanup, the claim left to go
    stale. Inside a flow run Prefect's own handler turns SIGTERM into ``TerminationSignal`` (the run is given
    back as for Ctrl-C), then delivers the signal again to the handler it found: this one. A second SIGTERM
    kills at once. Only in the main thread (signals are the main thread's), and only for the command's
    duration: nothing is installed at import time, and a flow-run process that a Prefect worker started
    keeps Prefect's handling (a cancellation from the UI).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def terminate(signum: int, _frame: Any) -> None:
        nonlocal raised
        if raised:  # a second SIGTERM while unwinding: the default action, at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raised = True
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# what each exit code means (the README's exit-code table), for --json error objects
_KINDS = {2: "configuration", 3: "input", 4: "storage", 5: "model", 6: "platform"}


def metrics_table(title: str, metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> MetricsTables:
    """The metrics beside the baselines': one table when it fits the console, else several (see MetricsTables)."""
    from tasks.report import metrics_rows

    return MetricsTables(title, metrics_rows(metrics, baselines))


class MetricsTables:
    """The metrics table, split by baseline columns when it is wider than the console.

    Folding cells to fit broke numbers across lines: at 80 columns detect's seven baselines printed
    ROC-AUC 0.1351 as '0.135' over '1' (found by the tenth walkthrough). Each table repeats the metric
    and aeflow columns with as many baselines as fit, so every number stays whole on one line; a
    continuation leaves out the rows its baselines have no value for.
    """

    def __init__(self, title: str, rows: list[dict[str, str]]) -> None:
        self.title = title
        self.rows = rows

    def _table(self, title: str, baselines: list[str], first: bool) -> Table:
        table = Table(title=title, title_justify="left")
        cols = ["metric", "aeflow", *baselines]
        for col in cols:
            # fold, never cut, when even one baseline does not fit (a very narrow terminal)
            table.add_column(col, justify="left" if col == "metric" else "right", overflow="fold",
                             no_wrap=col == "metric", min_width=len(col) if col == "metric" else None)
        for r in self.rows:
            if first or any(r.get(b, "—") != "—" for b in baselines):
                table.add_row(*(r.get(c, "—") for c in cols))
        return table

    def tables(self, console: Console, width: int) -> list[Table]:
        from rich.measure import Measurement

        baselines = [c for c in (self.rows[0] if self.rows else {}) if c not in ("metric", "aeflow")]
        unbounded = console.options.update_width(10**6)  # a table's natural width, not the width it is given

        def fits(t: Table) -> bool:
            return Measurement.get(console, unbounded, t).maximum <= width

        groups: list[list[str]] = [[]]
        for b in baselines:
            trial = groups[-1] + [b]
            if groups[-1] and not fits(self._table(self.title, trial, len(groups) == 1)):
                groups.append([b])
            else:
                groups[-1] = trial
        return [self._table(self.title if i == 0 else f"{self.title} (continued)", g, i == 0)
                for i, g in enumerate(groups)]

    def __rich_console__(self, console: Console, options: Any) -> Any:
        yield from self.tables(console, options.max_width)


def print_notes(notes: list[str]) -> None:
    """A run's notes under its metrics: what they were measured on, samples, caveats."""
    for note in notes:
        out.print(f"  note: {note}", highlight=False, soft_wrap=True)


def print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json())
        return
    verb = "skipped (already complete)" if result.skipped else "complete"
    out.print(f"[bold green]{result.app} run {verb}:[/] {result.run_uri}", highlight=False, soft_wrap=True)
    if result.metrics or result.baselines:
        out.print(metrics_table("metrics", result.metrics, result.baselines))
    print_notes(result.notes)
    for name, uri in result.outputs.items():
        out.print(f"  {name}: {uri}", highlight=False, soft_wrap=True)


def execute(app_name: str, options: dict[str, Any], config_file: Path | None, sets: list[str] | None) -> Any:
    """Resolve the config, run the application's flow, and return its RunResult (raises on failure)."""
    from flows.pipeline import FLOWS
    from tasks.apps import get_app
    from tasks.config import resolve_config
    from tasks.inputs import refuse_missing_local
    from tasks.redaction import install_log_redaction

    application = get_app(app_name)
    cfg = resolve_config(application.RunConfig, file=config_file, options=options, sets=sets)
    # Refusals that need neither the data nor Prefect, here: inside the flow they came after Prefect's temporary
    # server had started (8 s, minutes on a busy machine) — a device this machine lacks, an id column named like
    # an output column, a local input that is not there (with --model the flow says first what is wrong with the
    # model). The flow checks them again (deployments and backfills reach it without this).
    application.device_for(cfg)
    if not cfg.model_run:
        application.adopt(cfg, None)
        load = cfg.load
        roles = (("input", load.input), ("apply-to", load.apply_to), ("reference", getattr(load, "reference", None)))
        for role, uri in roles:
            if uri:
                refuse_missing_local(uri, role)
    hide_user_error_tracebacks()
    install_log_redaction()
    state = FLOWS[app_name](config=cfg, return_state=True)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        raise exc
    raise AeflowError(f"{app_name} run ended in state {state.type.value}: {state.message}")
