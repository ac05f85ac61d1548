"""The one pipeline every application runs, as a Prefect flow per application.

inspect (the data kind: files, hashes, schema) -> load/preprocess (Dask: validate,
split, encode, scale into partitions; or decode images into shards) -> fit (train, or
load ``--model``) -> apply -> evaluate (with baselines) -> report -> manifest (last).
A failure anywhere discards the run's outputs: no manifest, nothing half-written,
other runs untouched.
"""

import datetime as dt
import importlib
import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from tasks.apps import (
    Evaluation,
    apply_task,
    evaluate_task,
    fit_started,
    fit_task,
    forget_fit_started,
    get_app,
    load_all,
    report_task,
)
from tasks.config import RunConfig
from tasks.dask_client import dask_client, local_processes
from tasks.errors import AeflowError
from tasks.execution import execution_info
from tasks.prefect_utils import report_slot_wait
from tasks.redaction import install_log_redaction, redact
from tasks.report import (
    markdown_summary,
    metrics_rows,
    publish_artifacts,
    publish_run_link,
)
from tasks.storage import CHECKPOINT_DIR, ArtifactStore, Manifest, RunDir, storage_error

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
    notes: list[str] = Field(default_factory=list)  # what the metrics were measured on, samples, caveats

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
            notes=list(m.extra.get("notes") or []),
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


def unused_with_model(config: RunConfig, defaults: RunConfig, fit_only: Iterable[str]) -> list[str]:
    """The settings of ``config`` named in ``fit_only`` (``Application.fit_only``: sections or ``section.key``)
    that differ from the application's ``defaults``: with ``--model`` they do nothing (``model.latent_dim=7``,
    ``train.epochs=50``, detect's ``app.contamination=0.3``), which the run says."""
    out = []
    for path in fit_only:
        given, default = config, defaults
        for key in path.split("."):
            given, default = getattr(given, key), getattr(default, key)
        if isinstance(default, BaseModel):
            d = default.model_dump()
            out += [f"{path}.{k}={v}" for k, v in given.model_dump().items() if v != d.get(k)]
        elif given != default:
            out.append(f"{path}={given}")
    return out


