"""``aeflow runs list|show``: what has run, from the manifests in an artifact root."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import fail, metrics_table, out, print_notes

app = typer.Typer(help="List and inspect the runs in an artifact root (complete ones; --incomplete: unfinished ones).", no_args_is_help=True)


def headline(app_name: str, metrics: dict) -> tuple[str, float] | None:
    """The run's first headline metric that it has (the application's ``headlines``, as the demo
    shows them), else its first float metric (an application no longer registered)."""
    from tasks.apps import get_app

    try:
        names = [name for name, _higher in get_app(app_name).headlines_of(metrics)]
    except Exception:  # noqa: BLE001 - an unknown app still lists
        names = []
    for name in [*names, *metrics]:
        value = metrics.get(name)
        if isinstance(value, float) and not isinstance(value, bool):
            return name, value
    return None


@app.command("list")
def runs_list(
    output: Annotated[str, typer.Option(
        "--output", "-o", envvar="AEFLOW_OUTPUT",
        help="Artifact root to list (default $AEFLOW_OUTPUT, as `aeflow run` uses it, else ./artifacts).")] = "./artifacts",
    app_name: Annotated[str | None, typer.Option("--app", help="Only this application.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    incomplete: Annotated[bool, typer.Option(
        "--incomplete", help="List the runs without a manifest instead: interrupted ones (the same command resumes "
        "them), and ones running now, with where their training checkpoint stands.")] = False,
) -> None:
    """List complete runs (those with a manifest), oldest first; --incomplete: the unfinished ones."""
    from tasks.apps import load_all
    from tasks.errors import ConfigError, StorageError
    from tasks.storage import (
        ArtifactStore,
        bucket_exists,
        is_local,
        refuse_empty_root,
        storage_op,
        url_to_fs,
    )

    try:
        if app_name is not None and app_name not in (apps := load_all()):
            raise ConfigError(f"--app {app_name!r} is no application; one of: {', '.join(sorted(apps))}")
        refuse_empty_root(output)
        fs, path = url_to_fs(output)
        if is_local(fs) and not fs.exists(path):
            raise StorageError(f"no artifact root at {output} (nothing has run there); --output names one")
        if is_local(fs) and not fs.isdir(path):
            raise StorageError(f"{output} is a file, not an artifact root (a folder that runs write to); --output "
                               "names one")
        if not is_local(fs):
            bucket = path.split("/")[0]
            with storage_op("list", output):
                if not bucket_exists(fs, bucket):
                    raise StorageError(f"cannot list {output}: bucket {bucket!r} does not exist")
        with storage_op("list", output):
            store = ArtifactStore(output)
            if incomplete:
                unfinished = store.incomplete_runs(app_name)
            else:
                manifests = store.list_runs(app_name)
    except Exception as e:  # noqa: BLE001 - fail() says what it is: a user error, an outage (exit 4), or a bug
        fail(e)
    if incomplete:
        _print_incomplete(unfinished, output, app_name, as_json)
        return
    if as_json:
        print(json.dumps([{"app": m.app, "run_id": m.run_id, "run_uri": m.run_uri, "created": m.created.isoformat(),
                           "input": _data_of(m), "metrics": m.metrics} for m in manifests]))
        return
    if not manifests:
        out.print(f"no complete runs under {output}" + (f" for {app_name}" if app_name else ""))
        return
    def table_of(with_data: bool) -> Table:
        table = Table(title=f"complete runs in {output} (URI: <root>/runs/<app>/<run id>)", title_justify="left")
        for col in ("app", "run id", "created (UTC)", *(["data"] if with_data else []), "headline metric"):
            table.add_column(col, no_wrap=col != "headline metric")
        for m in manifests:
            head = headline(m.app, m.metrics)
            table.add_row(m.app, m.run_id, f"{m.created:%Y-%m-%d %H:%M}", *([_data_of(m)] if with_data else []),
                          f"{head[0]} {head[1]:.4g}" if head else "")
        return table

    # the data each run read (a backfill's day, say), when it fits whole beside the rest; else said how to see it
    table = table_of(True)
    if _natural_width(table) > out.width:
        table = table_of(False)
        out.print(table)
        out.print("(the data each run read: a wider terminal, or --json)", highlight=False)
        return
    out.print(table)


def _natural_width(table: Table) -> int:
    from rich.measure import Measurement

    return Measurement.get(out, out.options.update_width(10**6), table).maximum


def _data_of(m) -> str:
    """What a run ran on, as given (a backfill's date resolved): which day of a backfill a run was, say."""
    load = (m.config or {}).get("load") or {}
    return str((load.get("apply_to") if m.model_run else None) or load.get("input") or load.get("apply_to") or "")


def _print_incomplete(runs: list[dict], output: str, app_name: str | None, as_json: bool) -> None:
    if as_json:  # with the table's state (it was only "running": null for an interrupted run)
        print(json.dumps([{**r, "state": "running" if r["running"] else "interrupted"} for r in runs]))
        return
    if not runs:
        out.print(f"no incomplete runs under {output}" + (f" for {app_name}" if app_name else ""))
        return
    table = Table(title=f"incomplete runs in {output} (no manifest yet)", title_justify="left")
    for col in ("app", "run id", "started (UTC)", "state", "training checkpoint"):
        # the run id whole on one line, to copy (it was folded at 80 columns); the others wrap at spaces
        table.add_column(col, overflow="fold", no_wrap=col in ("app", "run id"),
                         min_width={"state": len("interrupted"), "training checkpoint": len("checkpoint")}.get(col))
    for r in runs:
        state = f"running (pid {r['running']['pid']} on {r['running']['host']})" if r["running"] else "interrupted"
        ck = r["checkpoint"]
        where = ("none (starts over)" if not ck else "training done" if ck.get("finished")
                 else f"after epoch {ck.get('epoch')}" + (f", step {ck.get('step')}" if ck.get("step") else ""))
        table.add_row(r["app"], r["run_id"], str(r["created"])[:16].replace("T", " "), state, where)
    out.print(table)
    out.print("An interrupted run is resumed by the same command (same input and configuration); to abandon one, "
              "delete its folder (<root>/runs/<app>/<run id>).", highlight=False, soft_wrap=True)


@app.command("show")
def runs_show(
    run_uri: Annotated[str, typer.Argument(help="The run's URI, e.g. ./artifacts/runs/reduce/<run_id>.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a run's manifest: metrics vs baselines, outputs, timings, inputs."""
    from tasks.storage import open_run

    try:
        manifest = open_run(run_uri).manifest()
    except Exception as e:  # noqa: BLE001 - fail() says what it is: a user error, an outage (exit 4), or a bug
        fail(e)
    if as_json:
        print(manifest.model_dump_json(indent=2))
        return
    out.print(f"[bold]{manifest.app}[/] run [bold]{manifest.run_id}[/]  ({manifest.created:%Y-%m-%d %H:%M:%S} UTC, {manifest.device})")
    out.print(f"URI: {manifest.run_uri}", highlight=False, soft_wrap=True)
    if manifest.model_run:
        out.print(f"model from: {manifest.model_run}", highlight=False, soft_wrap=True)
    for role, files in manifest.inputs.items():
        for f in files:
            out.print(f"{role}: {f.path} ({f.size:,} bytes, {f.hash[:20]}…)", highlight=False, soft_wrap=True)
    if manifest.metrics:
        out.print(metrics_table("metrics", manifest.metrics, manifest.baselines))
    print_notes((manifest.extra or {}).get("notes") or [])
    table = Table(title="outputs", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    for o in manifest.outputs:
        table.add_row(o.path, f"{o.size:,}")
    out.print(table)
    out.print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in manifest.timings.items()))
