"""The application interface and registry.

Each application is one module in ``tasks/apps/`` that defines its ``Config``
(pydantic), its ``RunConfig`` (the flow parameter) and a :class:`TableApp`
subclass with ``fit``, ``apply`` and ``evaluate``, registered by name with
:func:`register`. The pipeline (``flows/pipeline.py``) is the same for every
tabular application; only these methods differ.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from torch import nn

from models import build_model
from models.dense import DenseAEConfig, DenseAutoencoder
from models.training import TrainResult, predict, reconstruction_loss, select_device
from tasks.config import AppConfig, RunConfig
from tasks.errors import ModelMismatchError
from tasks.prefect_utils import COMPUTE_TASK
from tasks.preprocess import SPLIT_COL, PreparedTable, ScalingStats, read_prepared
from tasks.schemas import TableSchema
from tasks.storage import RunDir, url_to_fs
from tasks.train import train_model

APP_MODULES = ("reduce", "extract", "detect", "impute", "denoise", "index")
_REGISTRY: dict[str, TableApp] = {}


def register(cls: type[TableApp]) -> type[TableApp]:
    """Class decorator: make an application available by its ``name``."""
    if not cls.name or cls.name != cls.RunConfig().app_name:
        raise TypeError(f"{cls.__name__}: name {cls.name!r} must match its RunConfig's app config name")
    _REGISTRY[cls.name] = cls()
    return cls


def load_all() -> dict[str, TableApp]:
    for mod in APP_MODULES:
        importlib.import_module(f"tasks.apps.{mod}")
    return dict(_REGISTRY)


def load_image_apps() -> dict[str, Any]:
    """Applications with a flow of their own (``flows/compress.py``), not the tabular pipeline."""
    from tasks.apps.compress import APP as compress

    return {compress.name: compress}


def get_app(name: str) -> TableApp:
    apps = {**load_all(), **load_image_apps()}
    try:
        return apps[name]
    except KeyError as e:
        raise ModelMismatchError(f"unknown application {name!r}; known: {sorted(apps)}") from e


@dataclass
class Evaluation:
    """Metrics of ours and of the baselines a user would otherwise pick, on the same data."""

    metrics: dict[str, float | int | None] = field(default_factory=dict)
    baselines: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Fitted:
    """A trained model with everything needed to apply it to new data."""

    model: nn.Module
    schema: TableSchema
    stats: ScalingStats
    state: dict[str, Any] = field(default_factory=dict)
    train: TrainResult | None = None
    source_run: str | None = None


@dataclass
class TableContext:
    """What an application's methods get: config, run directory and the prepared data."""

    config: RunConfig
    run: RunDir
    schema: TableSchema
    train: PreparedTable | None
    target: PreparedTable
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The inspected input that ``target`` was prepared from (apps that need the raw values, e.g. impute).
    source: Any = None

    @cached_property
    def train_arrays(self) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
        """(train_x, val_x, train_side, val_side), scaled, read once."""
        assert self.train is not None
        x, side = read_prepared(self.train)
        val = side[SPLIT_COL].to_numpy() if SPLIT_COL in side.columns else np.zeros(len(x), bool)
        return x[~val], x[val], side[~val].reset_index(drop=True), side[val].reset_index(drop=True)

    @cached_property
    def target_arrays(self) -> tuple[np.ndarray, pd.DataFrame]:
        """(x, side) of the data the model is applied to, in input order, scaled."""
        if self.train is not None and self.target is self.train:
            x, side = read_prepared(self.train)
            return x, side
        return read_prepared(self.target)


