"""Validated loading: good input accepted, bad input rejected with a message naming file, column, value."""

from __future__ import annotations

from dataclasses import replace

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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


@pytest.mark.parametrize("ext,compress", [(".csv.bz2", "bz2"), (".csv.xz", "lzma")])
def test_bzip2_and_xz_compressed_csv_read_as_the_plain_csv(tmp_path, ext, compress):
    # they were "unknown file type; ... or pass --format", and --format csv read the compressed bytes as text
    import importlib

    df = _frame(3000)
    raw = df.to_csv(index=False).encode()
    (tmp_path / "plain.csv").write_bytes(raw)
    packed = importlib.import_module(compress).compress(raw)
    (tmp_path / f"t{ext}").write_bytes(packed)
    (tmp_path / "named.csv").write_bytes(packed)  # by content too, whatever the name says
    want = to_dask(inspect_table(str(tmp_path / "plain.csv"), _load(id_column="id"))).compute(scheduler="sync")
    for name in (f"t{ext}", "named.csv"):
        src = inspect_table(str(tmp_path / name), _load(id_column="id"))
        assert src.n_partitions == 1  # a compressed stream is not split by byte ranges
        pd.testing.assert_frame_equal(to_dask(src).compute(scheduler="sync"), want)
    # damaged past the rows sampled at the door: one message naming the file, when its block is read
    (tmp_path / f"late{ext}").write_bytes(importlib.import_module(compress).compress(_frame(60_000).to_csv(
        index=False).encode())[:-2000])
    with pytest.raises(InputError, match=rf"late{ext}: the file is truncated or corrupted"):
        src = inspect_table(str(tmp_path / f"late{ext}"), _load(id_column="id"))
        to_dask(src).compute(scheduler="sync")


@pytest.mark.parametrize("name", ["t.csv.zip", "t.csv", "t.zst"])
def test_a_zip_or_zstd_file_is_refused_by_name(tmp_path, name):
    import zipfile

    path = tmp_path / name
    if name.endswith(".zst"):
        path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 64)
        what = "zstd-compressed"
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("t.csv", _frame().to_csv(index=False))
        what = "a zip archive"
    with pytest.raises(InputError) as e:
        inspect_table(str(path), _load(id_column="id"))
    assert f"{path} is {what}, which is not read: extract the table, or compress a CSV with gzip" in str(e.value)


def _quoted_breaks(n: int, first: int, seed: int = 9) -> pd.DataFrame:
    """Rows whose text field holds a line break (quoted by to_csv) from row ``first`` on, in every other row."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 10)).round(5), columns=[f"v{i}" for i in range(10)])
    df.insert(0, "id", np.arange(n))
    text = rng.choice(["alpha beta", "gamma", 'delta, "q" x'], n).astype(object)
    text[first::2] = [f"line one {i}\nline, two\r\n\"three\"" for i in range(first, n, 2)]
    df["txt"] = text
    return df


def test_quoted_line_breaks_are_not_cut_by_the_partitions(tmp_path):
    # a CSV over load.blocksize_mb with line breaks inside quoted fields was refused ("line 16439 has 1 field but
    # the header names 12 columns"): its byte-range partitions started and ended inside records
    df = _quoted_breaks(30_000, first=0)
    path = tmp_path / "notes.csv"
    df.to_csv(path, index=False)
    assert path.stat().st_size > 3 << 20
    src = inspect_table(str(path), _load(id_column="id", blocksize_mb=1))
    assert src.n_partitions >= 3 and all(b.exact for b in src.blocks[:-1])
    got = to_dask(src).compute(scheduler="sync").reset_index(drop=True)
    assert got["id"].tolist() == list(range(30_000))
    assert got["txt"].tolist() == df["txt"].tolist()
    np.testing.assert_allclose(got[[f"v{i}" for i in range(10)]].to_numpy(), df[[f"v{i}" for i in range(10)]])


def test_quoted_line_breaks_only_past_the_sample_are_named_with_what_to_do(tmp_path):
    path = tmp_path / "late.csv"
    _quoted_breaks(30_000, first=3000).to_csv(path, index=False)
    src = inspect_table(str(path), _load(id_column="id", blocksize_mb=1))
    assert src.n_partitions >= 3 and not any(b.exact for b in src.blocks)
    with pytest.raises(InputError) as e:
        to_dask(src).compute(scheduler="sync")
    assert str(path) in str(e.value)
    assert "if a quoted field past the first 2000 rows holds a line break" in str(e.value)
    assert "set load.blocksize_mb above the file's size" in str(e.value)
    # as the message says: in one piece, it reads
    src = inspect_table(str(path), _load(id_column="id", blocksize_mb=8))
    assert to_dask(src).compute(scheduler="sync")["id"].tolist() == list(range(30_000))


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


def test_nulls_in_every_column_of_a_wide_table_are_one_short_message(tmp_path):
    """14 columns with nulls were ~2,000 characters, "(use the impute application ...)" once per column: the hint
    now comes once, and past 6 entries the rest are named, not spelled out."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(40, 14)), columns=[f"c{i}" for i in range(14)])
    for i in range(14):
        df.loc[[i, i + 20], f"c{i}"] = np.nan
    path = tmp_path / "wide.csv"
    df.to_csv(path, index=False)
    src = inspect_table(str(path), _load())
    with pytest.raises(InputError) as e:
        read_block(src.blocks[0], src.schema, src.columns)
    msg = str(e.value)
    assert msg.startswith(f"{path}: column 'c0' has null values: null at line 2, null at line 22; "), msg
    assert msg.count("use the impute application") == 1 and msg.endswith("for data with missing values)"), msg
    assert "column 'c4' has null values: null at line 6, null at line 26; and 9 more (columns 'c5', 'c6'" in msg, msg
    assert "'c13')" in msg and "column 'c5'" not in msg and len(msg) < 600, (len(msg), msg)
    # one column: its values and the hint, as before
    df.iloc[:, :13].fillna(0).assign(c13=df["c13"]).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"column 'c13' has null values: null at line 15, null at line 35 \(use the "
                                         r"impute application for data with missing values\)$"):
        read_block(*(lambda s: (s.blocks[0], s.schema, s.columns))(inspect_table(str(path), _load())))


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
    # one column as label and id: the settings contradict each other, refused before any file is read (exit 2)
    with pytest.raises(ValueError, match="'id' is both the label_column and the id_column"):
        _load(label_column="id", id_column="id")


