"""A CSV's float-looking ids are carried as written, as its integer-looking ones are (00042): when a number of
the column's type would write a sampled id back otherwise (2.50 as 2.5, 1e3 as 1000.0, 007.10 as 7.1, and 17
among floats as 17.0), the id column is read as text in every block, by every path (Dask partitions, training
streamed from the prepared partitions, --model applied to new data); one only past the sampled rows, in ids read
as float64, is refused with its file, column, line and value (it reached the outputs changed). Float ids that a
float64 writes back as written (2.5, 0.1, 1e-05) stay float64, from CSV and from Parquet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import LoadConfig
from tasks.load import SAMPLE_ROWS, inspect_table, to_dask
from tests.conftest import files_under
from tests.refusals import refusal

runner = CliRunner()
# 2.50, 1e3 and 007.10 past the sampled rows; 17 among them makes the sampled ids text (17.0 as a float)
CHANGED = ["2.50", "1e3", "007.10"]
ROUND_TRIP = ["0.1", "2.5", "-3.75", "1e-05", "0.0001", "17.0", "123.456"]


def _write(path, ids: list[str], seed: int = 0) -> str:
    """A CSV whose id column is exactly ``ids`` as written (to_csv would write floats its own way)."""
    x = np.random.default_rng(seed).normal(size=(len(ids), 4)).round(4)
    lines = ["id,a,b,c,d"] + [f"{i},{','.join(map(str, row))}" for i, row in zip(ids, x.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _floats(n: int, start: int = 0) -> list[str]:
    return [f"{i}.25" for i in range(start, start + n)]


def _run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["run", *args, "--epochs", "1", "--json"])
    return res.exit_code, res.output


def _out_ids(output: str, table: str) -> pd.Series:
    run = json.loads(output.strip().splitlines()[-1])["run_uri"]
    return pd.read_parquet(f"{run}/{table}.parquet")["id"]


@pytest.fixture(scope="module")
def float_model(prefect_server, dask_address, tmp_path_factory) -> str:
    """A reduce model trained with float ids that a float64 writes back as written (its schema: float64 ids)."""
    tmp = tmp_path_factory.mktemp("float_model")
    ids = ROUND_TRIP + _floats(60)
    code, out = _run("reduce", "--input", _write(tmp / "train.csv", ids), "--id-column", "id",
                     "--output", str(tmp / "out"), "--dask-address", dask_address)
    assert code == 0, out
    written = _out_ids(out, "embeddings")
    assert written.dtype == "float64" and [repr(v) for v in written] == ids, "round-tripping float ids stay float64"
    return json.loads(out.strip().splitlines()[-1])["run_uri"]


@pytest.mark.cli
def test_float_ids_reach_the_outputs_as_written(prefect_server, dask_address, tmp_path):
    # sampled ids: floats and one integer (17.0 as a float: text); 2.50, 1e3, 007.10 only past the sample
    ids = _floats(SAMPLE_ROWS + 50)
    ids[7] = "17"
    ids[-3:] = CHANGED
    csv = _write(tmp_path / "t.csv", ids)
    code, out = _run("reduce", "--input", csv, "--id-column", "id", "--output", str(tmp_path / "out"),
                     "--dask-address", dask_address, "--set", "train.stream=on")
    assert code == 0, out
    assert _out_ids(out, "embeddings").tolist() == ids


@pytest.mark.cli
def test_a_model_applied_to_float_ids_keeps_them_as_written(float_model, dask_address, tmp_path):
    ids = _floats(SAMPLE_ROWS + 50, start=1000)
    ids[3] = "3"
    ids[-3:] = CHANGED
    code, out = _run("reduce", "--model", float_model, "--apply-to", _write(tmp_path / "new.csv", ids, seed=1),
                     "--output", str(tmp_path / "out"), "--dask-address", dask_address)
    assert code == 0, out
    assert _out_ids(out, "embeddings").tolist() == ids


@refusal("CSV float ids that a float64 would write back otherwise (2.50, 007.10) only past the sampled rows of an "
         "--id-column read as floats (the message names the line and the number)", 3, "table")
@pytest.mark.cli
def test_a_float_id_that_a_number_would_change_past_the_sample_is_refused(float_model, dask_address, tmp_path):
    n = 30_000
    ids = _floats(n)
    late = n - 10  # in the file's last block, read by byte range without the header
    ids[late] = f"{late}.250"
    csv = _write(tmp_path / "big.csv", ids)
    src = inspect_table(csv, LoadConfig(id_column="id", blocksize_mb=1))
    assert src.n_partitions > 1 and src.schema.id_dtype == "float64" and late > SAMPLE_ROWS
    expected = (f"{csv}: id column 'id' has ids that would change as numbers: '{late}.250' at line {late + 2} "
                f"(as a number: {late}.25)")
    for args in (["--input", csv, "--id-column", "id"], ["--model", float_model, "--apply-to", csv]):
        out = tmp_path / "out"
        code, output = _run("reduce", *args, "--output", str(out), "--dask-address", dask_address,
                            "--set", "load.blocksize_mb=1")
        assert code == 3, output
        assert expected in " ".join(output.split()), output
        assert files_under(out) == [], "nothing is written"


def test_integer_ids_among_floats_are_text_in_every_file_of_a_glob(tmp_path):
    # one file of float ids, one of integers: read together, 17 would have been 17.0
    (tmp_path / "in").mkdir()
    a, b = ["2.5", "0.1", "1e-05"] * 5, ["17", "18", "3"] * 5
    _write(tmp_path / "in" / "a.csv", a)
    _write(tmp_path / "in" / "b.csv", b, seed=1)
    src = inspect_table(str(tmp_path / "in"), LoadConfig(id_column="id"))
    assert src.schema.id_dtype == "str"
    assert to_dask(src).compute(scheduler="sync")["id"].tolist() == a + b
    # the ids of one file: 2.50, 1e3, 007.10 and 3.0 beside 3 are text; integers alone stay int64
    for ids, dtype in ((CHANGED + ["3.5"], "str"), (["3.0", "3", "4.5"], "str"), (["17", "3", "42"], "int64")):
        csv = _write(tmp_path / "t.csv", ids)
        src = inspect_table(csv, LoadConfig(id_column="id"))
        got = to_dask(src).compute(scheduler="sync")["id"]
        assert (src.schema.id_dtype, got.astype(str).tolist()) == (dtype, ids)


def test_round_tripping_float_ids_stay_float64_from_csv_and_parquet(tmp_path):
    ids = ROUND_TRIP + _floats(20)
    src = inspect_table(_write(tmp_path / "t.csv", ids), LoadConfig(id_column="id"))
    got = to_dask(src).compute(scheduler="sync")["id"]
    assert src.schema.id_dtype == "float64" and got.dtype == "float64" and [repr(v) for v in got] == ids
    # Parquet is typed: float ids are float64 whatever text they came from (2.50 is the float 2.5 there)
    df = pd.read_csv(_write(tmp_path / "p.csv", ["2.50", "1e3", "0.1"] + _floats(20)))
    df.to_parquet(tmp_path / "t.parquet", index=False)
    src = inspect_table(str(tmp_path / "t.parquet"), LoadConfig(id_column="id"))
    got = to_dask(src).compute(scheduler="sync")["id"]
    assert src.schema.id_dtype == "float64" and got.dtype == "float64" and got.tolist() == df["id"].tolist()


def test_64_bit_hash_ids_past_int64_are_carried_as_uint64_from_csv_and_parquet(prefect_server, dask_address,
                                                                                 tmp_path):
    # 64-bit hash ids (>= 2**63) were refused: "column 'id' has values that are not int64: '10000000000000000000'"
    big = [str(2**64 - 1 - 7 * i) for i in range(40)] + [str(2**63 + i) for i in range(40)]
    csv = _write(tmp_path / "t.csv", big)
    pq_path = tmp_path / "t.parquet"
    pd.read_csv(csv, dtype={"id": "uint64"}).to_parquet(pq_path, index=False)
    for path in (csv, str(pq_path)):
        src = inspect_table(path, LoadConfig(id_column="id"))
        got = to_dask(src).compute(scheduler="sync")["id"]
        assert (src.schema.id_dtype, got.dtype, got.astype(str).tolist()) == ("uint64", "uint64", big)
    code, out = _run("reduce", "--input", csv, "--id-column", "id", "--output", str(tmp_path / "out"),
                     "--dask-address", dask_address)
    assert code == 0, out
    written = _out_ids(out, "embeddings")
    assert written.dtype == "uint64" and written.astype(str).tolist() == big
    # the model applied to the Parquet file: its ids as they are
    code, out = _run("reduce", "--model", json.loads(out.strip().splitlines()[-1])["run_uri"], "--apply-to",
                     str(pq_path), "--id-column", "id", "--output", str(tmp_path / "out"), "--dask-address",
                     dask_address)
    assert code == 0, out
    assert _out_ids(out, "embeddings").astype(str).tolist() == big
