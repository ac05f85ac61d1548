"""Dask-parallel preprocessing of tables: split, encode, scaling statistics, partitions on storage.

One pass over the data on the Dask cluster: every partition is parsed and
validated (``tasks.load``), given its deterministic train/validation flag,
encoded to float32 features, summarised into mergeable moments, and written as
``preprocessed/part.NNNNN.parquet`` in the run directory. The scaling
statistics are merged from the per-partition moments on the client
(``tasks/scaling.py``), stored in ``preprocessed/stats.json`` and applied when the
partitions are read back: memory stays bounded by the partition size, whatever
the size of the input.

The ``ddf -> ddf`` and ``DataFrame -> DataFrame`` functions here are pure and
tested without Prefect.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.config import PreprocessConfig
from tasks.dask_client import compute_settled
from tasks.errors import InputError
from tasks.load import TableSource, to_dask
from tasks.prefect_utils import IO_TASK
from tasks.scaling import SPLIT_COL, ScalingStats, merge_moments, partition_moments
from tasks.schemas import TableSchema
from tasks.storage import RunDir, read_uri, write_uri

__all__ = ["SPLIT_COL", "PreparedTable", "ScalingStats", "prepare", "prepare_task", "read_prepared"]


# ---------------------------------------------------------------------------------------
# Pure functions


def split_partition(df: pd.DataFrame, val_fraction: float, seed: int, partition: int) -> pd.DataFrame:
    """Flag validation rows with a generator seeded by (seed, partition): deterministic."""
    rng = np.random.default_rng([seed, partition])
    return _with_column(df, SPLIT_COL, rng.random(len(df)) < val_fraction)


def _with_column(df: pd.DataFrame, name: str, values: Any) -> pd.DataFrame:
    """``df.assign(name=values)`` without pandas' PerformanceWarning on a wide table (a block per column, as
    validation leaves it), which reached the user's terminal."""
    return pd.concat([df, pd.Series(values, index=df.index, name=name)], axis=1)


def add_split(ddf: dd.DataFrame, val_fraction: float, seed: int) -> dd.DataFrame:
    """``ddf -> ddf`` with a boolean validation flag column."""

    def _split(df: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        return split_partition(df, val_fraction, seed, partition_info["number"] if partition_info else 0)

    meta = _with_column(ddf._meta, SPLIT_COL, pd.Series([], dtype=bool))
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
    found = compute_settled(*[dask.delayed(_partition_categories)(p, columns, max_categories) for p in parts],
                            progress=f"{source.shown}: categories of {', '.join(columns[:3])}"
                                     + (f" and {len(columns) - 3} more" if len(columns) > 3 else ""))
    merged: dict[str, tuple[str, ...]] = {}
    for c in columns:
        values = sorted(set().union(*(f[c] for f in found)))
        if len(values) > max_categories:
            raise InputError(
                f"{source.shown}: categorical column {c!r} has more than {max_categories} distinct values "
                f"(e.g. {values[:3]}); pass it as --id-column, --exclude it, or raise "
                f"--set preprocess.max_categories=N"
            )
        if not values:
            raise InputError(f"{source.shown}: categorical column {c!r} is entirely null: there is no value to learn "
                             f"it from; --exclude '{c}'")
        merged[c] = tuple(values)
    from tasks.load import with_schema

    return with_schema(source, source.schema.with_categories(merged))


# ---------------------------------------------------------------------------------------
# The one pass


def dtype_misfits(df: pd.DataFrame, schema: TableSchema) -> dict[str, float]:
    """{column: first value} of numeric features whose values do not fit the integer or boolean dtype the
    column was read with at fit time (``schema.extra["dtypes"]``): a fraction (45.5) in an integer column, or
    a value other than 0/1 in a boolean one. A glob's later file may hold floats where the sampled first file
    held integers, and data applied to a model may too; giving such a column back in its fit-time dtype
    (impute) would round observed values."""
    dtypes = schema.extra.get("dtypes", {})
    out: dict[str, float] = {}
    for c in schema.features:
        dtype = str(dtypes.get(c.name, "")).lower()
        boolean = dtype in ("bool", "boolean")
        if c.kind != "numeric" or c.name not in df.columns or not (boolean or dtype.startswith(("int", "uint"))):
            continue
        x = df[c.name].to_numpy(dtype="float64", na_value=np.nan)
        x = x[~np.isnan(x)]
        bad = (x != np.round(x)) | (((x != 0) & (x != 1)) if boolean else False)
        if bad.any():
            out[c.name] = float(x[bad][0])
    return out


def _process_partition(df: pd.DataFrame, schema: TableSchema, out_uri: str | None, columns: list[str]) -> dict[str, Any]:
    enc = encode_partition(df, schema)
    mom = partition_moments(enc, columns)
    mom["unseen"] = unseen_categories(df, schema)
    mom["misfit"] = dtype_misfits(df, schema)
    if out_uri is not None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(enc, preserve_index=False), buf)
        write_uri(out_uri, buf.getvalue())  # atomic; an outage is one StorageError line
    return mom


