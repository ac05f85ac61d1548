"""``aeflow backfill APP``: one run per date, here or as flow runs of a deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.common import err, fail, hide_user_error_tracebacks, out, quiet_prefect, sigterm_as_interrupt
from tasks.errors import AeflowError, ConfigError


def backfill(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The application, e.g. reduce.")],
    start: Annotated[str, typer.Option("--start", help="First date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--end", help="Last date, YYYY-MM-DD (included).")],
    input_template: Annotated[str | None, typer.Option(
        "--input-template", "-i",
        help="Input URI with date fields, e.g. data/{date}.csv or s3://b/{date}/ (fields: see README). "
             "Optional with --via-deployment (the deployment's own input is used) or when --config/--set give "
             "load.input with a date field.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Apply this run's model (URI, or 'latest') instead of training per date.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, help="Dates running at once, in this process (not with --via-deployment: the server's workers decide).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Run dates that already have a complete run again.")] = False,
    via_deployment: Annotated[str | None, typer.Option("--via-deployment", help="Create flow runs of this deployment (FLOW/NAME or NAME) on the server instead of running here.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="With --via-deployment: wait until every flow run has finished.")] = False,
    every: Annotated[int, typer.Option("--every", min=1, help="Days between dates (1 = daily, 7 = weekly).")] = 1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Artifact root (default $AEFLOW_OUTPUT, else ./artifacts).")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Column kept out of training.")] = None,
    id_column: Annotated[str | None, typer.Option("--id-column", help="Column carried through to every output.")] = None,
    dask_address: Annotated[str | None, typer.Option("--dask-address", help="Existing Dask scheduler for every date (default: the environment's, see above, else each date's run starts its own LocalCluster, "
                                                                        "or one shared cluster of worker processes when the setting local_cluster is processes, via --set).")] = None,
    run_id: Annotated[str | None, typer.Option(
        "--run-id", help="Name of the run directory, as for `aeflow run`: only for a backfill of one date (each "
                         "date's run is otherwise named by its time and fingerprint).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with the same nesting as the config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.epochs=20 (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of date, status, run_uri, message (and, via a deployment, flow_run_id, flow_run_name, flow_run_url).")] = False,
    max_dates: Annotated[int, typer.Option("--max-dates", min=1, help="Refuse a range of more dates than this (a typo in "
                                           "--end would queue thousands of runs); raise it for a long backfill.")] = 1000,
) -> None:
    """Run APP once per date from --start to --end, filling {date} in --input-template.

    Dates that already have a complete run for the same input and config are
    skipped (unless --force), so running the same backfill again redoes only
    the dates that failed. Exit code 1 when any date failed. Ctrl-C starts no
    further date, stops the running ones and exits 130 (run the same command
    again to resume); with --via-deployment it stops only the waiting: the flow
    runs created go on on the workers.

    Not given, --output and --dask-address are $AEFLOW_OUTPUT and
    $AEFLOW_DASK_ADDRESS when set (`aeflow platform up` prints them), as for
    `aeflow run`.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from flows.backfill import (
        BackfillInterrupted,
        date_options,
        exit_code,
        explicit_overrides,
        run_in_process,
        run_via_deployment,
    )
    from tasks.apps import get_app
    from tasks.config import resolve_config
    from tasks.schedule import date_range, has_template, parse_date, render

    try:
        application = get_app(app_name)  # an unknown APP: ConfigError, exit 2 (as `aeflow run nope`)
        if wait and not via_deployment:
            raise ConfigError("--wait only applies with --via-deployment (an in-process backfill always "
                              "waits for its dates)")
        if parallel != 1 and via_deployment:
            raise ConfigError("--parallel only applies in process; with --via-deployment the server's workers "
                              "(and the deployment's concurrency limit) decide how many dates run at once")
        dates = date_range(parse_date(start), parse_date(end), every)
        if len(dates) > max_dates:
            raise ConfigError(
                f"--start {start} --end {end} is {len(dates):,} dates, more than --max-dates {max_dates:,}: "
                "narrow the range, use --every, or raise --max-dates")
        if input_template is not None and not has_template(input_template):
            raise ConfigError(
                f"--input-template {input_template!r} has no date field such as {{date}}: every date would read "
                "the same data")
        if input_template is not None:
            render(input_template, dates[0])  # a bad format (%Q) refused here, not by every date in turn
        options: dict[str, Any] = {"output": output, "load.label_column": label_column, "load.id_column": id_column,
                                   "dask_address": dask_address, "run_id": run_id}
        if input_template is not None:
            options.update(date_options(input_template, model))
        elif model:
            options["model_run"] = model
        cfg = resolve_config(application.RunConfig, file=config, options=options, sets=set_)
        if input_template is None and not via_deployment:
            # the data each date reads may come with its date field from --config or --set (load.input, or
            # with a model the data it is applied to): they were refused for want of -i
            data = (cfg.load.apply_to or cfg.load.input) if cfg.model_run else cfg.load.input
            if not (data and has_template(data)):
                raise ConfigError(
                    "--input-template is required (unless --via-deployment, or --config/--set give "
                    f"{'load.apply_to' if cfg.model_run else 'load.input'} with a date field such as {{date}})")
            render(data, dates[0])
        if cfg.run_id and len(dates) > 1:
            # every date's run would take that one folder: the second date failed ("already exists and is
            # complete") and so did every rerun that "redoes only the dates that failed"
            raise ConfigError(
                f"run_id {cfg.run_id!r} names one run, and a backfill makes one per date: leave run_id unset "
                "(each date's run is named by its time and fingerprint)")
        if not via_deployment:  # a device this machine lacks (exit 2, as `aeflow run`), not one failure per date
            application.device_for(cfg)
    except AeflowError as e:
        fail(e)

    quiet_prefect(True)
    hide_user_error_tracebacks()
    progress = Progress(
        TextColumn(f"[bold]{app_name} backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"), console=err, transient=False, disable=as_json,
    )
    with progress:
        bar = progress.add_task("dates", total=len(dates), last="")

        last_done = [""]

        def done(o: Any) -> None:
            last_done[0] = f"{o.date}: {o.status}"
            progress.update(bar, advance=1, last=last_done[0])

        def waiting(summary: str) -> None:  # --wait: what the unfinished flow runs do, beside the last finished
            progress.update(bar, last="; ".join(x for x in (last_done[0], f"left: {summary}") if x))

        interrupted, detached, terminated = False, False, False
        with sigterm_as_interrupt():  # `kill`, systemd, a container's stop: as Ctrl-C, then exit 143
            try:
                if via_deployment:
                    overrides = explicit_overrides(config, options, set_)  # validated above as `cfg`
                    outcomes = run_via_deployment(via_deployment, dates, overrides, app_name=app_name, force=force,
                                                  wait=wait, on_done=done, on_wait=waiting)
                else:
                    outcomes = run_in_process(app_name, dates, cfg, parallel=parallel, force=force, on_done=done)
            except BackfillInterrupted as e:
                interrupted, detached, terminated, outcomes = True, e.detached, e.terminated, e.outcomes
            except KeyboardInterrupt as e:  # before any date started, or while creating flow runs
                _drop_bar(progress, bar)
                fail(e, "backfill")
            except Exception as e:  # a refusal before any date ran (no deployment, another app's, no server; the
                _drop_bar(progress, bar)  # temporary Prefect server did not start): one line
                fail(e)
    if as_json:
        print(json.dumps([o.to_json() for o in outcomes]))
    else:
        table = Table(title=f"{app_name} backfill {dates[0]} .. {dates[-1]}", title_justify="left")
        table.add_column("date", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("flow run" if via_deployment else "run URI / error", overflow="fold")
        colours = {"completed": "green", "skipped": "cyan", "scheduled": "blue"}
        for o in outcomes:
            c = colours.get(o.status, "red" if not o.ok else "yellow")
            detail = o.run_uri if o.ok else o.message
            if via_deployment and o.flow_run_name:
                detail = (f"{o.flow_run_name}  {o.flow_run_url}" + (f"\n{o.run_uri}" if o.run_uri else "")
                          + (f"\n{o.message}" if not o.ok and o.message else ""))
            table.add_row(str(o.date), f"[{c}]{o.status}[/]", detail)
        out.print(table)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if detached:
        going = sum(1 for o in outcomes if o.flow_run_id and o.status not in {"completed", "skipped"} and o.ok)
        never = sum(1 for o in outcomes if o.status == "not run")
        err.print(f"[bold red]stopped waiting[/] ({'SIGTERM' if terminated else 'Ctrl-C'}): {going} flow run(s) listed above go on on the workers and "
                  f"finish without this command" + (f"; {never} date(s) got no flow run" if never else "")
                  + "; the same command again creates only the missing ones and waits for all (its runs are "
                  "idempotent per date)", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if terminated else 130)
    if interrupted:
        left = sum(1 for o in outcomes if o.status in {"interrupted", "not run"})
        err.print(f"[bold red]{'terminated' if terminated else 'interrupted'}:[/] {left} date(s) not done; run the "
                  "same command again to resume them (complete dates are skipped)", highlight=False, soft_wrap=True)
        raise typer.Exit(143 if terminated else 130)
    code = exit_code(outcomes)
    if code:
        err.print("[bold red]some dates failed[/]; run the same command again to redo only those", highlight=False)
    raise typer.Exit(code)


def _drop_bar(progress: Progress, bar: Any) -> None:
    """Stop the backfill's bar without leaving it, or a blank line, around the refusal printed next.

    Hidden, then stopped (as a transient display when stderr is not a terminal: its empty last frame
    is not printed), and not stopped again as the ``with`` block exits: rich's Progress.stop prints an
    empty line when stderr is not a terminal, so the one-line refusal came between two blank lines.
    """
    progress.update(bar, visible=False)
    progress.live.transient = not progress.console.is_terminal
    progress.live.stop()
    progress.stop = progress.live.stop  # type: ignore[method-assign]  # the ``with`` block's exit: nothing more
