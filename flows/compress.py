"""The compress flow: inspect images -> fit (or load --model) -> apply -> evaluate -> report -> manifest.

A small image pipeline of its own (issue 5 landed before the shared image
pipeline of issue 4): images are listed and decoded once at the door, in the
flow process. When ``run_image_app`` lands, this body is the place to switch to
it; the application's methods (``tasks/apps/compress.py``) stay as they are.
A failure anywhere discards the run: no manifest, nothing half-written.
"""

# No ``from __future__ import annotations``: Prefect reads the flow's parameter types at runtime.

import datetime as dt
from datetime import UTC, datetime
from typing import Any

from prefect import flow

from flows.pipeline import RunResult, _flow_run_name, _logger, _publish, _stage
from tasks.apps.compress import (
    APP,
    CompressContext,
    CompressRunConfig,
    apply_task,
    evaluate_task,
    fit_task,
    inspect_images,
    report_task,
)
from tasks.errors import ConfigError
from tasks.storage import ArtifactStore


def run_compress_app(config: CompressRunConfig) -> RunResult:
    """Run the compress application end to end (the body of the ``compress`` flow)."""
    log = _logger()
    timings: dict[str, float] = {}
    created = datetime.now(UTC)
    load = config.load
    store = ArtifactStore(config.output)
    cache: dict[str, Any] = {}

    with _stage(timings, "inspect"):
        fitted = None
        train_src = None
        if config.model_run:
            fitted = APP.load(config.model_run)
            target_uri = load.apply_to or load.input
            if not target_uri:
                raise ConfigError("--model needs images to apply it to: pass --apply-to (or --input)")
        else:
            if not load.input:
                raise ConfigError("--input is required (or --model RUN to reuse a trained codec)")
            train_src = inspect_images(load.input, "input", cache)
            target_uri = load.apply_to or load.input
        target_src = train_src if train_src is not None and target_uri == load.input else inspect_images(
            target_uri, "apply-to" if load.apply_to else "input", cache)
        if fitted is not None:
            APP.quality(config, fitted)  # a bad --quality fails before any work
        store.check_writable()

    hashes: dict[str, Any] = {"apply_to": [f.hash for f in target_src.files]}
    if train_src:
        hashes["input"] = [f.hash for f in train_src.files]
    if fitted is not None:
        hashes["model_run"] = config.model_run
    fingerprint = config.fingerprint(hashes)
    if config.skip_existing:
        done = store.find_complete(APP.name, fingerprint)
        if done is not None:
            log.info("skipping: %s already has a complete run with the same input and config", done.run_uri)
            return RunResult.from_manifest(done, skipped=True)

    run = store.start_run(APP.name, fingerprint, config.model_dump(mode="json"), config.run_id)
    log.info("compress run %s -> %s", run.run_id, run.uri)
    try:
        ctx = CompressContext(config=config, run=run, train=train_src, target=target_src, images=cache)
        if fitted is None:
            with _stage(timings, "train"):
                fitted = fit_task(ctx)
        else:
            APP.save(run, fitted.codec, None)  # the run is self-contained: its files decode with its own model
        with _stage(timings, "apply"):
            outputs, per_image = apply_task(ctx, fitted)
        with _stage(timings, "evaluate"):
            evaluation, rd = evaluate_task(ctx, fitted, per_image)
        with _stage(timings, "report"):
            outputs.update(report_task(ctx, fitted, rd))
        inputs = {}
        if train_src is not None:
            inputs["input"] = list(train_src.files)
        if target_src is not None and target_src is not train_src:
            inputs["apply_to"] = list(target_src.files)
        result = _publish(APP.name, run, config, created, fingerprint, inputs, fitted, outputs, evaluation, timings, "cpu")
    except BaseException:
        run.discard()
        raise
    return result


@flow(name="compress", flow_run_name=_flow_run_name("compress"), validate_parameters=True,
      description="Learned image codec: real .aec bitstreams, decoded PNGs, RD curves and BD-rate vs JPEG/WebP.")
def compress_flow(
    config: CompressRunConfig = CompressRunConfig(), date: dt.date | None = None, timezone: str = "UTC"
) -> RunResult:
    """Train (or reuse --model) a learned codec and compress every image; metrics vs JPEG and WebP.

    ``date``/``timezone`` fill {date}-style templates in the config, as for every application flow.
    """
    from tasks.schedule import prepare_config

    config, _day = prepare_config(config, date, timezone)
    return run_compress_app(config)
