"""The tabular applications' base: a dense autoencoder over prepared partitions.

:class:`TableApp` fills in the :class:`~tasks.apps.base.Application` stages that
reduce, extract, detect and impute share: ``fit`` trains the dense autoencoder on
the training split (early stopping on the validation split), and ``apply`` writes
one output table, one partition at a time, in input order, with the id column
carried through — each app only says what one partition becomes
(:meth:`TableApp.apply_part`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from models.dense import DenseAutoencoder, seeded
from models.training import predict, reconstruction_loss
from tasks.apps.base import Application, Fitted
from tasks.apps.kinds import TABLES, TableContext
from tasks.storage import RunDir, url_to_fs
from tasks.train import train_model


def iter_parts(prep, stats) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """Partitions of a PreparedTable one at a time, scaled with ``stats``: bounded memory for apply."""
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

    # -- fit -----------------------------------------------------------------------------
    def build_model(self, ctx: TableContext) -> nn.Module:
        return DenseAutoencoder(ctx.config.model.dense(len(ctx.train.columns)))

    def loss_fn(self, ctx: TableContext):
        return reconstruction_loss

    def fit(self, ctx: TableContext) -> Fitted:
        """Train the autoencoder on the training split; early stopping on the validation split."""
        train_x, val_x, _, _ = ctx.train_arrays
        with seeded(ctx.config.train.seed):  # initial weights from the seed: the same in every process
            model = self.build_model(ctx)
        result = train_model(model, train_x, val_x, ctx.config.train, run=ctx.run, loss_fn=self.loss_fn(ctx),
                             label=f"{self.name} autoencoder")
        return Fitted(model=model, schema=ctx.schema, stats=ctx.train.stats, train=result)

    # -- apply: one partition at a time -----------------------------------------------------
    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        """What one scaled partition ``x`` (with its id/label/split columns in ``side``) becomes."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_part")

    def apply(self, ctx: TableContext, fitted: Fitted) -> dict[str, str]:
        """``{output}.parquet``: one row per input row, in input order, partition by partition."""
        rel = f"{self.output}.parquet"
        id_col = fitted.schema.id if self.carries_id else None
        with PartWriter(ctx.run, rel) as out:
            for i, (x, side) in enumerate(iter_parts(ctx.target, fitted.stats)):
                df = self.apply_part(ctx, fitted, i, x, side)
                if id_col:
                    df.insert(0, id_col, side[id_col].to_numpy())
                out.write(df)
        return {self.output: rel}

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def encode(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(fitted.model.encode, x, device=device)

    @staticmethod
    def reconstruct(fitted: Fitted, x: np.ndarray, device: torch.device) -> np.ndarray:
        return predict(lambda b: fitted.model(b).x_hat, x, device=device)

    @staticmethod
    def code_frame(z: np.ndarray, prefix: str) -> pd.DataFrame:
        """Codes as float32 columns ``{prefix}0..{prefix}{k-1}``."""
        return pd.DataFrame(z.astype("float32"), columns=[f"{prefix}{i}" for i in range(z.shape[1])])
