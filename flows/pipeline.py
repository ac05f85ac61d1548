"""The one pipeline every tabular application runs, as a Prefect flow per application.

inspect (files, schema) -> preprocess (Dask: validate, split, encode, stats,
partitions) -> fit (train, or load ``--model``) -> apply -> evaluate (with
baselines) -> report -> manifest (last). A failure anywhere discards the run's
outputs: no manifest, nothing half-written, other runs untouched.
"""

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
from tasks.load import inspect_input
from tasks.preprocess import dask_client, prepare_task
from tasks.report import markdown_summary, metrics_rows, publish_artifacts
from tasks.storage import ArtifactStore, Manifest, RunDir, open_run

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
            train_prep = prepare_task(train_src, config.preprocess, run, "preprocessed") if train_src else None
            stats = fitted.stats if fitted is not None else train_prep.stats
            target_prep = (
                prepare_task(target_src, config.preprocess, run, "preprocessed-apply", stats, False)
                if target_src
                else train_prep
            )
        schema = fitted.schema if fitted is not None else train_src.schema
        ctx = TableContext(config=config, run=run, schema=schema, train=train_prep, target=target_prep, device=device)

        if fitted is None:
            with _stage(timings, "train"):
                fitted = fit_task(app, ctx)
        with _stage(timings, "apply"):
            outputs = apply_task(app, ctx, fitted)
        with _stage(timings, "evaluate"):
            evaluation: Evaluation = evaluate_task(app, ctx, fitted)
        with _stage(timings, "report"):
            outputs.update(report_task(app, ctx, fitted, evaluation))
        result = _publish(app.name, run, config, created, fingerprint, train_src, target_src, fitted,
                          outputs, evaluation, timings, device)
    except BaseException:
        run.discard()
        raise
    return result


def _publish(app_name, run: RunDir, config: RunConfig, created, fingerprint, train_src, target_src, fitted,
             outputs: dict[str, str], evaluation: Evaluation, timings: dict[str, float], device) -> RunResult:
    uris = {name: run.uri_of(rel) for name, rel in outputs.items()}
    rows = metrics_rows(evaluation.metrics, evaluation.baselines)
    summary = markdown_summary(app_name, run.uri, evaluation.metrics, evaluation.baselines, uris, evaluation.notes, timings)
    run.write_bytes("report/summary.md", summary.encode())
    outputs["summary"] = "report/summary.md"
    uris["summary"] = run.uri_of("report/summary.md")
    publish_artifacts(app_name, run.uri, rows, summary)
    flow_ctx = FlowRunContext.get()
    extra: dict[str, Any] = {"named_outputs": outputs, "notes": evaluation.notes}
    if fitted.train is not None:
        extra["train"] = {k: v for k, v in fitted.train.to_dict().items() if k != "history"}
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        extra["prefect"] = {"flow_run_id": str(flow_ctx.flow_run.id), "flow_run_name": flow_ctx.flow_run.name}
    inputs = {}
    if train_src:
        inputs["input"] = list(train_src.files)
    if target_src:
        inputs["apply_to"] = list(target_src.files)
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
    """Run names people can read in the UI: app, input file and start time."""

    def name() -> str:
        from prefect.runtime import flow_run

        cfg = flow_run.parameters.get("config") or {}
        if isinstance(cfg, BaseModel):
            cfg = cfg.model_dump()
        load = cfg.get("load") or {}
        src = load.get("apply_to") or load.get("input") or ""
        tail = src.rstrip("/").rsplit("/", 1)[-1][:40]
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return f"{app}-{tail}-{stamp}" if tail else f"{app}-{stamp}"

    return name


def make_table_flow(app_name: str) -> Any:
    """The Prefect flow of one tabular application; its parameter is the app's RunConfig."""
    app = get_app(app_name)
    config_cls = app.RunConfig

    def body(config: config_cls = config_cls()) -> RunResult:  # type: ignore[valid-type]
        return run_table_app(config)

    doc = (importlib.import_module(type(app).__module__).__doc__ or app_name).strip()
    body.__doc__ = doc
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
