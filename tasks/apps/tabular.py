"""The tabular applications' base: a dense autoencoder over prepared partitions.

:class:`TableApp` fills in the :class:`~tasks.apps.base.Application` stages that
reduce, extract, detect and impute share: ``fit`` trains the dense autoencoder on
the training split (early stopping on the validation split), and ``apply`` writes
one output table as one Parquet file per input partition, each a task on the run's
Dask cluster, in input order, with the id column carried through — each app only
says what one partition becomes (:meth:`TableApp.apply_part`).
"""

from __future__ import annotations

import io
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from models.dense import DenseAutoencoder, seeded
from models.training import predict, reconstruction_loss
from tasks.apps.base import Application, ApplyProgress, Fitted, on_worker
from tasks.apps.kinds import TABLES, TableContext
from tasks.errors import ConfigError
from tasks.scaling import SPLIT_COL
from tasks.storage import read_uri
from tasks.streaming import training_streams, use_streaming
from tasks.train import train_model


def read_part(prep, index: int, stats) -> tuple[np.ndarray, pd.DataFrame]:
    """Partition ``index`` of a PreparedTable, scaled with ``stats``: (features, id/label/split columns)."""
    df = pq.read_table(io.BytesIO(read_uri(prep.parts[index]))).to_pandas()  # an outage: one StorageError line
    x = df[list(prep.columns)].to_numpy(dtype="float32", na_value=np.nan)
    return stats.transform(x), df.drop(columns=list(prep.columns))


def _apply_part_task(index: int, *, app: TableApp, ctx: TableContext, fitted: Fitted) -> int:
    """One partition through the app on a Dask worker: ``{output}.parquet/part.NNNNN.parquet``."""
    ctx, fitted = on_worker(app, ctx, fitted)
    x, side = read_part(ctx.target, index, fitted.stats)
    df = app.apply_part(ctx, fitted, index, x, side)
    id_col = fitted.schema.id if app.carries_id else None
    if id_col:
        df.insert(0, id_col, side[id_col].to_numpy())
    if len(df):  # an empty partition has no file: its columns' types would be unknown
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
        ctx.run.write_bytes(f"{app.output}.parquet/part.{index:05d}.parquet", buf.getvalue())
    return len(df)