def test_folder_with_different_columns(tmp_path):
    _frame().to_csv(tmp_path / "a.csv", index=False)
    _frame().rename(columns={"d": "e"}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(InputError, match=r"b.csv has different columns from .*a.csv: missing \['d'\], extra \['e'\]"):
        inspect_table(str(tmp_path), _load())


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("later", [True, False], ids=["added-later", "dropped-later"])
def test_files_of_one_input_may_differ_in_excluded_columns(tmp_path, fmt, later):
    """A column added in a later file (or dropped from one) was refused as "different columns" even when
    --exclude'd, and the message did not say that excluding it was the way out."""
    df = _frame(60)
    parts = [df.iloc[:30], df.iloc[30:].assign(notes="n")] if later else [df.iloc[:30].assign(notes="n"), df.iloc[30:]]
    for i, part in enumerate(parts):
        getattr(part[list(reversed(part.columns))] if i else part, f"to_{fmt}")(tmp_path / f"p{i}.{fmt}", index=False)
    with pytest.raises(InputError, match=r"p1\.\w+ has different columns from .*p0\.\w+: (missing|extra) \['notes'\]; "
                                         r"the files of one input must have the same columns, apart from --exclude'd "
                                         r"ones \(e\.g\. --exclude 'notes' to leave it out of every file\)"):
        inspect_table(str(tmp_path), _load(id_column="id"))
    src = inspect_table(str(tmp_path), _load(id_column="id", exclude_columns=("notes",)))
    assert src.schema.feature_names == list("abcdy")
    got = to_dask(src).compute(scheduler="sync")
    assert list(got.columns) == ["id", *"abcdy"]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), df.astype({c: "float64" for c in "abcdy"}),
                                  check_dtype=False)


