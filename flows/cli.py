"""The ``aeflow`` command line: ad-hoc runs, run listing, sample data and the demo.

Each command group is a typer sub-app joined with ``add_typer``. ``aeflow run
APP`` has one command per registered application, generated from the registry
so every application gets the same common options plus its own.
"""

import inspect
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.platform.cli import platform_app
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
app.add_typer(platform_app, name="platform")

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

IMAGE_HELP = {
    "input": "Training images: a folder of PNG/JPEG (class subfolders name labels), searched recursively; local or s3://.",
    "apply_to": "Images to apply the model to: a folder of PNG/JPEG, local or s3:// (default: the input).",
}

# The demo's summary: per application, the metrics people compare first; True = higher is better.
HEADLINES: dict[str, tuple[tuple[str, bool], ...]] = {
    "reduce": (("recon_mse", False), ("trustworthiness", True)),
    "extract": (("accuracy", True), ("accuracy_10_per_class", True)),
    "detect": (("roc_auc", True), ("average_precision", True)),
    "impute": (("rmse", False), ("accuracy", True)),
    "denoise": (("psnr", True), ("ssim", True)),
    "index": (("precision_at_10", True), ("recall_at_10", True)),
    "compress": (("psnr", True), ("bd_rate_vs_jpeg_pct", False), ("bd_rate_vs_webp_pct", False)),
}


def headline_rows(app_name: str, metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(metric, ours, best baseline "name value") for the app's headline metrics that the run reported."""
    rows = []
    for metric, higher in HEADLINES.get(app_name, ()):
        ours = metrics.get(metric)
        if not isinstance(ours, (int, float)) or isinstance(ours, bool):
            continue
        scored = [(name, v[metric]) for name, v in baselines.items() if isinstance(v.get(metric), (int, float))]
        best = ""
        if scored:
            name, value = (max if higher else min)(scored, key=lambda nv: nv[1])
            best = f"{name} {value:.3f}"
        rows.append((metric + (" (↑)" if higher else " (↓)"), f"{ours:.3f}", best))
    return rows


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
    # Image applications name the common options that apply to them (no table columns).
    accepted = getattr(application, "common_options", None)
    common = [o for o in COMMON_OPTIONS if accepted is None or o[0] in accepted]
    if accepted is not None:  # image applications: folders of images, not tables
        common = [(n, f, p, t, IMAGE_HELP.get(n, h)) for n, f, p, t, h in common]
    option_specs = common + extra
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


@app.command("search")
def search(
    index: Annotated[str, typer.Option("--index", help="URI of an index run, e.g. ./artifacts/runs/index/<run_id>.")],
    query: Annotated[list[str], typer.Option("--query", help="Query image, or a folder of them (repeatable); searched in one batch.")],
    k: Annotated[int, typer.Option("--k", help="Number of neighbours per query.")] = 10,
    sheet: Annotated[str | None, typer.Option("--sheet", help="Write a contact-sheet PNG (each query and its results) to this path.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list: per query, its results with distances.")] = False,
) -> None:
    """Find the k nearest images of each query in an index built by `aeflow run index`."""
    from tasks.apps.index import open_index, search as search_index, search_sheet
    from tasks.images import list_images
    from tasks.storage import to_uri

    try:
        queries: list[str] = []
        for q in query:
            fs, paths, _others, _root = list_images(q, "query")
            queries += [to_uri(fs, p) for p in paths]
        loaded = open_index(index)
        hits, arrays = search_index(loaded, queries, k)
        if sheet:
            from tasks.storage import url_to_fs

            fs, path = url_to_fs(sheet)
            fs.pipe_file(path, search_sheet(loaded, queries, arrays, hits))
    except AeflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps([{"query": q, "results": [h.__dict__ for h in row]} for q, row in zip(queries, hits, strict=True)]))
        return
    for q, row in zip(queries, hits, strict=True):
        table = Table(title=f"nearest to {q}", title_justify="left")
        for col in ("rank", "distance", "label", "image"):
            table.add_column(col, justify="right" if col in ("rank", "distance") else "left", overflow="fold")
        for h in row:
            table.add_row(str(h.rank), f"{h.distance:.4g}", h.label, h.path)
        out.print(table)
    if sheet:
        out.print(f"contact sheet: {sheet}", highlight=False, soft_wrap=True)