def iter_parts(prep: PreparedTable, stats: ScalingStats) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Partitions of ``prep`` one at a time, scaled with ``stats``: bounded memory for apply."""
    for uri in prep.parts:
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as f:
            df = pq.read_table(f).to_pandas()
        x = df[list(prep.columns)].to_numpy(dtype="float32", na_value=np.nan)
        yield stats.transform(x), df.drop(columns=list(prep.columns))


class PartWriter:
    """Stream a Parquet table into the run, one partition at a time."""

    def __init__(self, run: RunDir, rel: str) -> None:
        self.run, self.rel = run, rel
        self._file = None
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, df: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(df, preserve_index=False)
        if self._writer is None:
            self._file = self.run.open(self.rel, "wb")
            self._writer = pq.ParquetWriter(self._file, table.schema)
        self._writer.write_table(table.cast(self._writer.schema))
        self.rows += len(df)

    def close(self) -> str:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        return self.run.uri_of(self.rel)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TableApp:
    """Base of the tabular applications (reduce, extract, detect, impute).

    Subclasses set ``name``, ``Config``, ``RunConfig`` and implement ``apply`` and
    ``evaluate``; ``fit`` trains the dense autoencoder and can be extended to fit
    the application's own state (fields ending with ``_``, as in scikit-learn).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[AppConfig]] = AppConfig
    RunConfig: ClassVar[type[RunConfig]] = RunConfig
    allow_nulls: ClassVar[bool] = False
    model_kind: ClassVar[str] = "dense"
    # Options shown on `aeflow run <app> --help`, beyond the common ones: (flag, config path, type, help).
    cli_options: ClassVar[tuple[tuple[str, str, type, str], ...]] = ()

    # -- model ---------------------------------------------------------------------
    def build_model(self, ctx: TableContext) -> nn.Module:
        m = ctx.config.model
        return DenseAutoencoder(
            DenseAEConfig(
                in_features=len(ctx.train.columns if ctx.train else ctx.target.columns),
                latent_dim=m.latent_dim,
                hidden=tuple(m.hidden),
                activation=m.activation,
                dropout=m.dropout,
                batch_norm=m.batch_norm,
            )
        )

    def loss_fn(self, ctx: TableContext):
        return reconstruction_loss

    def fit(self, ctx: TableContext) -> Fitted:
        """Train the autoencoder on the training split; early stopping on the validation split."""
        assert ctx.train is not None
        train_x, val_x, _, _ = ctx.train_arrays
        model = self.build_model(ctx)
        result = train_model(
            model, train_x, val_x, ctx.config.train, run=ctx.run, loss_fn=self.loss_fn(ctx), label=f"{self.name} autoencoder"
        )
        return Fitted(model=model, schema=ctx.schema, stats=ctx.train.stats, train=result)

    # -- persistence -----------------------------------------------------------------
    def save(self, run: RunDir, fitted: Fitted) -> None:
        model = fitted.model
        run.save_model(
            getattr(model, "kind", self.model_kind),
            model.config.to_dict(),
            model.state_dict(),
            {
                "schema": fitted.schema.to_dict(),
                "stats": fitted.stats.to_dict(),
                "state": fitted.state,
                "train": {k: v for k, v in (fitted.train.to_dict() if fitted.train else {}).items() if k != "history"},
            },
        )

    def load(self, run: RunDir, device: torch.device) -> Fitted:
        """Rebuild a fitted model from a run's ``model/`` folder (no unpickling)."""
        meta, state_dict = run.load_model_files()
        if meta.get("app") != self.name:
            raise ModelMismatchError(
                f"{run.uri} holds a model of the {meta.get('app')!r} application, not {self.name!r}"
            )
        model = build_model(meta["kind"], meta["config"])
        model.load_state_dict(state_dict)
        model.to(device).eval()
        return Fitted(
            model=model,
            schema=TableSchema.from_dict(meta["schema"]),
            stats=ScalingStats.from_dict(meta["stats"]),
            state=meta.get("state", {}),
            source_run=run.uri,
        )

    # -- the application -----------------------------------------------------------------
    def apply(self, ctx: TableContext, fitted: Fitted) -> dict[str, str]:
        """Write the application's outputs for ``ctx.target``; returns {name: relative path}."""
        raise NotImplementedError

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        raise NotImplementedError

    def report(self, ctx: TableContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        """Plots for people to look at; returns {name: relative path}."""
        return {}

    # -- helpers ---------------------------------------------------------------------
    @staticmethod
    def encode(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(fitted.model.encode, x, device=device)

    @staticmethod
    def reconstruct(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(lambda b: fitted.model(b).x_hat, x, device=device)


def device_for(cfg: RunConfig) -> torch.device:
    return select_device(cfg.train.device)


# ---------------------------------------------------------------------------------------
# Prefect tasks: the stages every tabular application goes through.


@task(name="fit", task_run_name="fit-{app.name}", tags=["training"], **COMPUTE_TASK)
def fit_task(app: TableApp, ctx: TableContext) -> Fitted:
    """Train the application's autoencoder (tagged ``training`` for concurrency limits) and save it."""
    fitted = app.fit(ctx)
    app.save(ctx.run, fitted)
    return fitted


@task(name="apply", task_run_name="apply-{app.name}", **COMPUTE_TASK)
def apply_task(app: TableApp, ctx: TableContext, fitted: Fitted) -> dict[str, str]:
    return app.apply(ctx, fitted)


@task(name="evaluate", task_run_name="evaluate-{app.name}", **COMPUTE_TASK)
def evaluate_task(app: TableApp, ctx: TableContext, fitted: Fitted) -> Evaluation:
    return app.evaluate(ctx, fitted)


@task(name="report", task_run_name="report-{app.name}", **COMPUTE_TASK)
def report_task(app: TableApp, ctx: TableContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
    return app.report(ctx, fitted, evaluation)
