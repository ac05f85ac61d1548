"""The ``aeflow`` command line: ad-hoc runs, run listing, sample data and the demo.

Each command group is a typer sub-app joined with ``add_typer``. ``aeflow run
APP`` has one command per registered application, generated from the registry
so every application gets the same common options plus its own.
"""

import inspect
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tasks.errors import AeflowError

app = typer.Typer(
    name="aeflow",
    help="Autoencoder applications as Prefect-orchestrated batch jobs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
run_app = typer.Typer(help="Run an application once (train, or reuse --model, then apply and evaluate).", no_args_is_help=True)
runs_app = typer.Typer(help="List and inspect completed runs in an artifact root.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(runs_app, name="runs")

out = Console()
err = Console(stderr=True)

# (parameter name, flag(s), config path, type, help). Every application gets these.
COMMON_OPTIONS: tuple[tuple[str, tuple[str, ...], str | None, Any, str], ...] = (
    ("input", ("--input", "-i"), "load.input", str, "Training data: CSV/Parquet file, folder or glob; local or s3://."),
    ("apply_to", ("--apply-to",), "load.apply_to", str, "Data to apply the model to (default: the input)."),
    ("model", ("--model", "-m"), "model_run", str, "Reuse the model of this run (its URI) instead of training."),
    ("output", ("--output", "-o"), "output", str, "Artifact root: a folder or s3://bucket/prefix (default ./artifacts)."),
    ("label_column", ("--label-column",), "load.label_column", str, "Column kept out of training, used for metrics and plots."),
    ("id_column", ("--id-column",), "load.id_column", str, "Column carried through to every output table."),
    ("exclude", ("--exclude",), "load.exclude_columns", list[str], "Column to ignore (repeatable)."),
    ("file_format", ("--format",), "load.format", str, "csv, parquet or auto (by extension)."),
    ("hidden", ("--hidden",), "model.hidden", str, "Encoder widths, comma separated, e.g. 1500 or 256,128."),
    ("epochs", ("--epochs",), "train.epochs", int, "Maximum epochs (early stopping usually ends sooner)."),
    ("batch_size", ("--batch-size",), "train.batch_size", int, "Training batch size."),
    ("lr", ("--lr",), "train.lr", float, "Adam learning rate."),
    ("patience", ("--patience",), "train.patience", int, "Early-stopping patience in epochs."),
    ("seed", ("--seed",), "train.seed", int, "Random seed of initialisation, shuffling and corruption."),
    ("device", ("--device",), "train.device", str, "auto (cuda if present, else cpu), cpu, cuda, cuda:N."),
    ("val_fraction", ("--val-fraction",), "preprocess.val_fraction", float, "Share of rows held out for validation."),
    ("dask_address", ("--dask-address",), "dask_address", str, "Existing Dask scheduler (default: a LocalCluster)."),
    ("run_id", ("--run-id",), "run_id", str, "Name of the run directory (default: time + fingerprint)."),
)


class _UserErrorFilter(logging.Filter):
    """Drop console records that would repeat a user error with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, AeflowError):
            return False
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            msg = record.getMessage()
            if "Finished in state Failed" in msg or "Task run failed with exception" in msg:
                return not any(f"{c.__name__}(" in msg or f"{c.__name__}:" in msg for c in _error_classes())
        return True


def _hide_user_error_tracebacks() -> None:
    """On the console, a user error is one line from the CLI, not Prefect's tracebacks."""
    loggers = [logging.getLogger()] + [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("prefect")
    ]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _UserErrorFilter) for f in h.filters):
                h.addFilter(_UserErrorFilter())


def _error_classes() -> list[type]:
    seen, todo = [], [AeflowError]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return seen


def _quiet_prefect(quiet: bool) -> None:
    if quiet:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _fail(e: BaseException) -> None:
    if isinstance(e, AeflowError):
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    err.print("[bold red]aeflow failed with an unexpected error (a bug; please report it):[/]")
    err.print("".join(traceback.format_exception(e)), highlight=False, markup=False)
    raise typer.Exit(1)


