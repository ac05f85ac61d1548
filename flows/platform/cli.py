"""``aeflow platform up|status|down``: the shared installation on one machine, without Docker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import AeflowError

platform_app = typer.Typer(
    help="A shared installation on this machine: PostgreSQL, the Prefect server, SeaweedFS (S3), "
         "a Dask cluster and Prefect workers, started, checked and stopped together.",
    no_args_is_help=True,
)
err = Console(stderr=True)

DirOption = Annotated[Path, typer.Option(
    "--dir", "-d", envvar="AEFLOW_PLATFORM_DIR",
    help="The platform's state directory (data, logs, keys); default $AEFLOW_PLATFORM_DIR (one of the variables "
         "`up` prints), else ./.aeflow/platform, relative to the current directory.")]


def _default_dir() -> Path:
    from flows.platform.core import DEFAULT_DIR

    return DEFAULT_DIR


def _fail(e: AeflowError) -> None:
    # the one way a CLI error is printed: escaped (a path with [brackets] stayed markup here and lost them),
    # redacted, and with --json also a JSON object on stdout (imported here: flows.cli imports this module,
    # and `python -m flows.platform`, which the platform's processes run, imports this one first)
    from flows.cli.common import fail

    fail(e, "platform")


def _progress(quiet: bool):
    def emit(e) -> None:
        if quiet:
            return
        colour = {"started": "green", "running": "cyan", "stopped": "yellow", "deployed": "green"}.get(e.action, "white")
        # soft_wrap: one line each, also in a captured log (80 columns there: a log path was cut in two)
        err.print(f"[{colour}]{e.action:>9}[/] {e.component}  {e.detail}", highlight=False, soft_wrap=True)

    return emit


@platform_app.command("up")
def up_cmd(
    directory: DirOption = None,  # type: ignore[assignment]
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Prefect worker processes (default 2).")] = None,
    dask_workers: Annotated[int | None, typer.Option("--dask-workers", min=1, help="Dask worker processes (default 2).")] = None,
    dask_threads: Annotated[int | None, typer.Option("--dask-threads", min=1, help="Threads per Dask worker (default 1).")] = None,
    worker_limit: Annotated[int | None, typer.Option("--worker-limit", min=0, help="Flow runs each Prefect worker executes at once (default 1; 0: no limit).")] = None,
    training_slots: Annotated[int | None, typer.Option("--training-slots", min=1, help="The `training` tag concurrency limit: trainings at once (default 1, one per GPU).")] = None,
    poll_seconds: Annotated[float | None, typer.Option("--poll-seconds", min=0.5, help="How often workers ask for runs (default 5).")] = None,
    deploy_file: Annotated[Path | None, typer.Option("--file", "-f", help="The deployments to register with `prefect deploy --all` (default: the project's prefect.yaml).")] = None,
    project_dir: Annotated[Path | None, typer.Option("--project-dir", help="Where `prefect deploy` runs and the workers start (default: this aeflow checkout).")] = None,
    redeploy: Annotated[bool, typer.Option("--redeploy", help="Run `prefect deploy --all` even when every deployment exists.")] = False,
    bucket: Annotated[str | None, typer.Option("--bucket", help="The bucket created at start (default aeflow).")] = None,
    pg_user: Annotated[str | None, typer.Option("--pg-user", help="When root: the user PostgreSQL runs as (default postgres).")] = None,
    prefect_port: Annotated[int | None, typer.Option("--prefect-port", help="Prefect API/UI port (default: free, then kept).")] = None,
    s3_port: Annotated[int | None, typer.Option("--s3-port", help="S3 endpoint port (default: free, then kept).")] = None,
    dask_port: Annotated[int | None, typer.Option("--dask-port", help="Dask scheduler port (default: free, then kept).")] = None,
    postgres_port: Annotated[int | None, typer.Option("--postgres-port", help="PostgreSQL port (default: free, then kept).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of export lines.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
) -> None:
    """Start the platform (or restart what is not running) and print what a client needs.

    Prints `export` lines (use `eval "$(aeflow platform up)"`) or, with --json,
    the Prefect API URL, the S3 endpoint, bucket and keys, the Dask scheduler and
    each process's pid and log. Progress goes to stderr. Options not given keep
    the values of DIR's last `up` (the defaults below are a new DIR's).

    Exit code 2 when a port it needs is held by another program or set for two
    servers (refused before anything starts, naming the option that moves it,
    as `aeflow serve` does), when one would move the port of a component that
    runs, or when --project-dir or --file does not exist; 6 when a component
    does not start (its name and log are printed).
    """
    from flows.platform.core import shell_exports, up

    settings = {"workers": workers, "dask_workers": dask_workers, "dask_threads": dask_threads, "worker_limit": worker_limit,
                "training_slots": training_slots, "poll_seconds": poll_seconds, "bucket": bucket, "pg_user": pg_user,
                "redeploy": redeploy or None}
    ports = {"prefect": prefect_port, "s3": s3_port, "dask": dask_port, "postgres": postgres_port}
    where = directory or _default_dir()
    try:
        result = up(where, settings=settings, ports=ports, project_dir=project_dir,
                    deploy_file=deploy_file, emit=_progress(quiet or as_json))
    except AeflowError as e:
        _fail(e)
    except KeyboardInterrupt:  # up has stopped what this command had started (what ran before stays)
        err.print(f"[bold red]interrupted:[/] what this `up` had started is stopped again; `aeflow platform up --dir "
                  f"{where}` starts it", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if not quiet:
        err.print(f"[bold]UI:[/] {result['prefect_ui_url']}   [bold]S3:[/] {result['s3_endpoint']} ({result['output']})   "
                  f"[bold]Dask:[/] {result['dask_scheduler']}   {_up_in(result)}", highlight=False)
    print(shell_exports(result["env"]))


def _up_in(result: dict) -> str:
    """How long this ``up`` took to start what it started, or that everything was running already."""
    if not result.get("started"):
        return "already running (nothing started)"
    return f"up in {result['timings'].get('up', 0):.0f}s (started: {', '.join(result['started'])})"


@platform_app.command("status")
def status_cmd(
    directory: DirOption = None,  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show each component: pid, running, healthy, ports, log.

    Exit code 0 when every component is healthy; 1 when any is not, or when
    nothing is running (a stopped platform is not healthy); 4 when DIR holds no
    platform.
    """
    from flows.platform.core import status

    try:
        result = status(directory or _default_dir())
    except AeflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps(result, indent=2))
    elif not result["components"]:  # after `down`: no empty table, one line
        err.print(f"aeflow platform in {result['dir']}: nothing is running (state and data are kept; exit code 1); "
                  f"`aeflow platform up --dir {result['dir']}` starts it again", highlight=False, soft_wrap=True)
    else:
        table = Table(title=f"aeflow platform in {result['dir']}", title_justify="left")
        for col in ("component", "pid", "state", "ports", "log"):
            table.add_column(col, overflow="fold")
        for c in result["components"]:
            table.add_row(c["name"], str(c["pid"]), _state_word(c), " ".join(f"{k}={v}" for k, v in c["ports"].items()), c["log"])
        Console().print(table)
        sick = [c for c in result["components"] if not c["healthy"]]
        if sick:
            names = ", ".join(f"{c['name']} ({'not answering' if c['alive'] else 'stopped'})" for c in sick)
            err.print(f"not healthy: {names} (exit code 1); `aeflow platform up --dir {result['dir']}` starts what "
                      "is stopped again", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if result["healthy"] else 1)


def _state_word(c: dict) -> str:
    if c["healthy"]:
        return "[green]healthy[/]"
    return "[yellow]running, not answering[/]" if c["alive"] else "[red]stopped[/]"


@platform_app.command("down")
def down_cmd(directory: DirOption = None) -> None:  # type: ignore[assignment]
    """Stop every process the platform started (and nothing else). Data, keys and logs stay in DIR.

    Exit code 0 also when nothing was running; 4 when DIR holds no platform.
    """
    from flows.platform.core import down

    try:
        stopped = down(directory or _default_dir(), emit=_progress(False))
    except AeflowError as e:
        _fail(e)
    if stopped:
        err.print(f"stopped {len(stopped)} process{'es' if len(stopped) != 1 else ''}; data and logs are kept",
                  highlight=False)
    else:
        err.print("nothing was running (stopped 0 processes); data and logs are kept", highlight=False)
