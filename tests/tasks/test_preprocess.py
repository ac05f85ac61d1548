"""Dask preprocessing on a real LocalCluster equals a pandas reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tasks.config import LoadConfig, PreprocessConfig
from tasks.errors import InputError
from tasks.load import Block, inspect_table, to_dask
from tasks.preprocess import add_split, prepare, read_prepared, split_partition
from tasks.scaling import (
    SPLIT_COL,
    ScalingStats,
    merge_moments,
    partition_moments,
    scale,
)
from tasks.storage import ArtifactStore

pytestmark = pytest.mark.tasks


@pytest.fixture
def client(dask_address):
    from distributed import Client

    with Client(dask_address) as c:
        yield c


def _table(tmp_path, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(loc=5, scale=[1, 2, 3, 4], size=(n, 4)), columns=list("abcd"))
    df.insert(0, "id", np.arange(n))
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return df, path


def _split_blocks(src, path, step=20_000):
    size = path.stat().st_size
    return replace(
        src,
        blocks=tuple(
            Block(str(path), "csv", i, o, min(step, size - o), (), 0 if o == 0 else None)
            for i, o in enumerate(range(0, size, step))
        ),
    )


@pytest.mark.parametrize("scaler", ["standard", "minmax"])
def test_prepare_on_cluster_equals_pandas_reference(client, tmp_path, scaler):
    df, path = _table(tmp_path)
    src = _split_blocks(inspect_table(str(path), LoadConfig(id_column="id")), path)
    assert src.n_partitions > 4
    cfg = PreprocessConfig(scaler=scaler, val_fraction=0.25, split_seed=1)
    run = ArtifactStore(str(tmp_path / "art")).start_run("reduce", "0" * 64, {})
    prep = prepare(src, cfg, run=run)
    assert len(prep.parts) == src.n_partitions

    # Reference: the same split flags, then plain pandas statistics on the training rows.
    flags = np.concatenate(
        [split_partition(to_dask(src).get_partition(i).compute(), 0.25, 1, i)[SPLIT_COL].to_numpy() for i in range(src.n_partitions)]
    )
    # Features are stored as float32; statistics are accumulated in float64 from those values.
    train = df.loc[~flags, list("abcd")].astype("float32").astype("float64")
    if scaler == "standard":
        ref = (df[list("abcd")] - train.mean()) / train.std(ddof=1)
        np.testing.assert_allclose(prep.stats.mean, train.mean().to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(prep.stats.std, train.std(ddof=1).to_numpy(), rtol=1e-10)
    else:
        ref = (df[list("abcd")] - train.min()) / (train.max() - train.min())
    x, side = read_prepared(prep)
    assert side["id"].tolist() == list(range(len(df))), "partitions come back in input order"
    np.testing.assert_allclose(x, ref.to_numpy(dtype="float32"), rtol=1e-5, atol=1e-5)
    assert prep.n_rows == len(df) and prep.n_val == int(flags.sum())
    assert abs(prep.n_val / len(df) - 0.25) < 0.03
    xv, sv = read_prepared(prep, split="val")
    assert sv["id"].tolist() == df["id"][flags].tolist()
    assert run.exists("preprocessed/stats.json")


def test_split_is_deterministic_and_seeded(client, tmp_path):
    _, path = _table(tmp_path, n=500)
    src = inspect_table(str(path), LoadConfig(id_column="id"))
    ddf = to_dask(src)
    a = add_split(ddf, 0.3, 7).compute()[SPLIT_COL].to_numpy()
    b = add_split(ddf, 0.3, 7).compute()[SPLIT_COL].to_numpy()
    c = add_split(ddf, 0.3, 8).compute()[SPLIT_COL].to_numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_scale_ddf_matches_stats_transform(client, tmp_path):
    df, path = _table(tmp_path, n=400)
    src = inspect_table(str(path), LoadConfig(id_column="id"))
    mom = merge_moments([partition_moments(df, list("abcd"))])
    stats = ScalingStats.from_moments(list("abcd"), mom, "standard", [False] * 4)
    got = scale(to_dask(src), stats).compute()
    np.testing.assert_allclose(got[list("abcd")].to_numpy(), ((df[list("abcd")] - df[list("abcd")].mean()) / df[list("abcd")].std()).to_numpy(), rtol=1e-4, atol=1e-5)


def test_merge_moments_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(1000, 3))
    parts = [pd.DataFrame(p, columns=list("xyz")) for p in np.array_split(x, 7)]
    mom = merge_moments([partition_moments(p, list("xyz")) for p in parts])
    np.testing.assert_allclose(mom["mean"], x.mean(0))
    np.testing.assert_allclose(mom["m2"] / (len(x) - 1), x.var(0, ddof=1))
    np.testing.assert_allclose(mom["min"], x.min(0))
    assert mom["rows"] == 1000


def test_validation_error_surfaces_from_worker(client, tmp_path):
    df, path = _table(tmp_path, n=3000)
    df.loc[2500, "c"] = np.inf
    df.to_csv(path, index=False)
    src = _split_blocks(inspect_table(str(path), LoadConfig(id_column="id")), path)
    # Deep in the file, in a later byte block: the message names the file's own line (row 2500 + header).
    with pytest.raises(InputError, match=r"t.csv: column 'c' has infinite values: inf at line 2502$"):
        prepare(src, PreprocessConfig(), run=None)


def test_bounded_reads_of_a_prepared_table(client, tmp_path):
    """What evaluation reads instead of the whole table: partitions one at a time, and seeded samples
    that are capped, reproducible, and the whole split in input order when it is small enough."""
    import torch

    from tasks.apps.kinds import TableContext
    from tasks.apps.reduce import ReduceRunConfig

    df, path = _table(tmp_path)
    src = _split_blocks(inspect_table(str(path), LoadConfig(id_column="id")), path)
    run = ArtifactStore(str(tmp_path / "art")).start_run("reduce", "1" * 64, {})
    prep = prepare(src, PreprocessConfig(val_fraction=0.25, split_seed=1), run=run)
    ctx = TableContext(config=ReduceRunConfig(), run=run, device=torch.device("cpu"), train=prep, target=prep)
    all_x, all_side = read_prepared(prep)
    val_x, val_side = read_prepared(prep, split="val")
    parts = list(ctx.parts("train", "val"))
    assert len(parts) == len(prep.parts) > 4
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), val_x)
    assert ctx.count("train", "val") == len(val_x) and ctx.count("train", "train") == len(all_x) - len(val_x)
    x, side, total = ctx.sample("train", "val", 10_000, seed=3)
    assert total == len(val_x) and side["id"].tolist() == val_side["id"].tolist(), "all of it, in order"
    x, side, total = ctx.sample("target", "all", 500, seed=3)
    again, side2, _ = ctx.sample("target", "all", 500, seed=3)
    other, side3, _ = ctx.sample("target", "all", 500, seed=4)
    assert total == len(df)
    sizes = [len(ctx.sample("target", "all", 500, seed=s)[0]) for s in range(10)]
    assert sizes == [500] * 10, f"exactly the cap for every seed (a Bernoulli sample fell short of it): {sizes}"
    np.testing.assert_array_equal(x, again)
    assert side["id"].tolist() == side2["id"].tolist() != side3["id"].tolist()
    assert side["id"].is_monotonic_increasing
    np.testing.assert_array_equal(x, all_x[side["id"].to_numpy()])


def test_a_wide_table_is_prepared_without_pandas_performance_warnings(tmp_path):
    """150 float32 columns (validation leaves a block per column): the split column's assign warned
    "DataFrame is highly fragmented" on the user's terminal, twice per run."""
    import warnings

    import dask

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(50, 150)).astype("float32"), columns=[f"x{i}" for i in range(150)])
    df.to_parquet(tmp_path / "wide.parquet", index=False)
    src = inspect_table(str(tmp_path / "wide.parquet"), LoadConfig())
    with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        prep = prepare(src, PreprocessConfig(), run=None)
    assert prep.n_rows == 50 and 0 < prep.n_val < 50


def test_values_that_do_not_fit_the_fit_time_integer_or_boolean_dtype_are_found():
    from tasks.preprocess import dtype_misfits
    from tasks.schemas import infer_schema

    fit = pd.DataFrame({"n": [1, 2, 3], "flag": [True, False, True], "x": [0.5, 1.5, 2.5]})
    schema = infer_schema(fit, label=None, id_column=None, exclude=(), allow_nulls=True, source="t")
    assert dtype_misfits(fit.astype("float64"), schema) == {}
    later = pd.DataFrame({"n": [np.nan, 4.0, 4.5, 5.25], "flag": [1.0, 0.0, 2.0, 1.0], "x": [1.0, 2.0, 3.0, 4.0]})
    assert dtype_misfits(later, schema) == {"n": 4.5, "flag": 2.0}
