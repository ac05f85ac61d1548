"""The compress flow: inspect images -> load (Dask) -> fit (or load --model) -> apply -> evaluate -> report -> manifest.

The stages of every image application (``run_image_app``): files are listed and
hashed at the door, decoded in parallel on the Dask client by the shared loader
(:func:`tasks.images.load_images`, modes kept, transparency refused) into shards
of the run directory; then the codec's own fit/apply/evaluate/report
(``tasks/apps/compress.py``). A failure anywhere discards the run: no manifest,
nothing half-written.
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
    report_task,
)
from tasks.apps.images_base import load_images_task
from tasks.errors import ConfigError
from tasks.images import ImageSource, inspect_images
from tasks.preprocess import dask_client
from tasks.storage import ArtifactStore


def run_compress_app(config: CompressRunConfig) -> RunResult:
    """Run the compress application end to end (the body of the ``compress`` flow)."""
    log = _logger()
    timings: dict[str, float] = {}
    created = datetime.now(UTC)
    load = config.load
    store = ArtifactStore(config.output)

    with _stage(timings, "inspect"):
        fitted = None
        srcs: dict[str, ImageSource] = {}
        if config.model_run:
            fitted = APP.load(config.model_run)
            if not (load.apply_to or load.input):
                raise ConfigError("--model needs images to apply it to: pass --apply-to (or --input)")
            srcs["apply_to"] = inspect_images(load.apply_to or load.input, "apply-to" if load.apply_to else "input",
                                              skip_bad=load.skip_bad)
            APP.quality(config, fitted)  # a bad --quality fails before any work
        else:
            if not load.input:
                raise ConfigError("--input is required (or --model RUN to reuse a trained codec)")
            srcs["input"] = inspect_images(load.input, "input", skip_bad=load.skip_bad)
            if load.apply_to:
                srcs["apply_to"] = inspect_images(load.apply_to, "apply-to", skip_bad=load.skip_bad)
        store.check_writable()

    hashes: dict[str, Any] = {role: [f.hash for f in src.files] for role, src in srcs.items()}
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
        with dask_client(config.dask_address), _stage(timings, "load"):
            sets = {role: load_images_task(src, load, run, f"images/{role}") for role, src in srcs.items()}
        ctx = CompressContext(config=config, run=run, train=sets.get("input"),
                              target=sets.get("apply_to") or sets["input"])
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
        skipped = [s for imset in sets.values() for s in imset.skipped]
        extra = {"images": {role: len(imset) for role, imset in sets.items()}, "skipped": skipped}
        result = _publish(APP.name, run, config, created, fingerprint,
                          {role: list(src.files) for role, src in srcs.items()}, fitted, outputs, evaluation,
                          timings, "cpu", extra)
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
