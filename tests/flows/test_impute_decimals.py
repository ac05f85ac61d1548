"""impute gives a Parquet decimal column back as decimal (money stays money).

It came back as float64 with filled cells like 51.483409 in a decimal(10, 2) price column, and
observed values went through float64 (exact only up to ~15 digits).
"""

from __future__ import annotations

import decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = [pytest.mark.cli]
runner = CliRunner()
PRICE = pa.decimal128(20, 2)


def _part(path, start, n, seed):
    """Rows of a table; the second part (seed 1) has no missing price: it too must come back decimal."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = a * 2 + rng.normal(scale=0.1, size=n)
    # 18 significant digits: more than float64 carries, so a trip through float would change them
    price = [None if i % 6 == 0 and seed == 0 else decimal.Decimal(f"1234567890123456.{int(abs(x) * 100) % 100:02d}")
             if i % 11 == 0 else decimal.Decimal(f"{50 + 10 * x:.2f}") for i, x in enumerate(a)]
    table = pa.table({"id": np.arange(start, start + n), "a": a, "b": b, "price": pa.array(price, type=PRICE)})
    pq.write_table(table, path)
    return table


def test_decimal_column_stays_decimal(prefect_server, dask_address, tmp_path):
    data = tmp_path / "sales"
    data.mkdir()
    inputs = [_part(data / "part-0.parquet", 0, 150, 0), _part(data / "part-1.parquet", 150, 150, 1)]
    res = runner.invoke(app, ["run", "impute", "--input", str(data), "--id-column", "id", "--epochs", "2",
                              "--output", str(tmp_path / "out"), "--dask-address", dask_address, "--json"])
    assert res.exit_code == 0, res.output
    (folder,) = (tmp_path / "out" / "runs" / "impute").iterdir()
    out = pq.read_table(folder / "imputed.parquet")  # every part in one schema: the column's own type
    assert out.schema.field("price").type == PRICE
    got = dict(zip(out.column("id").to_pylist(), out.column("price").to_pylist(), strict=True))
    original = pa.concat_tables(inputs)
    observed = {i: p for i, p in zip(original.column("id").to_pylist(), original.column("price").to_pylist(),
                                     strict=True) if p is not None}
    assert len(got) == 300 and all(v is not None for v in got.values())
    assert all(got[i] == p for i, p in observed.items()), "an observed decimal changed"
    filled = [got[i] for i in got if i not in observed]
    assert len(filled) == 25 and all(v.as_tuple().exponent == -2 for v in filled)