ID_BUCKETS = 32  # at most: the id counts are split by hash into this many independent reductions


def _id_buckets(df: pd.DataFrame, column: str, buckets: int) -> tuple[pd.Series, ...]:
    """One partition's ids, split by their hash into ``buckets`` parts (equal ids land in the same part)."""
    ids = df[column]
    which = pd.util.hash_pandas_object(ids, index=False).to_numpy() % np.uint64(buckets)
    return tuple(ids[which == b] for b in range(buckets))


def _bucket_repeats(parts: list[pd.Series]) -> tuple:
    """(ids on more than one row, rows they are on, the most repeated id, its rows) in one hash bucket."""
    counts = pd.concat(parts, ignore_index=True).value_counts(sort=False) if parts else pd.Series([], dtype="int64")
    repeated = counts[counts > 1]
    if not len(repeated):
        return ()
    top = repeated.idxmax()
    return len(repeated), int(repeated.sum()), top.item() if hasattr(top, "item") else top, int(repeated.max())


def _merge_repeats(found: list[tuple]) -> tuple:
    found = [f for f in found if f]
    if not found:
        return ()
    example = max(found, key=lambda f: f[3])
    return sum(f[0] for f in found), sum(f[1] for f in found), example[2], example[3]


def duplicate_ids(parts: list[Any], column: str) -> Any:
    """A delayed ``(ids on more than one row, rows they are on, the most repeated id, its rows)``, or ``()``
    when every id is unique, over the delayed (parsed, validated) partitions ``parts``.

    Computed in the same compute (``compute_settled``) as the partitions' own tasks, it reads nothing again. Each
    partition's ids are split by hash into up to :data:`ID_BUCKETS` parts and each bucket is counted on
    its own, so no one task holds every id. A hand-made shuffle: Dask's ``value_counts(split_out=True)``
    added 12-31% to the preprocessing of 2M rows (64 columns, 16 partitions); this stays within the
    noise of the same measurement (with/without 0.67-0.91x, on a busy 2-core machine).
    """
    buckets = max(1, min(ID_BUCKETS, len(parts)))
    split = [dask.delayed(_id_buckets, nout=buckets)(p, column, buckets) for p in parts]
    per_bucket = [dask.delayed(_bucket_repeats)([s[b] for s in split]) for b in range(buckets)]
    return dask.delayed(_merge_repeats)(per_bucket)


MIN_TRAIN_ROWS = 8
"""Fewest training rows (after the validation split) a table model is trained on."""


