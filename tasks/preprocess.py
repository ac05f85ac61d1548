"""Dask-parallel preprocessing: split, encode, scaling statistics, partitions on storage.

One pass over the data on the Dask cluster: every partition is parsed and
validated (``tasks.load``), given its deterministic train/validation flag,
encoded to float32 features, summarised into mergeable moments, and written as
``preprocessed/part.NNNNN.parquet`` in the run directory. The scaling
statistics are merged from the per-partition moments on the client (Chan's
parallel variance), stored in ``preprocessed/stats.json`` and applied when the
partitions are read back: memory stays bounded by the partition size, whatever
the size of the input.

The ``ddf -> ddf`` and ``DataFrame -> DataFrame`` functions here are pure and
tested without Prefect.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed.diagnostics.plugin import WorkerPlugin
from prefect import task

from tasks.config import PreprocessConfig
from tasks.errors import InputError
from tasks.load import TableSource, to_dask
from tasks.prefect_utils import IO_TASK
from tasks.schemas import TableSchema
from tasks.storage import RunDir, read_uri, write_uri

SPLIT_COL = "__aeflow_val"
log = logging.getLogger("aeflow.preprocess")


# ---------------------------------------------------------------------------------------
# Dask client


class _QuietUserErrors(WorkerPlugin):
    """Dask worker plugin: a user's bad input is reported once by aeflow, not also as a
    worker "Compute Failed" log with a traceback."""

    name = "aeflow-quiet-user-errors"

    def setup(self, worker: Any) -> None:
        from tasks.errors import AeflowError

        names = tuple(f"{c.__name__}(" for c in _subclasses(AeflowError))

        class _Filter(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                if str(record.msg).startswith("Compute Failed") and isinstance(record.args, tuple):
                    return not any(str(a).startswith(names) for a in record.args)
                return True

        logging.getLogger("distributed.worker").addFilter(_Filter())

    def teardown(self, worker: Any) -> None:
        return None


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def _install_plugins(client: Any) -> None:
    try:
        client.register_plugin(_QuietUserErrors(), name=_QuietUserErrors.name)
    except Exception as e:  # a scheduler that refuses plugins still works; logs are just noisier
        log.debug("could not register the worker plugin: %s", e)


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None) -> Iterator[Any]:
    """A distributed client: the scheduler at ``address``, or a new ``LocalCluster``.

    The client becomes Dask's default scheduler for the duration, so
    ``.compute()`` anywhere in the flow (and in its tasks' threads) runs on it.
    """
    from distributed import Client, LocalCluster

    if address:
        try:
            client = Client(address, timeout="20s")
        except OSError as e:
            raise InputError(f"cannot connect to the Dask scheduler at {address}: {e}") from e
        _install_plugins(client)
        try:
            yield client
        finally:
            client.close()
        return
    workers = n_workers or max(1, min(4, os.cpu_count() or 1))
    # Worker processes read their logging config from the environment when they start.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # A worker still busy when the cluster closes is killed after a grace period; that is expected here.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    with dask.config.set({"distributed.worker.daemon": False, "logging.distributed": "warning"}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        client = Client(cluster)
        try:
            _install_plugins(client)
            yield client
        finally:
            # Shutting the local cluster down is cleanup: on a loaded machine it can outlast its
            # timeout, which must not fail a run whose work is done (the workers are killed anyway).
            for closer in (client.close, cluster.close):
                try:
                    closer()
                except Exception as e:
                    log.warning("Dask LocalCluster shutdown: %s", e)


# ---------------------------------------------------------------------------------------
# Pure functions


def split_partition(df: pd.DataFrame, val_fraction: float, seed: int, partition: int) -> pd.DataFrame:
    """Flag validation rows with a generator seeded by (seed, partition): deterministic."""
    rng = np.random.default_rng([seed, partition])
    return df.assign(**{SPLIT_COL: rng.random(len(df)) < val_fraction})


def add_split(ddf: dd.DataFrame, val_fraction: float, seed: int) -> dd.DataFrame:
    """``ddf -> ddf`` with a boolean validation flag column."""

    def _split(df: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        return split_partition(df, val_fraction, seed, partition_info["number"] if partition_info else 0)

    meta = ddf._meta.assign(**{SPLIT_COL: pd.Series([], dtype=bool)})
    return ddf.map_partitions(_split, meta=meta)


def encoded_columns(schema: TableSchema) -> list[str]:
    """Names of the model's input columns: numeric features, then one-hot ``col=category``."""
    out: list[str] = []
    for c in schema.features:
        if c.kind == "numeric":
            out.append(c.name)
        else:
            out.extend(f"{c.name}={cat}" for cat in c.categories)
    return out


def encode_partition(df: pd.DataFrame, schema: TableSchema) -> pd.DataFrame:
    """Features to float32 model columns (categoricals one-hot; an unseen category is all zeros;
    a null stays null in every column of its feature)."""
    cols: dict[str, Any] = {}
    for c in schema.features:
        if c.kind == "numeric":
            cols[c.name] = df[c.name].to_numpy(dtype="float32", na_value=np.nan)
        else:
            values = df[c.name]
            null = values.isna().to_numpy()
            for cat in c.categories:
                # fillna first: pandas' Arrow-backed strings compare to a nullable boolean.
                onehot = values.eq(cat).fillna(False).to_numpy(dtype=bool).astype("float32")
                onehot[null] = np.nan
                cols[f"{c.name}={cat}"] = onehot
    out = pd.DataFrame(cols, index=df.index)
    carry = [x for x in (schema.id, schema.label) if x and x in df.columns]
    for x in carry:
        out[x] = df[x]
    if SPLIT_COL in df.columns:
        out[SPLIT_COL] = df[SPLIT_COL]
    return out


def unseen_categories(df: pd.DataFrame, schema: TableSchema, max_examples: int = 3) -> dict[str, list]:
    """{column: [count, examples]} of categorical values not seen at fit time (encoded as all zeros)."""
    out: dict[str, list] = {}
    for c in schema.categorical:
        values = df[c.name]
        bad = values.notna() & ~values.isin(c.categories)
        if bad.any():
            out[c.name] = [int(bad.sum()), sorted(map(str, values[bad].unique()))[:max_examples]]
    return out


def _partition_categories(df: pd.DataFrame, columns: list[str], cap: int) -> dict[str, list[str]]:
    # Capped so that a high-cardinality column costs O(cap) memory per partition, not O(rows).
    return {c: sorted(map(str, df[c].dropna().unique()))[: cap + 1] for c in columns}


def collect_categories(source: TableSource, max_categories: int = 100) -> TableSource:
    """Categories of every categorical feature over the whole input (one Dask pass).

    Unique values per partition are merged on the client and sorted, so the
    one-hot layout is deterministic. A no-op when no feature is categorical.

    Raises:
        InputError: a column has more than ``max_categories`` distinct values.
    """
    columns = [c.name for c in source.schema.categorical]
    if not columns:
        return source
    parts = to_dask(source).to_delayed()
    found = dask.compute(*[dask.delayed(_partition_categories)(p, columns, max_categories) for p in parts])
    merged: dict[str, tuple[str, ...]] = {}
    for c in columns:
        values = sorted(set().union(*(f[c] for f in found)))
        if len(values) > max_categories:
            raise InputError(
                f"{source.uri}: categorical column {c!r} has more than {max_categories} distinct values "
                f"(e.g. {values[:3]}); pass it as --id-column, --exclude it, or raise "
                f"--set preprocess.max_categories=N"
            )
        if not values:
            raise InputError(f"{source.uri}: categorical column {c!r} is entirely null")
        merged[c] = tuple(values)
    from tasks.load import with_schema

    return with_schema(source, source.schema.with_categories(merged))


def partition_moments(df: pd.DataFrame, columns: list[str]) -> dict[str, np.ndarray | int]:
    """Mergeable per-column moments of the training rows, plus row counts."""
    train = df[~df[SPLIT_COL]] if SPLIT_COL in df.columns else df
    x = train[columns].to_numpy(dtype="float64", na_value=np.nan)
    ok = ~np.isnan(x)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(ok, x, 0.0).sum(axis=0)
        mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
        m2 = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0)
    big = np.finfo("float64").max
    return {
        "n": n.astype("int64"),
        "mean": mean,
        "m2": m2,
        "min": np.where(ok, x, big).min(axis=0, initial=big),
        "max": np.where(ok, x, -big).max(axis=0, initial=-big),
        "nonnull_all": df[columns].notna().to_numpy().sum(axis=0).astype("int64"),
        "rows": len(df),
        "val_rows": int(df[SPLIT_COL].sum()) if SPLIT_COL in df.columns else 0,
    }