def _metrics_table(title: str, metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> Table:
    from tasks.report import metrics_rows

    rows = metrics_rows(metrics, baselines)
    table = Table(title=title, title_justify="left")
    for col in rows[0] if rows else ["metric", "aeflow"]:
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        table.add_row(*r.values())
    return table


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(result.model_dump_json())
        return
    verb = "skipped (already complete)" if result.skipped else "complete"
    out.print(f"[bold green]{result.app} run {verb}:[/] {result.run_uri}", highlight=False, soft_wrap=True)
    if result.metrics or result.baselines:
        out.print(_metrics_table("metrics (held-out data)", result.metrics, result.baselines))
    for name, uri in result.outputs.items():
        out.print(f"  {name}: {uri}", highlight=False, soft_wrap=True)


def execute(app_name: str, options: dict[str, Any], config_file: Path | None, sets: list[str] | None) -> Any:
    """Resolve the config, run the application's flow, and return its RunResult (raises on failure)."""
    from flows.pipeline import FLOWS
    from tasks.apps import get_app
    from tasks.config import resolve_config

    application = get_app(app_name)
    cfg = resolve_config(application.RunConfig, file=config_file, options=options, sets=sets)
    _hide_user_error_tracebacks()
    state = FLOWS[app_name](config=cfg, return_state=True)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        raise exc
    raise AeflowError(f"{app_name} run ended in state {state.type.value}: {state.message}")


def _make_run_command(application: Any) -> None:
    extra = [(flag.lstrip("-").replace("-", "_"), (flag,), path, typ, help_) for flag, path, typ, help_ in application.cli_options]
    option_specs = list(COMMON_OPTIONS) + extra
    params = []
    for name, flags, _path, typ, help_ in option_specs:
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[typ | None, typer.Option(*flags, help=help_, show_default=False)],
            )
        )
    params += [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with the same nesting as the config.")],
        ),
        inspect.Parameter(
            "set_", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.lr=3e-4 (repeatable).")],
        ),
        inspect.Parameter(
            "skip_existing", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option("--skip-existing", help="Do nothing if a complete run with the same input and config exists.")],
        ),
        inspect.Parameter(
            "as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option("--json", help="Print one JSON object (run_uri, outputs, metrics) on stdout.")],
        ),
        inspect.Parameter(
            "quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and the result.")],
        ),
    ]
    paths = {name: path for name, _f, path, _t, _h in option_specs}

    def command(**kwargs: Any) -> None:
        options: dict[str, Any] = {}
        for name, path in paths.items():
            value = kwargs.get(name)
            if value is None or value == []:
                continue
            if name == "hidden":
                try:
                    value = [int(v) for v in str(value).replace(" ", "").split(",") if v]
                except ValueError as e:
                    raise typer.BadParameter(f"--hidden expects comma-separated integers, got {value!r}") from e
            options[path] = value
        if kwargs.get("skip_existing"):
            options["skip_existing"] = True
        _quiet_prefect(kwargs.get("quiet") or kwargs.get("as_json"))
        try:
            result = execute(application.name, options, kwargs.get("config"), kwargs.get("set_"))
        except (AeflowError, Exception) as e:
            _fail(e)
        _print_result(result, kwargs.get("as_json", False))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = f"run_{application.name}"
    doc = (sys.modules[type(application).__module__].__doc__ or "").strip().replace("``", "")
    run_app.command(application.name, help=doc, no_args_is_help=True)(command)


def _register_run_commands() -> None:
    from tasks.apps import load_all, load_image_apps

    for application in {**load_all(), **load_image_apps()}.values():
        _make_run_command(application)


_register_run_commands()