def check_training_rows(uri: str, rows: int, val_rows: int, val_fraction: float) -> None:
    """Refuse a training table too small to train and validate on (e.g. a single row).

    Raises:
        InputError: fewer than :data:`MIN_TRAIN_ROWS` training rows, or no validation row
            although ``val_fraction`` asks for some; the message gives the fewest rows needed, and
            suggests another ``--val-fraction`` only when one can help.
    """
    train_rows = rows - val_rows
    if train_rows >= MIN_TRAIN_ROWS and (val_rows >= 1 or val_fraction == 0):
        return
    validates = val_fraction > 0
    least = MIN_TRAIN_ROWS + validates
    head = (
        f"{uri}: too few rows to train and validate on: {rows} row(s) split into {train_rows} for training and "
        f"{val_rows} held out for validation (val_fraction {val_fraction:g}); training needs at least "
        f"{MIN_TRAIN_ROWS} training rows" + (" and 1 validation row" if validates else "")
    )
    if rows < least:  # no --val-fraction makes up for rows the table does not have
        raise InputError(f"{head}, so at least {least} rows: add rows")
    # Enough rows, but the random split left too few on one side: each row is held out with probability
    # val_fraction, so about max(8 / (1 - f), 1 / f) rows are needed to expect both sides filled.
    typical = max(math.ceil(MIN_TRAIN_ROWS / (1 - val_fraction)), math.ceil(1 / val_fraction))
    expect = f" (about {typical} rows are needed at val_fraction {val_fraction:g})" if rows < typical else ""
    raise InputError(
        f"{head}: each row is held out at random{expect}: add rows, change --val-fraction, "
        f"or try another split with --set preprocess.split_seed=N"
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
    # (ids on more than one row, rows they are on, an example, its rows): () when ids are unique or absent.
    duplicate_ids: tuple = ()
    # Columns of data a model is applied to that it was trained without: left out (TableSource.ignored).
    ignored: tuple[str, ...] = ()
    # {column: first value} of features whose values do not fit their fit-time integer/boolean dtype (dtype_misfits).
    misfit: dict[str, float] = field(default_factory=dict)

    @property
    def unseen_warnings(self) -> list[str]:
        return [
            f"{self.source_uri}: column {col!r} has {n} value(s) of categories not seen at fit time "
            f"(e.g. {ex}); encoded as all-zero one-hot"
            for col, (n, ex) in self.unseen.items()
        ]

    @property
    def input_warnings(self) -> list[str]:
        """What a run takes from this table with a caveat: columns left out, ids on more than one row.

        Duplicate ids are a warning, not a refusal: every output has one row per input row in input
        order, so nothing is lost or mixed up, but the ids alone cannot tell those rows apart.
        """
        out = []
        if self.ignored:
            out.append(f"{self.source_uri}: column(s) {list(self.ignored)} left out: the model was trained "
                       "without them")
        if self.duplicate_ids:
            n, rows, example, count = self.duplicate_ids
            out.append(f"{self.source_uri}: id column {self.id_column!r} has {n} value(s) on more than one row "
                       f"({rows} rows; e.g. {example!r} on {count} rows): the outputs carry it, so those rows match "
                       "their input rows by position (outputs keep the input's order), not by id")
        return out

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
    dups = duplicate_ids(parts, schema.id) if schema.id else ()
    # one pass: the id counts share the parsed partitions
    *moments, repeated = compute_settled(*tasks, dups, progress=f"{source.shown}: validating, "
                                         + ("splitting, " if split else "") + "encoding" + (" and writing" if run else ""),
                                         progress_parts=len(tasks))
    misfit: dict[str, float] = {}
    for m in moments:  # the first value in input order
        for name, value in m.pop("misfit").items():
            misfit.setdefault(name, value)
    mom = merge_moments(moments)
    if mom["rows"] == 0:
        raise InputError(f"{source.shown}: no data rows")
    onehot = ["=" in c and c not in schema.feature_names for c in columns]
    if stats is None:
        check_training_rows(source.shown, int(mom["rows"]), int(mom["val_rows"]), cfg.val_fraction if split else 0.0)
        stats = ScalingStats.from_moments(columns, mom, cfg.scaler, onehot)
        far = stats.extremes(mom["lo_all"], mom["hi_all"])
        if far:
            name, value, z = far[0]
            unit = "standard deviations" if cfg.scaler == "standard" else "ranges"
            raise InputError(
                f"{source.shown}: column {name!r} has the value {value:.6g}, {abs(z):.3g} {unit} of the training rows "
                f"from their {'mean' if cfg.scaler == 'standard' else 'minimum'}: the autoencoder cannot learn from "
                f"it (its squared error overflows); a placeholder or an error? Remove those rows, or --exclude the column"
                + (f" (also {', '.join(repr(f[0]) for f in far[1:4])})" if len(far) > 1 else "")
            )
    prepared = PreparedTable(
        source_uri=source.shown,
        parts=tuple(u for u in out_uris if u),
        columns=tuple(columns),
        stats=stats,
        n_rows=int(mom["rows"]),
        n_val=int(mom["val_rows"]),
        id_column=schema.id,
        label_column=schema.label if schema.label in source.columns else None,
        nonnull=tuple(int(v) for v in mom["nonnull_all"]),
        unseen=dict(mom.get("unseen", {})),
        duplicate_ids=tuple(repeated),
        ignored=source.ignored,
        misfit=misfit,
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