def run_app(config: RunConfig) -> RunResult:
    """Run one application end to end: the body of every application's flow.

    inspect (the data kind looks at every input; ``--model`` is loaded and checked) ->
    load/preprocess (Dask) -> fit (or the reused model) -> apply -> evaluate -> report ->
    manifest (last). A failure anywhere discards the run: no manifest, nothing half-written,
    other runs untouched; a checkpoint stays so that the same command resumes training.
    """
    install_log_redaction()  # deployment runs too: no secret reaches Prefect's logs
    app = get_app(config.app_name)
    kind = app.data
    log = _logger()
    timings: dict[str, float] = {}
    created = datetime.now(UTC)
    device = app.device_for(config)
    store = ArtifactStore(config.output)

    with _stage(timings, "inspect"):
        fitted = app.load(config.model_run, device) if config.model_run else None
        config = app.adopt(config, fitted)
        if fitted is not None:
            app.check_fitted(config, fitted)
        inputs = kind.inspect(app, config, fitted)
        store.check_writable()

    hashes: dict[str, Any] = kind.hashes(inputs)
    if fitted is not None:
        hashes["model_run"] = config.model_run
    fingerprint = config.fingerprint(hashes)
    if config.skip_existing:
        done = store.find_complete(app.name, fingerprint)
        if done is not None:
            log.info("skipping: %s already has a complete run with the same input and config", done.run_uri)
            _remove_superseded(store, app.name, fingerprint, done.run_uri)
            publish_run_link(app.name, done.run_uri)
            return RunResult.from_manifest(done, skipped=True)

    run = store.start_run(app.name, fingerprint, config.model_dump(mode="json"), config.run_id)
    try:  # from the claim on: Ctrl-C or an error anywhere gives the run back (below), as start_run does until here
        log.info("%s run %s -> %s", app.name, run.run_id, run.uri)
        created, resumed_notes = _first_attempt(run, created)
        # One Dask client for the whole run: loading/preprocessing and apply run on its workers.
        input_bytes = sum(f.size for files in kind.records(inputs).values() for f in files)
        processes = local_processes(config.local_cluster, input_bytes)
        with dask_client(config.dask_address, processes=processes):
            with _stage(timings, kind.load_stage):
                ctx = kind.load(app, config, run, inputs, fitted, device)
            if config.model_run:
                unused = unused_with_model(config, app.RunConfig(), app.fit_only)
                if unused:
                    note = (f"settings for training a model do not apply with --model (its model was used as saved): "
                            f"{', '.join(unused)}")
                    log.warning("%s", note)
                    ctx.notes.append(note)
            app.check_data(ctx)
            if fitted is None:
                with _stage(timings, "train"), report_slot_wait("training", fit_started(run.run_id), log):
                    try:
                        fitted = fit_task(app, ctx)
                    finally:
                        forget_fit_started(run.run_id)
            elif app.self_contained:
                app.save(run, fitted)
            with _stage(timings, "apply"):
                outputs = apply_task(app, ctx, fitted)
            with _stage(timings, "evaluate"):
                evaluation: Evaluation = evaluate_task(app, ctx, fitted)
            evaluation.notes.extend(ctx.notes)
            train = fitted.train
            if resumed_notes and train is not None and train.resumed:
                resumed_notes.append(
                    f"training went on from the checkpoint after epoch {train.resumed_from_epoch}"
                    + (f", step {train.resumed_from_step} of epoch {train.resumed_from_epoch + 1}"
                       if train.resumed_from_step else "")
                    + f"; its time ({train.seconds:.1f} s) and samples/s are this attempt's")
            evaluation.notes.extend(resumed_notes)
            with _stage(timings, "report"):
                outputs.update(report_task(app, ctx, fitted, evaluation))
        result = _publish(app.name, run, config, created, fingerprint, kind.records(inputs), fitted, outputs,
                          evaluation, timings, device, kind.manifest_extra(ctx), "processes" if processes else "threads")
    except BaseException as e:
        if not isinstance(e, Exception):  # Ctrl-C, SIGTERM: the CLI names the run that the same command resumes
            with suppress(Exception):
                e.aeflow_run_uri = run.uri  # type: ignore[attr-defined]
        # A checkpoint is worth keeping for what may not recur (Ctrl-C, a crash, an outage); bad input or a bad
        # setting found after training recurs with the same command, and fixing it changes the fingerprint, so
        # its checkpoint would never be resumed: it was left listed as "interrupted" for ever.
        run.discard(keep_checkpoint=not (isinstance(e, AeflowError) and not e.transient and e.exit_code in (2, 3, 5)))
        store.remove_created_if_empty()
        if not isinstance(e, Exception):  # whether anything is left to resume: without a checkpoint, nothing is
            with suppress(Exception):
                e.aeflow_run_kept = run.exists(f"{CHECKPOINT_DIR}/meta.json")  # type: ignore[attr-defined]
        # An outage that surfaced outside the storage layer's own mapping is still one line (exit 4).
        mapped = storage_error(e, f"finish the {next(reversed(timings), 'load')} stage of", run.uri) \
            if isinstance(e, Exception) else None
        if mapped is not None:
            raise mapped from None
        raise
    return result


def _remove_superseded(store: ArtifactStore, app_name: str, fingerprint: str, done_uri: str) -> None:
    """Remove the interrupted runs of ``fingerprint`` that nobody works on, now that ``done_uri`` completed it.

    Nothing would resume them: ``--skip-existing`` and backfills skip to the complete run (one run of two
    overlapping backfills was interrupted, the other completed the date), and ``runs list --incomplete``
    listed them as "resumed by the same command" for ever, their checkpoints kept. Best effort.
    """
    log = _logger()
    seen: set[str] = set()
    try:
        while (run := store.find_incomplete(app_name, fingerprint)) is not None and run.run_id not in seen:
            seen.add(run.run_id)
            if not run.claim():
                continue  # taken up meanwhile
            if run.is_complete:  # finished between our look and our claim
                run.release()
                continue
            log.info("removing %s: an interrupted run of the same input and config, which %s completed", run.uri,
                     done_uri)
            run.discard(keep_checkpoint=False)
    except Exception as e:  # noqa: BLE001 - an outage: the skip stands, the leftover stays listed
        log.warning("could not remove the interrupted runs that %s supersedes: %s", done_uri, e)