@runs_app.command("list")
def runs_list(
    output: Annotated[str, typer.Option("--output", "-o", help="Artifact root to list.")] = "./artifacts",
    app_name: Annotated[str | None, typer.Option("--app", help="Only this application.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List complete runs (those with a manifest), oldest first."""
    from tasks.storage import ArtifactStore

    try:
        manifests = ArtifactStore(output).list_runs(app_name)
    except AeflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps([{"app": m.app, "run_id": m.run_id, "run_uri": m.run_uri, "created": m.created.isoformat(),
                           "metrics": m.metrics} for m in manifests]))
        return
    if not manifests:
        out.print(f"no complete runs under {output}" + (f" for {app_name}" if app_name else ""))
        return
    table = Table(title=f"complete runs in {output} (URI: <root>/runs/<app>/<run id>)", title_justify="left")
    table.add_column("app", no_wrap=True)
    table.add_column("run id", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("headline metric")
    for m in manifests:
        head = next(((k, v) for k, v in m.metrics.items() if isinstance(v, float)), None)
        table.add_row(m.app, m.run_id, f"{m.created:%Y-%m-%d %H:%M}", f"{head[0]} {head[1]:.4g}" if head else "")
    out.print(table)


@runs_app.command("show")
def runs_show(
    run_uri: Annotated[str, typer.Argument(help="The run's URI, e.g. ./artifacts/runs/reduce/<run_id>.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a run's manifest: metrics vs baselines, outputs, timings, inputs."""
    from tasks.storage import open_run

    try:
        manifest = open_run(run_uri).manifest()
    except AeflowError as e:
        _fail(e)
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
        out.print(_metrics_table("metrics", manifest.metrics, manifest.baselines))
    table = Table(title="outputs", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("bytes", justify="right")
    for o in manifest.outputs:
        table.add_row(o.path, f"{o.size:,}")
    out.print(table)
    out.print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in manifest.timings.items()))


@app.command("compress")
def compress_cmd(
    images: Annotated[list[str], typer.Argument(help="Images to compress (PNG/JPEG/...; local or s3://).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="A compress run whose codec to use (its URI).", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Folder for the .aec files (local or s3://).")] = ".",
    quality: Annotated[int | None, typer.Option("--quality", "-q", help="Quality level, 0 = lowest rate (default: the middle level).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file on stdout.")] = False,
) -> None:
    """Compress images into .aec files with a trained codec: OUTDIR/<name>.aec."""
    from tasks.codec import check_quality, encode_image, load_codec_run, read_image
    from tasks.storage import join_uri, url_to_fs

    try:
        codec = load_codec_run(model)
        q = check_quality(codec, codec.model.config.levels // 2 if quality is None else quality)
        fs, _ = url_to_fs(output_dir)
        fs.makedirs(url_to_fs(output_dir)[1], exist_ok=True)
        for uri in images:
            img, mode = read_image(uri)
            data = encode_image(codec, img, mode, q)
            name = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".aec"
            dest = join_uri(output_dir, name)
            dfs, dpath = url_to_fs(dest)
            dfs.pipe_file(dpath, data)
            bpp = 8 * len(data) / (img.shape[0] * img.shape[1])
            if as_json:
                print(json.dumps({"input": uri, "output": dest, "bytes": len(data), "bpp": bpp, "quality": q}))
            else:
                out.print(f"{uri} -> {dest}  ({len(data):,} bytes, {bpp:.3f} bpp, quality {q})", highlight=False)
    except AeflowError as e:
        _fail(e)


@app.command("decompress")
def decompress_cmd(
    files: Annotated[list[str], typer.Argument(help=".aec files to decode (local or s3://).", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Folder for the decoded PNGs (local or s3://).")] = ".",
    model: Annotated[str | None, typer.Option("--model", "-m", help="The compress run that made the files (default: found by the files' model identity under --root).", show_default=False)] = None,
    root: Annotated[str, typer.Option("--root", help="Artifact root searched for the model when --model is not given.")] = "./artifacts",
) -> None:
    """Decode .aec files to PNG: OUTDIR/<name>.png. The model is checked against each file's identity."""
    from tasks.codec import decode_aec, encode_png, find_codec_run, load_codec_run, read_aec
    from tasks.errors import InputError, ModelMismatchError
    from tasks.storage import join_uri, url_to_fs

    try:
        codecs = {}
        if model:
            given = load_codec_run(model)
            codecs[given.identity] = given
        fs, path = url_to_fs(output_dir)
        fs.makedirs(path, exist_ok=True)
        for uri in files:
            sfs, spath = url_to_fs(uri)
            try:
                data = sfs.cat_file(spath)
            except FileNotFoundError as e:
                raise InputError(f"{uri}: no such file") from e
            header = read_aec(data, uri)
            codec = codecs.get(header.model_id)
            if codec is None and model:
                codec = next(iter(codecs.values()))  # decode_aec names both identities
            if codec is None:
                codec = find_codec_run(root, header.model_id)
                if codec is None:
                    raise ModelMismatchError(
                        f"{uri}: made by codec {header.model_id_hex}, which no compress run under {root} holds; "
                        "pass --model RUN"
                    )
                codecs[header.model_id] = codec
            img, mode = decode_aec(codec, data, uri)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            name = (name[:-4] if name.endswith(".aec") else name).rsplit(".", 1)[0] + ".png"
            dest = join_uri(output_dir, name)
            dfs, dpath = url_to_fs(dest)
            dfs.pipe_file(dpath, encode_png(img))
            out.print(f"{uri} -> {dest}  ({img.shape[1]}x{img.shape[0]} {mode})", highlight=False)
    except AeflowError as e:
        _fail(e)


@app.command("sample-data")
def sample_data(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write the sample data into.")] = "./artifacts/sample-data",
    overwrite: Annotated[bool, typer.Option(help="Rewrite files that exist.")] = False,
) -> None:
    """Write the bundled sample datasets (scikit-learn's digits, breast cancer, wine, diabetes)."""
    from tasks.sample_data import SAMPLE_TABLES, write_sample_tables

    paths = write_sample_tables(output, overwrite=overwrite)
    for t in SAMPLE_TABLES:
        out.print(f"{paths[t.name]}  ({t.description}; label '{t.label}', id '{t.id}')", highlight=False)


@app.command("demo")
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Artifact root for the demo runs.")] = "./artifacts",
    quick: Annotated[bool, typer.Option(help="Fewer epochs, for a fast look.")] = False,
) -> None:
    """Build the sample data and run every application on it; print a summary with the run URIs."""
    from tasks.sample_data import SAMPLE_TABLES, write_sample_tables

    data_dir = os.path.join(output, "sample-data")
    paths = write_sample_tables(data_dir)
    labels = {t.name: t for t in SAMPLE_TABLES}
    jobs: list[tuple[str, str, dict[str, Any]]] = [
        ("reduce", "digits", {"model.latent_dim": 2}),
        ("reduce", "breast_cancer", {"model.latent_dim": 2}),
    ]
    summary = Table(title="aeflow demo", title_justify="left")
    for col in ("app", "data", "aeflow", "baseline", "run URI"):
        summary.add_column(col, overflow="fold")
    failures = 0
    for app_name, data, opts in jobs:
        t = labels[data]
        options = {"load.input": paths[data], "load.label_column": t.label, "load.id_column": t.id, "output": output, **opts}
        if quick:
            options["train.epochs"] = 15
        err.rule(f"{app_name} on {data}")
        try:
            result = execute(app_name, options, None, None)
        except Exception as e:
            failures += 1
            err.print(f"[red]{app_name} on {data} failed:[/] {e}")
            summary.add_row(app_name, data, "failed", "", str(e)[:80])
            continue
        ours = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items() if isinstance(v, float))
        base = "; ".join(
            f"{b}: " + ", ".join(f"{k} {v:.3f}" for k, v in vals.items() if isinstance(v, float))
            for b, vals in result.baselines.items()
        )
        summary.add_row(app_name, data, ours, base, result.run_uri)
    out.print(summary)
    out.print(f"List them with: aeflow runs list --output {output}")
    if failures:
        raise typer.Exit(1)


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    app()


if __name__ == "__main__":
    main()
