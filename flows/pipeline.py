"""The one pipeline every tabular application runs, as a Prefect flow per application.

inspect (files, schema) -> preprocess (Dask: validate, split, encode, stats,
partitions) -> fit (train, or load ``--model``) -> apply -> evaluate (with
baselines) -> report -> manifest (last). A failure anywhere discards the run's
outputs: no manifest, nothing half-written, other runs untouched.
"""

import datetime as dt
import importlib
import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from tasks.apps import (
    Evaluation,
    TableContext,
    apply_task,
    device_for,
    evaluate_task,
    fit_task,
    get_app,
    load_all,
    report_task,
)
from tasks.config import RunConfig
from tasks.errors import ConfigError
from tasks.execution import execution_info
from tasks.load import inspect_input, with_schema
from tasks.preprocess import categories_task, dask_client, prepare_task
from tasks.report import markdown_summary, metrics_rows, publish_artifacts
from tasks.storage import ArtifactStore, Manifest, RunDir, open_model_source, open_run

VERSIONED = ("aeflow", "torch", "prefect", "dask", "distributed", "pandas", "numpy", "scikit-learn", "pandera", "s3fs", "pyarrow")


class RunResult(BaseModel):
    """What a flow returns and ``--json`` prints."""

    app: str
    run_id: str
    run_uri: str
    skipped: bool = False
    outputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    baselines: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_manifest(cls, m: Manifest, skipped: bool = False) -> "RunResult":
        outputs = {o.path: m.output_uri(o.path) for o in m.outputs}
        named = m.extra.get("named_outputs", {})
        return cls(
            app=m.app,
            run_id=m.run_id,
            run_uri=m.run_uri,
            skipped=skipped,
            outputs={k: m.output_uri(v) for k, v in named.items()} or outputs,
            metrics=m.metrics,
            baselines=m.baselines,
            timings=m.timings,
        )


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("aeflow")


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 4)


def run_table_app(config: RunConfig) -> RunResult:
    """Run one tabular application end to end (the body of every tabular flow)."""
    app = get_app(config.app_name)
    log = _logger()
    timings: dict[str, float] = {}
    created = datetime.now(UTC)
    device = device_for(config)
    load = config.load
    store = ArtifactStore(config.output)

    with _stage(timings, "inspect"):
        fitted = None
        train_src = target_src = None
        if config.model_run:
            model_dir = open_run(config.model_run)
            fitted = app.load(model_dir, device)
            target_uri = load.apply_to or load.input
            if not target_uri:
                raise ConfigError("--model needs data to apply it to: pass --apply-to (or --input)")
            if load.apply_to and load.input:
                log.warning("--model given: --input %s is not used for training; applying to %s", load.input, load.apply_to)
            target_src = inspect_input(target_uri, load, app.allow_nulls, fitted.schema, "apply-to")
        else:
            if not load.input:
                raise ConfigError("--input is required (or --model RUN to reuse a trained model)")
            train_src = inspect_input(load.input, load, app.allow_nulls, None, "input")
            if load.apply_to:
                target_src = inspect_input(load.apply_to, load, app.allow_nulls, train_src.schema, "apply-to")
        store.check_writable()

    hashes: dict[str, Any] = {}
    if train_src:
        hashes["input"] = [f.hash for f in train_src.files]
    if target_src:
        hashes["apply_to"] = [f.hash for f in target_src.files]
    if fitted is not None:
        hashes["model_run"] = config.model_run
    fingerprint = config.fingerprint(hashes)

    if config.skip_existing:
        done = store.find_complete(app.name, fingerprint)
        if done is not None:
            log.info("skipping: %s already has a complete run with the same input and config", done.run_uri)
            return RunResult.from_manifest(done, skipped=True)

    run = store.start_run(app.name, fingerprint, config.model_dump(mode="json"), config.run_id)
    log.info("%s run %s -> %s", app.name, run.run_id, run.uri)
    try:
        with dask_client(config.dask_address), _stage(timings, "preprocess"):
            if train_src:
                # Categories come from the whole training input; data applied to in the same run shares them.
                train_src = categories_task(train_src, config.preprocess)
                if target_src:
                    target_src = with_schema(target_src, train_src.schema)
            train_prep = prepare_task(train_src, config.preprocess, run, "preprocessed") if train_src else None
            stats = fitted.stats if fitted is not None else train_prep.stats
            target_prep = (
                prepare_task(target_src, config.preprocess, run, "preprocessed-apply", stats, False)
                if target_src
                else train_prep
            )
        schema = fitted.schema if fitted is not None else train_src.schema
        warnings = target_prep.unseen_warnings if target_prep is not train_prep else []
        for w in warnings:
            log.warning("%s", w)
        ctx = TableContext(config=config, run=run, schema=schema, train=train_prep, target=target_prep, device=device,
                           source=target_src or train_src)

        if fitted is None:
            with _stage(timings, "train"):
                fitted = fit_task(app, ctx)
        with _stage(timings, "apply"):
            outputs = apply_task(app, ctx, fitted)
        with _stage(timings, "evaluate"):
            evaluation: Evaluation = evaluate_task(app, ctx, fitted)
        evaluation.notes.extend(f"warning: {w}" for w in warnings)
        with _stage(timings, "report"):
            outputs.update(report_task(app, ctx, fitted, evaluation))
        inputs = {role: list(src.files) for role, src in (("input", train_src), ("apply_to", target_src)) if src}
        result = _publish(app.name, run, config, created, fingerprint, inputs, fitted, outputs, evaluation, timings, device)
    except BaseException:
        run.discard()
        raise
    return result