def _first_attempt(run: RunDir, started: datetime) -> tuple[datetime, list[str]]:
    """When ``run`` is an interrupted run taken up again: when its first attempt started (the manifest's
    ``created``) and a note saying so; else ``started`` and no note."""
    from tasks.storage import RUN_MARKER

    try:
        first = datetime.fromisoformat(run.read_json(RUN_MARKER)["created"])
    except Exception:  # noqa: BLE001 - an older or unreadable marker: nothing to say
        return started, []
    if first >= started:  # the marker this attempt wrote
        return started, []
    note = (f"resumed: this run was started at {first:%Y-%m-%d %H:%M:%S} UTC and interrupted; this attempt "
            f"began at {started:%H:%M:%S} and took it up in the same folder")
    return first, [note]


def _publish(app_name, run: RunDir, config: RunConfig, created, fingerprint, inputs: dict[str, list[Any]], fitted,
             outputs: dict[str, str], evaluation: Evaluation, timings: dict[str, float], device,
             extra: dict[str, Any] | None = None, local_cluster: str | None = None) -> RunResult:
    """Summary, Prefect artifacts, then the manifest (last)."""
    uris = {name: run.uri_of(rel) for name, rel in outputs.items()}
    rows = metrics_rows(evaluation.metrics, evaluation.baselines)
    summary = markdown_summary(app_name, run.uri, evaluation.metrics, evaluation.baselines, uris, evaluation.notes, timings,
                               compared=evaluation.compared)
    run.write_bytes("report/summary.md", summary.encode())
    outputs["summary"] = "report/summary.md"
    uris["summary"] = run.uri_of("report/summary.md")
    publish_artifacts(app_name, run.uri, rows, summary)
    publish_run_link(app_name, run.uri)
    flow_ctx = FlowRunContext.get()
    extra = {"named_outputs": outputs, "notes": evaluation.notes, **(extra or {})}
    if fitted.train is not None:
        extra["train"] = {k: v for k, v in fitted.train.to_dict().items() if k != "history"}
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        extra["prefect"] = {"flow_run_id": str(flow_ctx.flow_run.id), "flow_run_name": flow_ctx.flow_run.name}
    extra["execution"] = execution_info(config, fitted.train.device if fitted.train else device, local_cluster)
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
        notes=list(evaluation.notes),
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
        return redact("-".join(parts))

    return name


FLOW_ARGS_DOC = """

Args:
    config: The run's configuration. URIs may hold date templates such as {date} or {yesterday}.
    date: Run date (YYYY-MM-DD) filling the templates; empty = the scheduled start time's date.
    timezone: IANA time zone in which the scheduled start time is read as a date.
"""


def make_flow(app_name: str) -> Any:
    """The Prefect flow of one application; its parameter is the app's RunConfig."""
    app = get_app(app_name)
    config_cls = app.RunConfig

    def body(
        config: config_cls = config_cls(),  # type: ignore[valid-type]
        date: dt.date | None = None,
        timezone: str = "UTC",
    ) -> RunResult:
        # ``date`` fills {date}-style templates in the config (default: the scheduled start's date in
        # ``timezone``); see tasks/schedule.py. ``model_run: latest`` picks the newest trained model.
        from tasks.schedule import prepare_config

        config, _day = prepare_config(config, date, timezone)
        return run_app(config)

    doc = (importlib.import_module(type(app).__module__).__doc__ or app_name).strip()
    body.__doc__ = doc + FLOW_ARGS_DOC
    body.__name__ = app_name
    return flow(
        name=app_name,
        flow_run_name=_flow_run_name(app_name),
        validate_parameters=True,
        description=doc.split("\n")[0],
    )(body)


class _Flows(Mapping[str, Any]):
    """One flow per registered application, named after it, built on first use (so an application
    registered after this module was imported has its flow too)."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            if name not in load_all():
                raise KeyError(name)
            self._built[name] = make_flow(name)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(load_all())

    def __len__(self) -> int:
        return len(load_all())


FLOWS: Mapping[str, Any] = _Flows()
