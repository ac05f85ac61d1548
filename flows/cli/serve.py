"""``aeflow serve``: a Prefect server (unless --api-url), the deployments of prefect.yaml, and their runs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import err, fail
from tasks.errors import AeflowError


def serve(
    file: Annotated[Path, typer.Option("--file", "-f", help="The deployments to serve.")] = Path("prefect.yaml"),
    api_url: Annotated[str | None, typer.Option("--api-url", help="Use this Prefect server instead of starting one, e.g. http://host:4200/api.")] = None,
    host: Annotated[str, typer.Option(help="Address of the server this command starts.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the server this command starts.")] = 4200,
    deployment: Annotated[list[str] | None, typer.Option("--deployment", "-d", help="Serve only this deployment (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs executing at once (default: no limit).")] = None,
) -> None:
    """Start a Prefect server (SQLite) unless --api-url, register prefect.yaml's deployments, and run them.

    Every application flow that prefect.yaml does not name also gets an on-demand
    deployment (named after the flow), so new applications are runnable at once.

    Open the UI at http://HOST:PORT, pick a deployment, press Run. Scheduled runs
    execute here too. Ctrl-C stops the runner and the server this command
    started. The server logs to PREFECT_HOME/server.log (appended). Exit code 2
    when --port is in use by another program, 4 when --api-url has no healthy
    Prefect server.
    """
    from flows.deploy import (
        api_healthy,
        load_specs,
        serve_deployments,
        server_env,
        start_server,
        stop_process_group,
        with_default_deployments,
    )

    try:
        specs = load_specs(file, deployment)
        if not deployment:
            specs = with_default_deployments(specs)
    except AeflowError as e:
        fail(e)
    server = None
    if api_url:
        if not api_healthy(api_url):
            err.print(f"[bold red]error:[/] no healthy Prefect server at {api_url}", highlight=False)
            raise typer.Exit(4)
    else:
        api_url = f"http://{host}:{port}/api"
        if api_healthy(api_url):
            err.print(f"a Prefect server is already running at {api_url}; using it", highlight=False)
        else:
            from flows.platform.procs import require_free_port

            try:  # before starting anything: a running server's log and database in PREFECT_HOME stay untouched
                require_free_port(host, port, user="the Prefect server this command starts",
                                  change="pass another --port, or --api-url to use a Prefect server that is running "
                                         "(the program on that port is not one)")
            except AeflowError as e:
                fail(e)
            server_log = _server_log_path()
            err.print(f"starting a Prefect server (SQLite) at http://{host}:{port} (log: {server_log}) ...", highlight=False)
            try:
                server = start_server(host, port, server_env(api_url), log_path=str(server_log))
                err.print(f"prefect server pid {server.pid}", highlight=False)
            except AeflowError as e:
                fail(e)
    os.environ["PREFECT_API_URL"] = api_url
    ui_url = api_url.removesuffix("/api")

    def _terminate(signum: int, _frame: Any) -> None:  # `kill`/`docker stop` shut down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started as a background job of a non-interactive shell (`cmd &`, nohup), which ignores
        # SIGINT: restore it, so `kill -INT` (and asyncio's Ctrl-C handling) still stops us.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    err.print(f"[bold]UI:[/] {ui_url}  —  serving {', '.join(s.name for s in specs)}; Ctrl-C stops", highlight=False)
    try:
        serve_deployments(specs, limit=limit)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            # The server has its own process group, so Ctrl-C reaches the runner first and the
            # runner can still pause its deployments; then the server goes.
            err.print("stopping the Prefect server", highlight=False)
            stop_process_group(server)


def _server_log_path() -> Path:
    """Where the server that ``aeflow serve`` starts writes its log: PREFECT_HOME/server.log, appended to
    (never truncated: an earlier server's lines stay), each start marked by a header line."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "server.log"
    with path.open("a") as f:
        f.write(f"\n--- aeflow serve (pid {os.getpid()}) starting a Prefect server at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n")
    return path
