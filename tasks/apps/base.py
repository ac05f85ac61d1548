"""The one application contract: an ABC, its context, its fitted state, and the registry.

Every application (reduce, extract, detect, impute, denoise, index, compress) is one
module in ``tasks/apps/`` with a subclass of :class:`Application`, registered by name
with :func:`register`. The stages have the same signatures for every application and
share data through a context object (:class:`Context`, specialised per data kind):

- ``fit(ctx) -> Fitted``: train the model (or extend the fit with the app's own state,
  fields ending with ``_``, as in pyod/scikit-learn);
- ``apply(ctx, fitted) -> {name: relative path}``: write the app's outputs;
- ``evaluate(ctx, fitted) -> Evaluation``: metrics and the baselines a user would
  otherwise pick, on the same data in the same run;
- ``report(ctx, fitted, evaluation) -> {name: relative path}``: plots (default: what
  ``evaluate`` left in ``ctx.artifacts`` plus the training curve);
- ``save(run, fitted)`` / ``load(uri, device)``: one model loader for every app, taking a
  run or a model folder (``config.json`` + ``weights.safetensors``), checked to belong to
  the app (:meth:`Application.check_model`).

How the data arrives (inspect, then load/preprocess) is the app's *data kind*
(``tasks/apps/kinds.py``: tables or images), not the app's business. The pipeline
(``flows/pipeline.py: run_app``) is the same for every app. Adding an application is one
module here whose class is decorated with :func:`register`, plus one entry in :data:`APP_MODULES`
(which imports the module; a class defined elsewhere registers when its module is imported): its
CLI command, flow, deployment entry point and contract tests follow.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from prefect import task
from torch import nn

from models import build_model
from models.training import TrainResult
from tasks.config import AppConfig, RunConfig
from tasks.errors import ConfigError, ModelMismatchError
from tasks.prefect_utils import COMPUTE_TASK
from tasks.storage import MODEL_DIR, RunDir, open_model_source

if TYPE_CHECKING:
    from tasks.apps.kinds import DataKind

APP_MODULES = ("reduce", "extract", "detect", "impute", "denoise", "index", "compress")
"""The built-in applications: ``tasks.apps.<module>`` registers one each."""

_REGISTRY: dict[str, Application] = {}


FIT_ONLY = ("model", "preprocess", *(f"train.{k}" for k in (
    "epochs", "batch_size", "default_batch_size", "lr", "weight_decay", "patience", "compile", "checkpoint_seconds",
    "stream", "memory_mb")))
"""The settings no application reads when it reuses a model (``--model``): the architecture, the preprocessing (its
scaling and categories are the model's) and the keys that only shape training (``train.seed`` and ``train.device``
also serve apply and evaluation). :attr:`Application.fit_only` by default."""

CliOption = tuple[str, str, type, str]
"""An app's own ``aeflow run APP`` option: (flag, config path, type, help)."""


@dataclass
class Evaluation:
    """Metrics of ours and of the baselines a user would otherwise pick, on the same data."""

    metrics: dict[str, float | int | None] = field(default_factory=dict)
    baselines: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Ours on the data the baselines were measured on, per headline metric, when that is not the data of
    # ``metrics`` (compress's sweep of a sample of the images), with a phrase naming that data: the verdict
    # then compares like with like.
    compared: dict[str, tuple[float, str]] = field(default_factory=dict)


@dataclass
class Fitted:
    """A trained (or loaded) model with everything needed to apply it to new data.

    ``schema`` and ``stats`` are set for tabular models (the columns and the scaling fitted
    at training time); ``state`` holds the app's fitted fields (JSON-able, saved beside the
    weights); ``weights_hash`` is the SHA-256 of the saved weights.
    """

    model: nn.Module
    state: dict[str, Any] = field(default_factory=dict)
    train: TrainResult | None = None
    source_run: str | None = None
    weights_hash: str | None = None
    schema: Any = None
    stats: Any = None


@dataclass
class Context:
    """What every stage gets: the config, the run directory and the device.

    Data kinds add their data (``TableContext``, ``ImageContext``). ``artifacts`` collects
    files written for people by any stage (``report`` returns them); ``notes`` end up in the
    evaluation's notes; ``cache`` carries in-process results from one stage to the next
    (never persisted).
    """

    config: RunConfig
    run: RunDir
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    artifacts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)