def run_image_app(config: RunConfig) -> RunResult:
    """Run one image application end to end (the body of every image flow).

    inspect (list and hash files) -> load (Dask: decode, validate, shard) -> fit
    (or ``--model``) -> apply -> evaluate -> report -> manifest; a failure anywhere
    discards the run.
    """
    from tasks.apps.images_base import ImageContext, load_images_task
    from tasks.images import inspect_images

    app = get_app(config.app_name)
    log = _logger()
    timings: dict[str, float] = {}
    created = datetime.now(UTC)
    device = device_for(config)
    load = config.load
    store = ArtifactStore(config.output)

    with _stage(timings, "inspect"):
        fitted = None
        srcs: dict[str, Any] = {}
        if config.model_run:
            fitted = app.load(open_model_source(config.model_run), device)
            if not (load.apply_to or load.input):
                raise ConfigError("--model needs images to apply it to: pass --apply-to (or --input)")
            srcs["apply_to"] = inspect_images(load.apply_to or load.input, "apply-to", skip_bad=load.skip_bad)
        else:
            if not load.input:
                raise ConfigError("--input is required (or --model RUN to reuse a trained model)")
            srcs["input"] = inspect_images(load.input, "input", skip_bad=load.skip_bad)
            if load.apply_to:
                srcs["apply_to"] = inspect_images(load.apply_to, "apply-to", skip_bad=load.skip_bad)
        if load.reference:
            if "apply_to" not in srcs:
                raise ConfigError("a clean reference needs the noisy images it belongs to: pass --apply-to")
            srcs["reference"] = inspect_images(load.reference, "reference", skip_bad=load.skip_bad)
        store.check_writable()

    hashes: dict[str, Any] = {role: [f.hash for f in src.files] for role, src in srcs.items()}
    if fitted is not None:
        hashes["model_run"] = config.model_run
    fingerprint = config.fingerprint(hashes)
    if config.skip_existing:
        done = store.find_complete(app.name, fingerprint)
        if done is not None:
            log.info("skipping: %s already has a complete run with the same input and config", done.run_uri)
            return RunResult.from_manifest(done, skipped=True)

    run = store.start_run(app.name, fingerprint, config.model_dump(mode="json"), config.run_id)
    log.info("%s run %s -> %s", app.name, run.run_id, run.uri)
    try:
        with dask_client(config.dask_address), _stage(timings, "load"):
            sets = {role: load_images_task(src, load, run, f"images/{role}") for role, src in srcs.items()}
        for role, imset in sets.items():
            app.check_sizes(config, imset, role.replace("_", "-"))
        ctx = ImageContext(config=config, run=run, train=sets.get("input"), target=sets.get("apply_to"),
                           reference=sets.get("reference"), device=device)
        if fitted is None:
            with _stage(timings, "train"):
                fitted = fit_task(app, ctx)
        with _stage(timings, "apply"):
            outputs = apply_task(app, ctx, fitted)
        with _stage(timings, "evaluate"):
            evaluation: Evaluation = evaluate_task(app, ctx, fitted)
        with _stage(timings, "report"):
            outputs.update(report_task(app, ctx, fitted, evaluation))
        skipped = [s for imset in sets.values() for s in imset.skipped]
        extra = {"images": {role: len(imset) for role, imset in sets.items()}, "skipped": skipped}
        result = _publish(app.name, run, config, created, fingerprint,
                          {role: list(src.files) for role, src in srcs.items()}, fitted, outputs, evaluation,
                          timings, device, extra)
    except BaseException:
        run.discard()
        raise
    return result