@app.command("compress")
def compress_cmd(
    images: Annotated[list[str], typer.Argument(help="Images to compress (PNG/JPEG; local or s3://).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="A compress run whose codec to use (its URI).", show_default=False)],
    output_dir: Annotated[str, typer.Option("--output", "-o", help="Folder for the .aec files (local or s3://).")] = ".",
    quality: Annotated[int | None, typer.Option("--quality", "-q", help="Quality level, 0 = lowest rate (default: the middle level).", show_default=False)] = None,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=0, help="Optimise each image's latent for this many steps before coding (about 100: fewer bits and higher PSNR, a few hundred times slower encoding; decoding unchanged).")] = 0,
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
            if refine_steps and not as_json:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                with Progress(TextColumn(f"refining {uri}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=err, transient=True) as progress:
                    bar = progress.add_task("refine", total=refine_steps)
                    data = encode_image(codec, img, mode, q, refine_steps,
                                        on_step=lambda done, _total: progress.update(bar, completed=done))
            else:
                data = encode_image(codec, img, mode, q, refine_steps)
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
    """Write the bundled sample datasets (scikit-learn's digits, breast cancer, wine, diabetes)
    and image sets (digits as PNG class folders; scikit-image's photographs, train/held-out)."""
    from tasks.sample_data import SAMPLE_TABLES, write_sample_images, write_sample_tables

    paths = write_sample_tables(output, overwrite=overwrite)
    for t in SAMPLE_TABLES:
        out.print(f"{paths[t.name]}  ({t.description}; label '{t.label}', id '{t.id}')", highlight=False)
    images = write_sample_images(output, overwrite=overwrite)
    out.print(f"{images['digit_images']}/<digit>/<id>.png  (1797 8x8 digits as PNG, one folder per class)", highlight=False)
    out.print(f"{images['photos_train']}  (scikit-image photographs for training)", highlight=False)
    out.print(f"{images['photos_heldout']}  (camera, astronaut, coffee: held out, never trained on)", highlight=False)
    out.print(f"{images['photos_heldout_noisy']}  (the held-out photographs with Gaussian noise, sigma 25/255)",
              highlight=False)
    out.print(f"{images['photos_codec_heldout']}  (chelsea, coffee, rocket, camera: never seen by the committed "
              "benchmark codec)", highlight=False)


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
        ("extract", "digits", {}),
        # breast cancer's label 0 is malignant: the anomalies of this demo.
        ("detect", "breast_cancer", {"app.positive_label": "0"}),
        ("impute", "wine", {}),
    ]
    # Image applications (issue 4): denoise photographs, index the digit images.
    from tasks.sample_data import write_sample_images

    images = write_sample_images(data_dir)
    weights = Path(__file__).resolve().parents[1] / "benchmarks" / "weights"
    if (weights / "denoise").is_dir():
        # The denoiser the benchmark trained on the training photos (19 CPU minutes, committed),
        # applied to the held-out photos with sigma=25 noise and scored against the clean ones.
        denoise_job = ("denoise", "photos (held out)", {
            "model_run": str(weights / "denoise"), "load.apply_to": images["photos_heldout_noisy"],
            "load.reference": images["photos_heldout"], "app.noise_sigma": 25.0})
    else:  # small budgets: conv training on a CPU is slow (see benchmarks/RESULTS.md for longer runs)
        denoise_job = ("denoise", "photos", {"load.input": images["photos_train"], "app.eval_images": 3,
                                             "app.patches": 400 if quick else 1500, "train.epochs": 2 if quick else 6})
    image_jobs: list[tuple[str, str, dict[str, Any]]] = [
        denoise_job,
        ("index", "digit images", {"load.input": images["digit_images"], "load.size": 16,
                                   "train.epochs": 3 if quick else 15}),
    ]
    # compress: the codec trained by benchmarks/train_codec.py (committed), applied to the photos it never saw.
    codec = weights / "codec"
    if codec.is_dir():
        image_jobs.append(("compress", "photos (held out)", {"model_run": str(codec), "load.apply_to": images["photos_codec_heldout"]}))
    summary = Table(title="aeflow demo: headline metrics (held-out data)", title_justify="left")
    for col in ("app", "data", "metric", "aeflow", "best baseline"):
        summary.add_column(col, overflow="fold", justify="right" if col == "aeflow" else "left")
    run_uris: list[tuple[str, str, str]] = []
    failures = 0
    all_jobs = [(a, d, o, True) for a, d, o in jobs] + [(a, d, o, False) for a, d, o in image_jobs]
    for app_name, data, opts, tabular in all_jobs:
        if tabular:
            t = labels[data]
            options = {"load.input": paths[data], "load.label_column": t.label, "load.id_column": t.id, "output": output, **opts}
        else:
            options = {"output": output, **opts}
        if quick and tabular:
            options["train.epochs"] = 15
        err.rule(f"{app_name} on {data}")
        try:
            result = execute(app_name, options, None, None)
        except Exception as e:
            failures += 1
            err.print(f"[red]{app_name} on {data} failed:[/] {e}")
            summary.add_row(app_name, data, "failed", "", str(e)[:80])
            continue
        for i, (metric, ours, best) in enumerate(headline_rows(app_name, result.metrics, result.baselines)):
            summary.add_row(app_name if i == 0 else "", data if i == 0 else "", metric, ours, best,
                            end_section=False)
        summary.add_section()
        run_uris.append((app_name, data, result.run_uri))
    out.print(summary)
    for app_name, data, uri in run_uris:
        out.print(f"  {app_name} ({data}): {uri}", highlight=False, soft_wrap=True)
    out.print(f"All metrics: aeflow runs show RUN_URI; list them with: aeflow runs list --output {output}")
    if failures:
        raise typer.Exit(1)


@app.command("serve")
def serve(
    file: Annotated[Path, typer.Option("--file", "-f", help="The deployments to serve.")] = Path("prefect.yaml"),
    api_url: Annotated[str | None, typer.Option("--api-url", help="Use this Prefect server instead of starting one, e.g. http://host:4200/api.")] = None,
    host: Annotated[str, typer.Option(help="Address of the server this command starts.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the server this command starts.")] = 4200,
    deployment: Annotated[list[str] | None, typer.Option("--deployment", "-d", help="Serve only this deployment (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs executing at once.")] = None,
) -> None:
    """Start a Prefect server (SQLite) unless --api-url, register prefect.yaml's deployments, and run them.

    Every application flow that prefect.yaml does not name also gets an on-demand
    deployment (named after the flow), so new applications are runnable at once.

    Open the UI at http://HOST:PORT, pick a deployment, press Run. Scheduled runs
    execute here too. Ctrl-C stops the runner and the server this command started.
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
        _fail(e)
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
            server_log = _server_log_path()
            err.print(f"starting a Prefect server (SQLite) at http://{host}:{port} (log: {server_log}) ...", highlight=False)
            try:
                server = start_server(host, port, server_env(api_url), log_path=str(server_log))
                err.print(f"prefect server pid {server.pid}", highlight=False)
            except AeflowError as e:
                _fail(e)
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
    """Where the server that ``aeflow serve`` starts writes its log: PREFECT_HOME/server.log."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home / "server.log"


@app.command("backfill")
def backfill(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The application, e.g. reduce.")],
    start: Annotated[str, typer.Option("--start", help="First date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--end", help="Last date, YYYY-MM-DD (included).")],
    input_template: Annotated[str | None, typer.Option(
        "--input-template", "-i",
        help="Input URI with date fields, e.g. 's3://b/raw/{date}/*.parquet' (fields: see README). "
             "Optional with --via-deployment (the deployment's own input is used).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Apply this run's model (URI, or 'latest') instead of training per date.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, help="Dates running at once.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Run dates that already have a complete run again.")] = False,
    via_deployment: Annotated[str | None, typer.Option("--via-deployment", help="Create flow runs of this deployment (FLOW/NAME or NAME) on the server instead of running here.")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="With --via-deployment: wait until every flow run has finished.")] = False,
    every: Annotated[int, typer.Option("--every", min=1, help="Days between dates (1 = daily, 7 = weekly).")] = 1,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Artifact root (default ./artifacts).")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Column kept out of training.")] = None,
    id_column: Annotated[str | None, typer.Option("--id-column", help="Column carried through to every output.")] = None,
    dask_address: Annotated[str | None, typer.Option("--dask-address", help="Existing Dask scheduler (default: one LocalCluster for the backfill).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with the same nesting as the config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set train.epochs=20 (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of date, status, run_uri, message.")] = False,
) -> None:
    """Run APP once per date from --start to --end, filling {date} in --input-template.

    Dates that already have a complete run for the same input and config are
    skipped (unless --force), so running the same backfill again redoes only
    the dates that failed. Exit code 1 when any date failed.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.backfill import date_options, exit_code, explicit_overrides, run_in_process, run_via_deployment
    from tasks.apps import get_app
    from tasks.config import resolve_config
    from tasks.schedule import date_range, has_template, parse_date

    try:
        application = get_app(app_name)
        dates = date_range(parse_date(start), parse_date(end), every)
        if input_template is None and not via_deployment:
            raise typer.BadParameter("--input-template is required (unless --via-deployment)", param_hint="--input-template")
        if input_template is not None and not has_template(input_template):
            raise typer.BadParameter(
                f"{input_template!r} has no date field such as {{date}}: every date would read the same data",
                param_hint="--input-template",
            )
        options: dict[str, Any] = {"output": output, "load.label_column": label_column, "load.id_column": id_column,
                                   "dask_address": dask_address}
        if input_template is not None:
            options.update(date_options(input_template, model))
        elif model:
            options["model_run"] = model
        cfg = resolve_config(application.RunConfig, file=config, options=options, sets=set_)
    except AeflowError as e:
        _fail(e)

    _quiet_prefect(True)
    _hide_user_error_tracebacks()
    progress = Progress(
        TextColumn(f"[bold]{app_name} backfill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"), console=err, transient=False, disable=as_json,
    )
    with progress:
        bar = progress.add_task("dates", total=len(dates), last="")

        def done(o: Any) -> None:
            progress.update(bar, advance=1, last=f"{o.date}: {o.status}")

        try:
            if via_deployment:
                overrides = explicit_overrides(config, options, set_)  # validated above as `cfg`
                outcomes = run_via_deployment(via_deployment, dates, overrides, app_name=app_name, force=force,
                                              wait=wait, on_done=done)
            else:
                outcomes = run_in_process(app_name, dates, cfg, parallel=parallel, force=force, on_done=done)
        except AeflowError as e:
            _fail(e)
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
                detail = f"{o.flow_run_name}  {o.run_uri}"
            table.add_row(str(o.date), f"[{c}]{o.status}[/]", detail)
        out.print(table)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    code = exit_code(outcomes)
    if code:
        err.print("[bold red]some dates failed[/]; run the same command again to redo only those", highlight=False)
    raise typer.Exit(code)


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    app()


if __name__ == "__main__":
    main()