class Application(ABC):
    """Base of every application: the stages, and template methods shared by all.

    Subclasses set ``name``, ``Config``, ``RunConfig`` and ``data`` (the data kind) and
    implement :meth:`fit`, :meth:`apply` and :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[AppConfig]] = AppConfig
    RunConfig: ClassVar[type[RunConfig]] = RunConfig
    data: ClassVar[DataKind]
    # The model kind saved by this app (``models.MODEL_BUILDERS``), and the kinds it accepts from --model.
    model_kind: ClassVar[str] = "dense"
    model_kinds: ClassVar[tuple[str, ...]] = ()
    # The app's own `aeflow run APP` options, and which common ones apply (None: the data kind's).
    cli_options: ClassVar[tuple[CliOption, ...]] = ()
    common_options: ClassVar[tuple[str, ...] | None] = None
    # The metrics people compare first (the demo's table): (metric, higher is better). A name ending in
    # "_*" stands for a metric named after a setting (index's precision_at_{app.k}): see headlines_of.
    headlines: ClassVar[tuple[tuple[str, bool], ...]] = ()
    # Save a reused (--model) model into the run as well, so the run is self-contained.
    self_contained: ClassVar[bool] = False
    # The settings ("section" or "section.key") that only shape the fit: with --model the reused model stands for
    # them, and the run's notes and log name any given (flows/pipeline.py: unused_with_model). An app adds its
    # own app.* fit settings (detect's contamination) and leaves out what its apply or evaluation reads
    # (extract's evaluation trains encoders with the model and train settings).
    fit_only: ClassVar[tuple[str, ...]] = FIT_ONLY

    # -- the stages ---------------------------------------------------------------------
    @abstractmethod
    def fit(self, ctx: Context) -> Fitted:
        """Train the model on ``ctx``'s training data."""

    @abstractmethod
    def apply(self, ctx: Context, fitted: Fitted) -> dict[str, str]:
        """Write the application's outputs for the data it is applied to; returns {name: relative path}."""

    @abstractmethod
    def evaluate(self, ctx: Context, fitted: Fitted) -> Evaluation:
        """Metrics of ours and of the baselines, on the same held-out data."""

    def report(self, ctx: Context, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        """Plots for people to look at; returns {name: relative path}. Default: what the other
        stages left in ``ctx.artifacts``, plus the training curve when the model was trained here."""
        from tasks.report import training_curve

        out = dict(ctx.artifacts)
        if fitted.train is not None:
            curve = training_curve(ctx.run, fitted.train.history)
            if curve:
                out["training_plot"] = curve
        return out

    # -- hooks (no-ops by default) -----------------------------------------------------------
    def device_for(self, config: RunConfig) -> torch.device:
        """The device apply and evaluate run on (training picks its own from ``train.device``)."""
        from tasks.train import resolve_device

        return resolve_device(config.train.device)

    def adopt(self, config: RunConfig, fitted: Fitted | None) -> RunConfig:
        """The config the run uses, once ``--model`` is loaded (None: training): a setting the
        user left unset may take the reused model's value (index: the image size it learnt on).
        Called before the run's fingerprint, so an adopted value counts as if given."""
        return config

    def check_fitted(self, config: RunConfig, fitted: Fitted) -> None:
        """Refuse a reused model that cannot serve ``config``, before any work (e.g. a quality level)."""

    def check_data(self, ctx: Context) -> None:
        """Refuse loaded data the model cannot take (e.g. images smaller than the network's stride)."""

    # -- persistence: one saver, one loader ------------------------------------------------------
    def save(self, run: RunDir, fitted: Fitted) -> None:
        """Save ``model/config.json`` (kind, config, fitted state) and ``model/weights.safetensors``."""
        model = fitted.model
        extra: dict[str, Any] = {"state": fitted.state}
        if fitted.schema is not None:
            extra["schema"] = fitted.schema.to_dict()
        if fitted.stats is not None:
            extra["stats"] = fitted.stats.to_dict()
        extra["train"] = {k: v for k, v in (fitted.train.to_dict() if fitted.train else {}).items() if k != "history"}
        run.save_model(getattr(model, "kind", self.model_kind), model.config.to_dict(), model.state_dict(), extra)
        fitted.weights_hash = run.read_json(f"{MODEL_DIR}/config.json").get("weights")

    def load(self, uri: str, device: torch.device) -> Fitted:
        """The model that ``--model`` names: a complete run or a model folder (no unpickling)."""
        source = open_model_source(uri)
        meta, state_dict = source.load_model_files()
        self.check_model(meta, source.uri)
        return self.from_files(meta, state_dict, source.uri, device)

    def check_model(self, meta: dict[str, Any], uri: str) -> None:
        """The one place that checks a saved model belongs to this application."""
        app = meta.get("app")
        if app is not None and app != self.name:
            raise ModelMismatchError(f"{uri} holds a model of the {app!r} application, not {self.name!r}")
        kinds = self.model_kinds or (self.model_kind,)
        if app is None and meta.get("kind") not in kinds:
            raise ModelMismatchError(
                f"{uri} holds a {meta.get('kind')!r} model; the {self.name} application takes {', '.join(map(repr, kinds))}"
            )

    def from_files(self, meta: dict[str, Any], state_dict: dict[str, Any], uri: str, device: torch.device) -> Fitted:
        """Rebuild the fitted model from a saved ``config.json`` and its tensors."""
        try:
            model = build_model(meta["kind"], meta["config"])
            model.load_state_dict(state_dict)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ModelMismatchError(f"{uri}: cannot rebuild its {meta.get('kind')!r} model: {e}") from e
        model.to(device).eval()
        return Fitted(model=model, state=meta.get("state", {}), source_run=uri, weights_hash=meta.get("weights"),
                      **self.fitted_extras(meta))

    def fitted_extras(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Data-kind fields of :class:`Fitted` read back from a saved ``config.json`` (tables: schema, stats)."""
        return self.data.fitted_extras(meta)

    @classmethod
    def headlines_of(cls, metrics: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
        """:attr:`headlines` as a run with these ``metrics`` names them: a ``prefix_*`` headline is the run's
        first metric ``prefix_<something>`` (``precision_at_5`` with ``--set app.k=5``), and is left out when
        the run has none."""
        out = []
        for name, higher in cls.headlines:
            if name.endswith("_*"):
                name = next((m for m in metrics if m.startswith(name[:-1])), "")
            if name:
                out.append((name, higher))
        return tuple(out)

    # -- apply on the cluster ------------------------------------------------------------------
    def map_shards(self, ctx: Context, fitted: Fitted, fn: Any, items: list[Any],
                   on_done: Callable[[Any], None] | None = None,
                   on_progress: Callable[[dict[str, Any]], None] | None = None) -> list[Any]:
        """``fn(item, app=..., ctx=..., fitted=...)`` for every item (a partition or a shard): one Dask
        task each on the run's cluster, the context and the model shipped once per worker
        (:func:`tasks.dask_client.run_parallel`); in this process when there is no cluster.
        On the worker, ``fn`` calls :func:`on_worker` for the context and model it computes with;
        ``on_done(result)`` is called here as each item finishes, ``on_progress(payload)`` with what ``fn``
        reports within an item (:func:`tasks.dask_client.report_progress`): :class:`ApplyProgress`."""
        from tasks.dask_client import run_parallel

        lean = dataclasses.replace(ctx, cache={}, artifacts={}, notes=[])  # no cached arrays on the wire
        fitted.model.to("cpu")
        try:
            return run_parallel(fn, items, on_done=on_done, on_progress=on_progress, app=self, ctx=lean, fitted=fitted)
        finally:
            fitted.model.to(ctx.device)


class ApplyProgress:
    """Apply over many partitions or images can take minutes (detect scores a few thousand rows/s; denoise
    a 6 MP photograph ~50 s on a CPU): a log line at most every ``STEP_LOG_EVERY_S`` with the items and amount
    done, the rate and about how long the rest takes. Items finish through :meth:`done` (``map_shards``'
    ``on_done``); work within a running item (the tiles of one large image) through :meth:`progress`
    (``map_shards``' ``on_progress``), which a worker sends with :func:`tasks.dask_client.report_progress`.

    Amounts are counted in ``unit`` and shown divided by ``scale`` with ``digits`` decimals (tables: rows;
    images: ``unit="MP", scale=1e6, digits=1`` over pixels).
    """

    def __init__(self, label: str, parts: int, rows: float, emit: Callable[..., None] | None = None, *,
                 items: str = "partitions", unit: str = "rows", scale: float = 1.0, digits: int = 0) -> None:
        import threading

        from tasks.train import run_logger

        self.label, self.parts, self.rows = label, parts, rows
        self.items, self.unit, self.scale, self.digits = items, unit, scale, digits
        self.emit = emit or run_logger().info
        self.parts_done = 0
        self.rows_done = 0.0
        self.running: dict[Any, float] = {}  # item -> amount done within it (progress)
        self.finished: set[Any] = set()
        self.lock = threading.Lock()  # progress arrives on the Dask client's event thread
        self.t0 = self.last = time.monotonic()

    def done(self, rows: float, count: int = 1, item: Any = None) -> None:
        """``count`` items finished with ``rows`` of the amount (``item``: the key their progress came under)."""
        with self.lock:
            self.parts_done += count
            self.rows_done += rows
            if item is not None:
                self.running.pop(item, None)
                self.finished.add(item)
            if self.parts_done < self.parts:  # the stage's end is said elsewhere
                self._line()

    def progress(self, event: dict[str, Any]) -> None:
        """``{"item": key, "done": amount done within it, "detail": what it is doing}`` of a running item."""
        with self.lock:
            item = event.get("item")
            if item in self.finished:  # it arrived after the item's result
                return
            self.running[item] = float(event.get("done", 0.0))
            self._line(str(event.get("detail") or ""))

    def _line(self, detail: str = "") -> None:
        from tasks.train import STEP_LOG_EVERY_S, _duration

        now = time.monotonic()
        if now - self.last < STEP_LOG_EVERY_S:
            return
        self.last = now
        done = self.rows_done + sum(self.running.values())
        rate = done / max(now - self.t0, 1e-9)
        left = (self.rows - done) / max(rate, 1e-9)

        def amount(v: float) -> str:
            return f"{v / self.scale:,.{self.digits}f}"

        self.emit("%s: %d/%d %s, %s of %s %s, %s %s/s, about %s left%s", self.label, self.parts_done, self.parts,
                  self.items, amount(done), amount(self.rows), self.unit, amount(rate), self.unit, _duration(left),
                  f" ({detail})" if detail else "")


def on_worker(app: Application, ctx: Context, fitted: Fitted) -> tuple[Context, Fitted]:
    """The context and model an apply task computes with, on the device of the process it runs in
    (a GPU worker uses its GPU when ``train.device`` allows it)."""
    device = app.device_for(ctx.config)
    fitted.model.to(device).eval()
    return dataclasses.replace(ctx, device=device), fitted


# ---------------------------------------------------------------------------------------
# The registry


def register(cls: type[Application]) -> type[Application]:
    """Class decorator: make an application available by its ``name``."""
    if not cls.name or cls.name != cls.RunConfig().app_name:
        raise TypeError(f"{cls.__name__}: name {cls.name!r} must match its RunConfig's app config name")
    if not hasattr(cls, "data"):
        raise TypeError(f"{cls.__name__}: set `data` to a data kind (tasks.apps.kinds.TABLES or IMAGES)")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove an application from the registry (tests that register one of their own)."""
    _REGISTRY.pop(name, None)


def load_all() -> dict[str, Application]:
    """Every registered application by name (importing the built-in ones first)."""
    for mod in APP_MODULES:
        importlib.import_module(f"tasks.apps.{mod}")
    return dict(_REGISTRY)


def get_app(name: str) -> Application:
    apps = load_all()
    try:
        return apps[name]
    except KeyError as e:
        raise ConfigError(f"unknown application {name!r}; known: {sorted(apps)}") from e  # a bad argument: exit 2


# ---------------------------------------------------------------------------------------
# Prefect tasks: the stages every application goes through.


_FIT_STARTED: dict[str, threading.Event] = {}


def fit_started(run_id: str) -> threading.Event:
    """Set when the fit task of run ``run_id`` begins, that is after any wait for a ``training`` slot
    (:func:`tasks.prefect_utils.report_slot_wait`); :func:`forget_fit_started` drops it."""
    return _FIT_STARTED.setdefault(run_id, threading.Event())


def forget_fit_started(run_id: str) -> None:
    _FIT_STARTED.pop(run_id, None)


@task(name="fit", task_run_name="fit-{app.name}", tags=["training"], **COMPUTE_TASK)
def fit_task(app: Application, ctx: Context) -> Fitted:
    """Train the application's model (tagged ``training`` for concurrency limits) and save it."""
    if (started := _FIT_STARTED.get(ctx.run.run_id)) is not None:
        started.set()
    fitted = app.fit(ctx)
    app.save(ctx.run, fitted)
    return fitted


@task(name="apply", task_run_name="apply-{app.name}", **COMPUTE_TASK)
def apply_task(app: Application, ctx: Context, fitted: Fitted) -> dict[str, str]:
    return app.apply(ctx, fitted)


@task(name="evaluate", task_run_name="evaluate-{app.name}", **COMPUTE_TASK)
def evaluate_task(app: Application, ctx: Context, fitted: Fitted) -> Evaluation:
    return app.evaluate(ctx, fitted)


@task(name="report", task_run_name="report-{app.name}", **COMPUTE_TASK)
def report_task(app: Application, ctx: Context, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
    return app.report(ctx, fitted, evaluation)