def _publish(app_name, run: RunDir, config: RunConfig, created, fingerprint, inputs: dict[str, list[Any]], fitted,
             outputs: dict[str, str], evaluation: Evaluation, timings: dict[str, float], device,
             extra: dict[str, Any] | None = None) -> RunResult:
    """Summary, Prefect artifacts, then the manifest (last). Shared by every kind of application."""
    uris = {name: run.uri_of(rel) for name, rel in outputs.items()}
    rows = metrics_rows(evaluation.metrics, evaluation.baselines)
    summary = markdown_summary(app_name, run.uri, evaluation.metrics, evaluation.baselines, uris, evaluation.notes, timings)
    run.write_bytes("report/summary.md", summary.encode())
    outputs["summary"] = "report/summary.md"
    uris["summary"] = run.uri_of("report/summary.md")
    publish_artifacts(app_name, run.uri, rows, summary)
    flow_ctx = FlowRunContext.get()
    extra = {"named_outputs": outputs, "notes": evaluation.notes, **(extra or {})}
    if fitted.train is not None:
        extra["train"] = {k: v for k, v in fitted.train.to_dict().items() if k != "history"}
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        extra["prefect"] = {"flow_run_id": str(flow_ctx.flow_run.id), "flow_run_name": flow_ctx.flow_run.name}
    extra["execution"] = execution_info(config, fitted.train.device if fitted.train else device)
    manifest = Manifest(
        app=app_name,
        run_id=run.run_id,
        run_uri=run.uri,
        created=created,
        finished=datetime.now(UTC),
        fingerprint=fingerprint,
        inputs=inputs,
        model_run=fitted.source_run,
        config=config.model_dump(mode="json"),
        versions=package_versions(),
        device=fitted.train.device if fitted.train else str(device),
        timings=timings,
        metrics=evaluation.metrics,
        baselines=evaluation.baselines,
        outputs=run.output_records(),
        extra=extra,
    )
    run.write_manifest(manifest)
    return RunResult(
        app=app_name,
        run_id=run.run_id,
        run_uri=run.uri,
        outputs=uris,
        metrics=evaluation.metrics,
        baselines=evaluation.baselines,
        timings=timings,
    )


def _flow_run_name(app: str) -> Callable[[], str]:
    """Run names people can read in the UI: app, run date (scheduled/backfill), input file, start time."""

    def name() -> str:
        from prefect.runtime import flow_run

        from tasks.schedule import has_template, render, run_date

        params = flow_run.parameters
        cfg = params.get("config") or {}
        if isinstance(cfg, BaseModel):
            cfg = cfg.model_dump()
        load = cfg.get("load") or {}
        src = load.get("apply_to") or load.get("input") or ""
        day = None
        if params.get("date") or has_template(src):
            try:
                day = run_date(params.get("date"), params.get("timezone") or "UTC")
                src = render(src, day)
            except Exception:  # a bad date fails the run itself, with its message; never the name
                day = None
        parts_ = [p for p in src.rstrip("/").split("/") if p]
        # the file, or for a glob like data/2026-11-02/*.csv the folder that names the partition
        tail = next((p for p in reversed(parts_) if not any(c in p for c in "*?[")), "")[:40]
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        parts = [app] + ([day.isoformat()] if day else []) + ([tail] if tail else []) + [stamp]
        return "-".join(parts)

    return name


FLOW_ARGS_DOC = """

Args:
    config: The run's configuration. URIs may hold date templates such as {date} or {yesterday}.
    date: Run date (YYYY-MM-DD) filling the templates; empty = the scheduled start time's date.
    timezone: IANA time zone in which the scheduled start time is read as a date.
"""


def make_table_flow(app_name: str) -> Any:
    """The Prefect flow of one application; its parameter is the app's RunConfig.

    Dispatches on the application's kind: tabular apps run :func:`run_table_app`,
    image apps (``kind = "image"``) :func:`run_image_app`.
    """
    app = get_app(app_name)
    config_cls = app.RunConfig
    runner = run_image_app if getattr(app, "kind", "table") == "image" else run_table_app

    def body(
        config: config_cls = config_cls(),  # type: ignore[valid-type]
        date: dt.date | None = None,
        timezone: str = "UTC",
    ) -> RunResult:
        # ``date`` fills {date}-style templates in the config (default: the scheduled start's date in
        # ``timezone``); see tasks/schedule.py. ``model_run: latest`` picks the newest trained model.
        from tasks.schedule import prepare_config

        config, _day = prepare_config(config, date, timezone)
        return runner(config)

    doc = (importlib.import_module(type(app).__module__).__doc__ or app_name).strip()
    body.__doc__ = doc + FLOW_ARGS_DOC
    body.__name__ = app_name
    return flow(
        name=app_name,
        flow_run_name=_flow_run_name(app_name),
        validate_parameters=True,
        description=doc.split("\n")[0],
    )(body)


FLOWS: dict[str, Any] = {name: make_table_flow(name) for name in load_all()}


def _add_image_flows() -> None:
    """Applications with their own flow (not the tabular pipeline): compress."""
    from flows.compress import compress_flow

    FLOWS["compress"] = compress_flow


_add_image_flows()