class TableApp(Application):
    """Base of the tabular applications (reduce, extract, detect, impute).

    Subclasses set ``output`` (the name of their output table) and implement
    :meth:`apply_part` and :meth:`evaluate`; ``fit`` trains the dense autoencoder and
    can be extended to fit the application's own state.
    """

    data = TABLES
    allow_nulls: ClassVar[bool] = False
    output: ClassVar[str] = ""  # the main output: {output}.parquet
    carries_id: ClassVar[bool] = True  # insert the id column in front of each partition's output

    # -- data ----------------------------------------------------------------------------
    def output_columns(self, latent_dim: int) -> list[str]:
        """The columns :meth:`apply_part` writes for a model of this code width (the id column goes in front)."""
        return []

    def adopt(self, config: Any, fitted: Fitted | None) -> Any:
        """Refuse, before anything is read or written, an id column named like one of the output's own columns
        (reduce's ``z_0``, extract's ``f_0``, detect's ``score``): inserting it failed with a traceback after training."""
        id_col = fitted.schema.id if fitted is not None and fitted.schema is not None else config.load.id_column
        if id_col and self.carries_id:
            width = fitted.model.config.latent_dim if fitted is not None else config.model.latent_dim
            own = self.output_columns(width)
            if id_col in own:
                shown = ", ".join(own) if len(own) <= 4 else f"{own[0]}..{own[-1]}"
                raise ConfigError(f"--id-column {id_col!r} is also the name of a column that {self.name} writes to "
                                  f"{self.output}.parquet ({shown}): rename the id column in the input")
        return config

    def check_data(self, ctx: TableContext) -> None:
        """Say what the run takes with a caveat (columns of apply data left out, ids on more than one row):
        in the log and in the run's notes (the result, report/summary.md, the manifest)."""
        from tasks.train import run_logger

        tables = [ctx.train] + ([ctx.target] if ctx.target is not ctx.train else [])
        for prep in (t for t in tables if t is not None):
            for w in prep.input_warnings:
                run_logger().warning("%s", w)
                ctx.notes.append(f"warning: {w}")

    @staticmethod
    def no_label_note(ctx: TableContext, not_evaluated: str) -> str | None:
        """The note saying why the metrics that need a label are ``not_evaluated``, or None when the data scored
        has the label column: none was given, or the one given (or the model's) is not in the data applied to
        (a training input that has it, --apply-to data that does not: "no label column" said the wrong thing)."""
        label = ctx.schema.label
        if not label:
            return f"no label column: {not_evaluated}"
        if ctx.target.label_column is not None:
            return None
        role = "--apply-to" if ctx.config.load.apply_to else "--input"
        return f"label column {label!r} is not in the {role} data ({ctx.target.source_uri}): {not_evaluated}"

    # -- fit -----------------------------------------------------------------------------
    def build_model(self, ctx: TableContext) -> nn.Module:
        return DenseAutoencoder(ctx.config.model.dense(len(ctx.train.columns)))

    def loss_fn(self, ctx: TableContext):
        return reconstruction_loss

    def fit(self, ctx: TableContext) -> Fitted:
        """Train the autoencoder on the training split; early stopping on the validation split."""
        train, val = self.training_data(ctx)
        with seeded(ctx.config.train.seed):  # initial weights from the seed: the same in every process
            model = self.build_model(ctx)
        result = train_model(model, train, val, ctx.config.train, run=ctx.run, loss_fn=self.loss_fn(ctx),
                             label=f"{self.name} autoencoder")
        return Fitted(model=model, schema=ctx.schema, stats=ctx.train.stats, train=result)

    def training_data(self, ctx: TableContext) -> tuple[Any, Any]:
        """(training, validation) data for ``train_model``: the rows in memory, or — when they would not
        fit comfortably in ``train.memory_mb`` (``train.stream``) — seeded streams of minibatches read
        from the prepared partitions (``tasks/streaming.py``), so memory is bounded by the setting."""
        prep, cfg = ctx.train, ctx.config.train
        if use_streaming(cfg, prep.n_train, len(prep.columns)):
            offset, scale = prep.stats.offset_scale()
            ctx.notes.append(f"trained by streaming minibatches from the {len(prep.parts)} prepared partitions "
                             f"(train.stream={cfg.stream}, train.memory_mb={cfg.memory_mb})")
            return training_streams(prep.parts, prep.columns, split_column=SPLIT_COL, offset=offset, scale=scale, cfg=cfg)
        train_x, val_x, _, _ = ctx.train_arrays
        return train_x, val_x

    def training_rows(self, ctx: TableContext) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) rows in memory, for fits that need every row at hand (detect's robust
        ranking and references, impute's closed-form head). Rows that would not fit in ``train.memory_mb``
        are a seeded sample that does (said in the run's notes); ``train.stream=off`` takes them all."""
        prep, cfg = ctx.train, ctx.config.train
        if cfg.stream == "on":
            ctx.notes.append(f"train.stream=on read as auto: {self.name}'s fit needs its rows at hand, so it does not "
                             "stream (rows beyond train.memory_mb are sampled; train.stream=off takes them all)")
        cap = int(cfg.memory_mb * 2**20 / 2 / (4 * max(len(prep.columns), 1)))
        if cfg.stream == "off" or prep.n_rows <= cap:
            train_x, val_x, _, _ = ctx.train_arrays
            return train_x, val_x
        val_cap = int(cap * prep.n_val / prep.n_rows)
        train_x = ctx.sample("train", "train", cap - val_cap, cfg.seed)[0]
        val_x = ctx.sample("train", "val", val_cap, cfg.seed)[0]
        ctx.notes.append(f"{self.name} fits in memory: on a seeded sample of {len(train_x) + len(val_x):,} of the "
                         f"{prep.n_rows:,} training rows (train.memory_mb={cfg.memory_mb}; train.stream=off for all)")
        return train_x, val_x

    # -- apply: one partition at a time -----------------------------------------------------
    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        """What one scaled partition ``x`` (with its id/label/split columns in ``side``) becomes."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_part")

    def apply(self, ctx: TableContext, fitted: Fitted) -> dict[str, str]:
        """``{output}.parquet/``: one Parquet file per input partition (``part.NNNNN.parquet``, written
        in parallel on the Dask workers), one row per input row, in input order — read it whole with
        ``pandas.read_parquet`` (or any Parquet dataset reader)."""
        progress = ApplyProgress(f"{self.name} apply", len(ctx.target.parts), ctx.target.n_rows)
        rows = self.map_shards(ctx, fitted, _apply_part_task, list(range(len(ctx.target.parts))), on_done=progress.done)
        if sum(rows) != ctx.target.n_rows:
            raise RuntimeError(f"{self.name}: {sum(rows)} rows written for {ctx.target.n_rows} input rows")
        return {self.output: f"{self.output}.parquet"}

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def encode(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(fitted.model.encode, x, device=device)

    @staticmethod
    def reconstruct(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(lambda b: fitted.model(b).x_hat, x, device=device)

    @staticmethod
    def code_columns(width: int, prefix: str) -> list[str]:
        return [f"{prefix}{i}" for i in range(width)]

    @classmethod
    def code_frame(cls, z: np.ndarray, prefix: str) -> pd.DataFrame:
        """Codes as float32 columns ``{prefix}0..{prefix}{k-1}``."""
        return pd.DataFrame(z.astype("float32"), columns=cls.code_columns(z.shape[1], prefix))
