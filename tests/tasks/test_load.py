"""Validated loading: good input accepted, bad input rejected with a message naming file, column, value."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.config import LoadConfig
from tasks.errors import InputError, ModelMismatchError
from tasks.load import inspect_table, read_block, to_dask

pytestmark = pytest.mark.tasks


def _load(**kw) -> LoadConfig:
    return LoadConfig(**kw)


def _frame(n=50, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("abcd"))
    df.insert(0, "id", np.arange(n))
    df["y"] = rng.integers(0, 3, n)
    return df


def test_csv_folder_glob_and_parquet_agree(tmp_path):
    df = _frame(90)
    (tmp_path / "csv").mkdir()
    (tmp_path / "pq").mkdir()
    for i, part in enumerate(df.iloc[j : j + 30] for j in (0, 30, 60)):
        part.to_csv(tmp_path / "csv" / f"part{i}.csv", index=False)
        part.to_parquet(tmp_path / "pq" / f"part{i}.parquet", index=False)
    load = _load(label_column="y", id_column="id")
    frames = []
    for uri in (str(tmp_path / "csv"), str(tmp_path / "csv" / "*.csv"), str(tmp_path / "pq")):
        src = inspect_table(uri, load)
        assert len(src.files) == 3 and all(f.hash.startswith("sha256:") for f in src.files)
        assert src.schema.feature_names == list("abcd")
        frames.append(to_dask(src).compute(scheduler="sync").reset_index(drop=True))
    for f in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], f)
    assert frames[0]["id"].tolist() == list(range(90)), "input order is kept"


def test_large_csv_is_split_into_blocks_in_order(tmp_path):
    df = _frame(5000)
    path = tmp_path / "big.csv"
    df.to_csv(path, index=False)
    src = inspect_table(str(path), _load(id_column="id"))
    assert src.n_partitions == 1
    # a tiny block size forces several byte-range partitions
    from dataclasses import replace

    from tasks.load import Block

    size = path.stat().st_size
    blocks = tuple(Block(str(path), "csv", i, o, min(40_000, size - o), (), 0 if o == 0 else None) for i, o in enumerate(range(0, size, 40_000)))
    src = replace(src, blocks=blocks)
    got = to_dask(src).compute(scheduler="sync").reset_index(drop=True)
    assert len(blocks) > 5
    assert got["id"].tolist() == list(range(5000))
    np.testing.assert_allclose(got[list("abcd")].to_numpy(), df[list("abcd")].to_numpy())


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda df: df.assign(b=df["b"].astype(object).where(df.index != 7, "oops")), "column 'b' has non-numeric values: 'oops' at line 9"),
        (lambda df: df.assign(c=np.where(df.index == 3, np.inf, df["c"])), "column 'c' has infinite values"),
        (lambda df: df.assign(d=np.where(df.index % 5 == 0, np.nan, df["d"])), "column 'd' has null values"),
        (lambda df: df.assign(a=np.nan), "column 'a' is entirely null"),
    ],
)
def test_bad_values_name_file_column_and_value(tmp_path, mutate, needle):
    path = tmp_path / "bad.csv"
    mutate(_frame()).to_csv(path, index=False)
    src = inspect_table(str(path), _load(label_column="y", id_column="id"))
    with pytest.raises(InputError) as e:
        read_block(src.blocks[0], src.schema, src.columns)
    assert str(path) in str(e.value)
    assert needle in str(e.value)


def test_nulls_allowed_when_the_app_allows_them(tmp_path):
    path = tmp_path / "nulls.csv"
    _frame().assign(d=lambda d: np.where(d.index % 5 == 0, np.nan, d["d"])).to_csv(path, index=False)
    src = inspect_table(str(path), _load(id_column="id"), allow_nulls=True)
    got = read_block(src.blocks[0], src.schema, src.columns)
    assert got["d"].isna().sum() == 10


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_text("a,b,c\n"), "has a header but no data rows"),
        (lambda p: p.with_suffix(".parquet").write_bytes(b"PAR1garbage"), "not a readable Parquet file"),
    ],
)
def test_file_level_errors(tmp_path, setup, needle):
    path = tmp_path / "in.csv"
    setup(path)
    uri = str(path.with_suffix(".parquet")) if "Parquet" in needle else str(path)
    with pytest.raises(InputError, match=None) as e:
        inspect_table(uri, _load())
    assert needle in str(e.value)


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """On a platform worker a relative input is the worker's project directory, not the object store:
    the message names the directory and the host (found by the eighth walkthrough: a nightly schedule's
    data/daily/DATE/*.csv failed with only 'no CSV or Parquet files found at data/daily/...')."""
    import socket

    monkeypatch.chdir(tmp_path)
    (tmp_path / "daily").mkdir()
    for uri in ("daily/missing.csv", "daily/*.csv"):
        with pytest.raises(InputError) as e:
            inspect_table(uri, _load())
        assert f"(a relative path, read from {tmp_path} on {socket.gethostname()})" in str(e.value), str(e.value)
    with pytest.raises(InputError) as e:
        inspect_table(str(tmp_path / "daily" / "missing.csv"), _load())
    assert "relative path" not in str(e.value), "an absolute path needs no note"


def test_unknown_columns_and_role_errors(tmp_path):
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(InputError, match="label column 'nope' not found in .*t.csv; its columns are: id, a, b"):
        inspect_table(str(path), _load(label_column="nope"))
    with pytest.raises(InputError, match="id column 'ident' not found"):
        inspect_table(str(path), _load(id_column="ident"))
    with pytest.raises(InputError, match="both the label and the id"):
        inspect_table(str(path), _load(label_column="id", id_column="id"))


def test_folder_with_different_columns(tmp_path):
    _frame().to_csv(tmp_path / "a.csv", index=False)
    _frame().rename(columns={"d": "e"}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(InputError, match=r"b.csv has different columns from .*a.csv: missing \['d'\], extra \['e'\]"):
        inspect_table(str(tmp_path), _load())


def test_schema_mismatch_names_missing_and_extra(tmp_path):
    _frame().to_csv(tmp_path / "train.csv", index=False)
    _frame().drop(columns=["c"]).assign(z=1.0).to_csv(tmp_path / "new.csv", index=False)
    schema = inspect_table(str(tmp_path / "train.csv"), _load(id_column="id", label_column="y")).schema
    with pytest.raises(ModelMismatchError, match=r"missing \['c'\] .*; it has \['z'\], which the model was trained without"):
        inspect_table(str(tmp_path / "new.csv"), _load(), schema=schema, role="apply-to")
    # the label may be absent in data the model is applied to
    _frame().drop(columns=["y"]).to_csv(tmp_path / "nolabel.csv", index=False)
    src = inspect_table(str(tmp_path / "nolabel.csv"), _load(), schema=schema)
    assert "y" not in read_block(src.blocks[0], src.schema, src.columns).columns


def test_missing_bucket(s3_endpoint):
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        inspect_table("s3://no-such-bucket/raw/data.csv", _load())


def test_s3_input_reads(s3fs_client, tmp_path):
    from tests.conftest import TEST_BUCKET

    df = _frame(30)
    with s3fs_client.open(f"{TEST_BUCKET}/load/one.parquet", "wb") as f:
        df.to_parquet(f, index=False)
    src = inspect_table(f"s3://{TEST_BUCKET}/load/", _load(id_column="id"))
    assert src.files[0].path == f"s3://{TEST_BUCKET}/load/one.parquet"
    got = to_dask(src).compute(scheduler="sync")
    assert got["id"].tolist() == list(range(30))
