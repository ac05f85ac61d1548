"""What every command shares: the consoles, one-line user errors, result tables, and running a flow."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.errors import AeflowError

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


def fail(e: BaseException, operation: str = "run") -> NoReturn:
    """A user error as one line and its exit code; anything else is a bug, with its traceback (exit 1).

    An object-store outage that escaped the storage layer's own mapping is still one line
    (exit 4); nothing printed here repeats a secret (:func:`tasks.redaction.redact`).
    """
    from tasks.redaction import redact
    from tasks.storage import causes, storage_error

    if any(isinstance(x, KeyboardInterrupt) for x in causes(e)):
        # Ctrl-C: not an outage of whatever the interrupted step was talking to
        err.print("[bold red]interrupted:[/] the run is incomplete; the same command again resumes it (training goes "
                  "on from its last checkpoint when it had saved one, else starts over)", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    if not isinstance(e, AeflowError):
        e = storage_error(e, operation, "the object store") or e
    if isinstance(e, AeflowError):
        err.print(f"[bold red]error:[/] {escape(redact(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    err.print("[bold red]aeflow failed with an unexpected error (a bug; please report it):[/]")
    err.print(redact("".join(traceback.format_exception(e))), highlight=False, markup=False)
    raise typer.Exit(1)


def metrics_table(title: str, metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> Table:
    from tasks.report import metrics_rows

    rows = metrics_rows(metrics, baselines)
    table = Table(title=title, title_justify="left")
    for col in rows[0] if rows else ["metric", "aeflow"]:
        # fold, never cut: at 80 columns detect's seven baselines showed as 'isolation…', 'pyod_aut…'
        table.add_column(col, justify="left" if col == "metric" else "right", overflow="fold",
                         no_wrap=col == "metric", min_width=len(col) if col == "metric" else None)
    for r in rows:
        table.add_row(*r.values())
    return table


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
    from tasks.redaction import install_log_redaction

    application = get_app(app_name)
    cfg = resolve_config(application.RunConfig, file=config_file, options=options, sets=sets)
    hide_user_error_tracebacks()
    install_log_redaction()
    state = FLOWS[app_name](config=cfg, return_state=True)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        raise exc
    raise AeflowError(f"{app_name} run ended in state {state.type.value}: {state.message}")
