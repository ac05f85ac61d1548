"""Deployable flows: every application flow, plus a train-then-apply pipeline per application.

This module is what ``prefect.yaml`` entrypoints point at
(``flows/orchestration.py:reduce``, ``flows/orchestration.py:reduce_train_apply``).
Its attributes are generated from the registry (``flows.pipeline.FLOWS``), so an
application added to the registry is deployable without touching this file.
"""


import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.pipeline import FLOW_ARGS_DOC, FLOWS, RunResult
from tasks.schedule import prepare_config, run_date


class TrainApplyResult(BaseModel):
    """The two runs of a train-then-apply pipeline."""

    train: RunResult
    apply: RunResult


def make_train_apply_flow(app_name: str) -> Any:
    """A flow that trains ``app_name``'s model on ``load.input`` and then applies it to ``load.apply_to``.

    Two runs, two manifests: the training run is a registered model that later
    runs reuse (``model_run: <its URI>`` or ``model_run: latest``), and the apply
    run records which model it used. With ``skip_existing`` an unchanged
    training set reuses the existing model instead of training again.
    """
    app_flow = FLOWS[app_name]
    config_cls = _config_class(app_flow)

    def body(
        config: config_cls = config_cls(),  # type: ignore[valid-type]
        date: dt.date | None = None,
        timezone: str = "UTC",
    ) -> TrainApplyResult:
        from tasks.errors import ConfigError

        log = get_run_logger()
        day = run_date(date, timezone)
        config, _ = prepare_config(config, day, timezone)
        if not config.load.input or not config.load.apply_to:
            raise ConfigError(f"{app_name}-train-apply needs load.input (training data) and load.apply_to (data to apply to)")
        if config.model_run:
            raise ConfigError(f"{app_name}-train-apply trains its own model; leave model_run empty")
        train_cfg = config.model_copy(update={"load": config.load.model_copy(update={"apply_to": None})})
        trained: RunResult = app_flow.with_options(flow_run_name=f"{app_name}-{day}-train")(config=train_cfg, date=day)
        log.info("model: %s", trained.run_uri)
        apply_cfg = config.model_copy(
            update={"model_run": trained.run_uri, "load": config.load.model_copy(update={"input": None})}
        )
        applied: RunResult = app_flow.with_options(flow_run_name=f"{app_name}-{day}-apply")(config=apply_cfg, date=day)
        return TrainApplyResult(train=trained, apply=applied)

    body.__name__ = f"{app_name}_train_apply"
    body.__qualname__ = body.__name__
    body.__doc__ = (
        f"Train the {app_name} model on load.input, then apply it to load.apply_to (two runs, two manifests)."
        + FLOW_ARGS_DOC
    )
    return flow(
        name=f"{app_name}-train-apply",
        flow_run_name=_pipeline_run_name(app_name),
        validate_parameters=True,
        description=f"Train the {app_name} model, then apply it (weekly retrain, or train-and-score in one go).",
    )(body)


def _config_class(app_flow: Any) -> type:
    import inspect

    return inspect.signature(app_flow.fn).parameters["config"].annotation


def _pipeline_run_name(app_name: str) -> Any:
    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        try:
            day = run_date(params.get("date"), params.get("timezone") or "UTC").isoformat()
        except Exception:
            day = "bad-date"
        return f"{app_name}-train-apply-{day}-{dt.datetime.now(dt.UTC):%H%M%S}"

    return name


TRAIN_APPLY: dict[str, Any] = {name: make_train_apply_flow(name) for name in FLOWS}
"""``{app}-train-apply`` flows, one per application."""

ENTRYPOINTS: dict[str, Any] = {**FLOWS, **{f"{name}_train_apply": f for name, f in TRAIN_APPLY.items()}}
"""Attribute name in this module -> flow: what ``prefect.yaml`` entrypoints may name."""

globals().update(ENTRYPOINTS)