def merge_moments(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Chan et al.'s pairwise merge: exact mean and variance from partition moments."""
    acc = None
    for p in parts:
        if acc is None:
            acc = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
            continue
        n_a, n_b = acc["n"], p["n"]
        n = n_a + n_b
        delta = p["mean"] - acc["mean"]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
        acc["mean"] = acc["mean"] + delta * frac
        acc["m2"] = acc["m2"] + p["m2"] + delta**2 * n_a * frac
        acc["n"] = n
        acc["min"] = np.minimum(acc["min"], p["min"])
        acc["max"] = np.maximum(acc["max"], p["max"])
        acc["nonnull_all"] = acc["nonnull_all"] + p["nonnull_all"]
        acc["rows"] += p["rows"]
        acc["val_rows"] += p["val_rows"]
        for col, (count, examples) in p.get("unseen", {}).items():
            have = acc.setdefault("unseen", {}).setdefault(col, [0, []])
            have[0] += count
            have[1] = sorted(set(have[1]) | set(examples))[:3]
    if acc is None:
        raise ValueError("no partitions")
    return acc


@dataclass(frozen=True)
class ScalingStats:
    """Per-column statistics of the training rows and the affine map they define."""

    columns: tuple[str, ...]
    scaler: str
    count: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]
    onehot: tuple[bool, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_moments(cls, columns: list[str], mom: dict[str, Any], scaler: str, onehot: list[bool]) -> ScalingStats:
        n = mom["n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.where(n > 1, mom["m2"] / np.maximum(n - 1, 1), 0.0))
        mn = np.where(n > 0, mom["min"], 0.0)
        mx = np.where(n > 0, mom["max"], 0.0)
        return cls(
            tuple(columns),
            scaler,
            tuple(int(v) for v in n),
            tuple(float(v) for v in mom["mean"]),
            tuple(float(v) for v in std),
            tuple(float(v) for v in mn),
            tuple(float(v) for v in mx),
            tuple(onehot),
        )

    def offset_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``x_scaled = (x - offset) / scale``; one-hot columns and constant columns pass through."""
        k = len(self.columns)
        if self.scaler == "none":
            return np.zeros(k, "float32"), np.ones(k, "float32")
        if self.scaler == "standard":
            offset, scale = np.array(self.mean), np.array(self.std)
        else:
            offset, scale = np.array(self.min), np.array(self.max) - np.array(self.min)
        scale = np.where(scale > 1e-12, scale, 1.0)
        oh = np.array(self.onehot or [False] * k, dtype=bool)
        offset = np.where(oh, 0.0, offset)
        scale = np.where(oh, 1.0, scale)
        return offset.astype("float32"), scale.astype("float32")

    def transform(self, x: np.ndarray) -> np.ndarray:
        offset, scale = self.offset_scale()
        return ((x - offset) / scale).astype("float32", copy=False)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        offset, scale = self.offset_scale()
        return (x * scale + offset).astype("float64", copy=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingStats:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def scale(ddf: dd.DataFrame, stats: ScalingStats) -> dd.DataFrame:
    """``ddf -> ddf``: apply the scaling to the encoded feature columns."""
    cols = list(stats.columns)

    def _scale(df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        out[cols] = stats.transform(df[cols].to_numpy(dtype="float32"))
        return out

    return ddf.map_partitions(_scale, meta=ddf._meta)


# ---------------------------------------------------------------------------------------
# The one pass


def _process_partition(df: pd.DataFrame, schema: TableSchema, out_uri: str | None, columns: list[str]) -> dict[str, Any]:
    enc = encode_partition(df, schema)
    mom = partition_moments(enc, columns)
    mom["unseen"] = unseen_categories(df, schema)
    if out_uri is not None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(enc, preserve_index=False), buf)
        write_uri(out_uri, buf.getvalue())  # atomic; an outage is one StorageError line
    return mom


MIN_TRAIN_ROWS = 8
"""Fewest training rows (after the validation split) a table model is trained on."""


def check_training_rows(uri: str, rows: int, val_rows: int, val_fraction: float) -> None:
    """Refuse a training table too small to train and validate on (e.g. a single row).

    Raises:
        InputError: fewer than :data:`MIN_TRAIN_ROWS` training rows, or no validation row
            although ``val_fraction`` asks for some; the message gives the minimum.
    """
    train_rows = rows - val_rows
    if train_rows >= MIN_TRAIN_ROWS and (val_rows >= 1 or val_fraction == 0):
        return
    raise InputError(
        f"{uri}: too few rows to train and validate on: {rows} row(s) split into {train_rows} for training and "
        f"{val_rows} held out for validation (val_fraction {val_fraction:g}); training needs at least "
        f"{MIN_TRAIN_ROWS} training rows" + (" and 1 validation row" if val_fraction > 0 else "")
        + ": add rows" + (" or change --val-fraction" if val_fraction > 0 else "")
    )


@dataclass(frozen=True)
class PreparedTable:
    """Preprocessed partitions of one input, in input order, and how to scale them."""

    source_uri: str
    parts: tuple[str, ...]
    columns: tuple[str, ...]
    stats: ScalingStats
    n_rows: int
    n_val: int
    id_column: str | None
    label_column: str | None
    nonnull: tuple[int, ...] = ()
    # {column: [rows, example values]} of categories not seen at fit time (encoded as all-zero one-hot).
    unseen: dict[str, list] = field(default_factory=dict)

    @property
    def unseen_warnings(self) -> list[str]:
        return [
            f"{self.source_uri}: column {col!r} has {n} value(s) of categories not seen at fit time "
            f"(e.g. {ex}); encoded as all-zero one-hot"
            for col, (n, ex) in self.unseen.items()
        ]

    @property
    def n_train(self) -> int:
        return self.n_rows - self.n_val


def prepare(
    source: TableSource,
    cfg: PreprocessConfig,
    *,
    run: RunDir | None,
    prefix: str = "preprocessed",
    stats: ScalingStats | None = None,
    split: bool = True,
) -> PreparedTable:
    """Validate, split, encode and write ``source`` in one Dask pass.

    Args:
        source: An inspected input.
        cfg: Scaler, validation share and split seed.
        run: Where to write partitions (None: validate and summarise only).
        prefix: Folder of the run that receives the partitions.
        stats: Scaling fitted earlier (``--model``/apply data); None fits it here.
        split: Flag validation rows (False for data that is only applied to).

    Raises:
        InputError: from validation of any partition, or when there are no rows.
    """
    schema = source.schema
    columns = encoded_columns(schema)
    ddf = to_dask(source)
    if split:
        ddf = add_split(ddf, cfg.val_fraction, cfg.split_seed)
    parts = ddf.to_delayed()
    out_uris = [f"{run.uri_of(prefix)}/part.{i:05d}.parquet" for i in range(len(parts))] if run else [None] * len(parts)
    if run is not None:
        run.makedirs(prefix)
    tasks = [
        dask.delayed(_process_partition)(p, schema, u, columns)
        for p, u in zip(parts, out_uris, strict=True)
    ]
    moments = list(dask.compute(*tasks))
    mom = merge_moments(moments)
    if mom["rows"] == 0:
        raise InputError(f"{source.uri}: no data rows")
    onehot = ["=" in c and c not in schema.feature_names for c in columns]
    if stats is None:
        check_training_rows(source.uri, int(mom["rows"]), int(mom["val_rows"]), cfg.val_fraction if split else 0.0)
        stats = ScalingStats.from_moments(columns, mom, cfg.scaler, onehot)
    prepared = PreparedTable(
        source_uri=source.uri,
        parts=tuple(u for u in out_uris if u),
        columns=tuple(columns),
        stats=stats,
        n_rows=int(mom["rows"]),
        n_val=int(mom["val_rows"]),
        id_column=schema.id,
        label_column=schema.label if schema.label in source.columns else None,
        nonnull=tuple(int(v) for v in mom["nonnull_all"]),
        unseen=dict(mom.get("unseen", {})),
    )
    if run is not None:
        run.write_json(f"{prefix}/stats.json", {"stats": stats.to_dict(), "n_rows": prepared.n_rows, "n_val": prepared.n_val})
    return prepared


def read_prepared(prep: PreparedTable, *, split: str = "all", scaled: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Read partitions back: (features as float32 [scaled], side table with id/label/split).

    Args:
        split: ``"all"`` (input order), ``"train"`` or ``"val"``.
    """
    xs, sides = [], []
    for uri in prep.parts:
        df = pq.read_table(io.BytesIO(read_uri(uri))).to_pandas()
        if split != "all" and SPLIT_COL in df.columns:
            mask = df[SPLIT_COL].to_numpy() if split == "val" else ~df[SPLIT_COL].to_numpy()
            df = df[mask]
        xs.append(df[list(prep.columns)].to_numpy(dtype="float32", na_value=np.nan))
        sides.append(df.drop(columns=list(prep.columns)))
    x = np.concatenate(xs) if xs else np.zeros((0, len(prep.columns)), "float32")
    side = pd.concat(sides, ignore_index=True) if sides else pd.DataFrame()
    if scaled:
        x = prep.stats.transform(x)
    return x, side


# ---------------------------------------------------------------------------------------
# Prefect task


@task(name="categories", **IO_TASK)
def categories_task(source: TableSource, cfg: PreprocessConfig) -> TableSource:
    """Prefect task over :func:`collect_categories`."""
    return collect_categories(source, cfg.max_categories)


@task(name="preprocess", task_run_name="preprocess-{prefix}", **IO_TASK)
def prepare_task(
    source: TableSource,
    cfg: PreprocessConfig,
    run: RunDir,
    prefix: str = "preprocessed",
    stats: ScalingStats | None = None,
    split: bool = True,
) -> PreparedTable:
    """Prefect task over :func:`prepare` (validation errors are not retried)."""
    return prepare(source, cfg, run=run, prefix=prefix, stats=stats, split=split)