def test_a_trailing_comma_on_every_line_is_named_as_such(tmp_path):
    """An export whose lines end with a separator (here also with a BOM, quoted numbers and CRLF) has an unnamed
    last column: the message said "pandas writes its row index that way; write the file with index=False"."""
    df = _frame(20)
    lines = ['"id","a","b","c","d","y",'] + [",".join(f'"{v}"' for v in row) + "," for row in df.astype(str).values]
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    with pytest.raises(InputError, match=r"t\.csv: the last column \(7\) has no name in the header line \(do the "
                                         r"lines end with a comma, as some exports write them\?\): --exclude "
                                         r"'Unnamed: 6' to leave it out") as e:
        inspect_table(str(tmp_path / "t.csv"), _load(id_column="id"))
    assert "index" not in str(e.value)
    src = inspect_table(str(tmp_path / "t.csv"), _load(id_column="id", exclude_columns=("Unnamed: 6",)))
    got = to_dask(src).compute(scheduler="sync").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, df, check_dtype=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_booleans_with_nulls_are_booleans_not_categories(tmp_path, fmt):
    """A boolean column with missing values (object True/False/None as pandas reads it from Parquet or CSV)
    became a categorical of 'False'/'True', and impute gave it back as text."""
    from tasks.apps.impute import _restore_dtype

    df = _frame(20).assign(flag=pd.array([None if i % 5 == 0 else bool(i % 2) for i in range(20)], dtype="boolean"))
    if fmt == "csv":
        df.to_csv(tmp_path / "t.csv", index=False)
    else:  # as Spark, DuckDB or pyarrow write it: no pandas metadata, so pandas reads object True/False/None
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None), tmp_path / "t.parquet")
    src = inspect_table(str(tmp_path / f"t.{fmt}"), _load(id_column="id"))
    flag = next(c for c in src.schema.features if c.name == "flag")
    assert flag.kind == "numeric" and flag.categories == ()
    assert src.schema.extra["dtypes"]["flag"] == "boolean"
    got = to_dask(replace(src, schema=src.schema.with_nulls(True))).compute(scheduler="sync")["flag"]
    assert got.tolist()[:4] == [pytest.approx(np.nan, nan_ok=True), 1.0, 0.0, 1.0]
    assert _restore_dtype(got.fillna(1.0), "boolean").dtype == "boolean"


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


def test_a_wide_model_names_the_missing_column_without_listing_every_feature(tmp_path):
    """Data lacking one of a 150-column model's features: the message listed all 150 expected features."""
    wide = pd.DataFrame(np.ones((12, 150)), columns=[f"x{i}" for i in range(150)])
    wide.to_parquet(tmp_path / "train.parquet", index=False)
    wide.drop(columns=["x140"]).to_parquet(tmp_path / "new.parquet", index=False)
    schema = inspect_table(str(tmp_path / "train.parquet"), _load()).schema
    with pytest.raises(ModelMismatchError) as e:
        inspect_table(str(tmp_path / "new.parquet"), _load(), schema=schema, role="apply-to")
    assert str(e.value).endswith(
        "does not have the columns the model was trained on: missing ['x140'] (expected features 150: "
        f"{str([f'x{i}' for i in range(20)])[:-1]}, …])")


def test_a_comma_separated_exclude_says_to_give_one_per_column(tmp_path):
    """`--exclude ts,flag` (as `--hidden 256,128` is written) named one column 'ts,flag': "not found ... (did you
    mean 'flag'?)", which suggested excluding only one of them."""
    _frame().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError) as e:
        inspect_table(str(tmp_path / "t.csv"), _load(exclude_columns=("a, b",)))
    assert str(e.value) == (f"excluded column 'a, b' not found in {tmp_path}/t.csv: give --exclude once per column: "
                            "--exclude 'a' --exclude 'b' (in a --config file: exclude_columns: [a, b])")
    with pytest.raises(InputError, match="; its columns are: id, a, b"):  # not all of them columns: the usual hint
        inspect_table(str(tmp_path / "t.csv"), _load(exclude_columns=("a,zz",)))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_text_column_empty_in_the_sampled_rows(tmp_path, fmt):
    """A sparse text column (a promotion code, empty in the first 2,000 rows): taken as numeric for want of a
    sampled value, it was refused with "non-numeric values: 'spring'" and no reason, also as Parquet, whose
    column type says it is text."""
    from tasks.load import SAMPLE_ROWS
    from tasks.preprocess import collect_categories

    n = SAMPLE_ROWS + 100
    df = _frame(n).assign(promo=[None] * (n - 10) + ["spring", "fall"] * 5)
    getattr(df, f"to_{fmt}")(tmp_path / f"t.{fmt}", index=False)
    src = inspect_table(str(tmp_path / f"t.{fmt}"), _load(id_column="id"))
    src = replace(src, schema=src.schema.with_nulls(True))  # as impute reads it
    promo = next(c for c in src.schema.features if c.name == "promo")
    if fmt == "parquet":
        assert promo.kind == "categorical"
        with dask.config.set(scheduler="synchronous"):  # no cluster here (another test may have left one configured)
            found = collect_categories(src)
        assert next(c for c in found.schema.features if c.name == "promo").categories == ("fall", "spring")
        return
    assert promo.kind == "numeric"  # a CSV column without a sampled value reads as float: nothing says it is text
    with pytest.raises(InputError) as e:
        to_dask(src).compute(scheduler="sync")
    assert f"column 'promo' has non-numeric values: 'spring' at line {n - 10 + 2}" in str(e.value)
    assert ("(the rows sampled at the start of the input held no value in this column, so it was taken as numeric: "
            "a text column must have values there, e.g. sort the rows or write the input as Parquet, which records "
            "text columns as text; or --exclude 'promo')") in str(e.value)


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
