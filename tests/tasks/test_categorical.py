"""Categorical columns: inference, categories over the whole input, encoding, unseen values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.config import LoadConfig
from tasks.errors import InputError
from tasks.load import inspect_table
from tasks.preprocess import (
    collect_categories,
    encode_partition,
    encoded_columns,
    unseen_categories,
)
from tasks.schemas import infer_schema

pytestmark = [pytest.mark.tasks, pytest.mark.tabular]


def _mixed(n=40):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "id": range(n),
        "x": rng.normal(size=n),
        "color": rng.choice(["red", "green"], n),
        "code": rng.integers(0, 3, n),  # integers stay numeric
        "label": rng.integers(0, 2, n),
    })


def test_text_columns_are_categorical_but_a_stray_string_is_not():
    df = _mixed()
    stray = df.assign(x=df["x"].astype(object))
    stray.loc[3, "x"] = "twelve"
    schema = infer_schema(stray, label="label", id_column="id", exclude=(), allow_nulls=False, source="t.csv")
    kinds = {c.name: c.kind for c in schema.features}
    assert kinds == {"x": "numeric", "color": "categorical", "code": "numeric"}
    assert schema.extra["dtypes"]["color"] in ("object", "str")  # pandas 2 / pandas 3


def test_categories_come_from_the_whole_input(tmp_path, dask_address):
    from distributed import Client

    # The sample (first rows) sees only red/green; "blue" appears in a later file.
    (tmp_path / "in").mkdir()
    _mixed().to_parquet(tmp_path / "in" / "a.parquet", index=False)
    _mixed().assign(color="blue").to_parquet(tmp_path / "in" / "b.parquet", index=False)
    src = inspect_table(str(tmp_path / "in"), LoadConfig(id_column="id", label_column="label"))
    assert src.schema.categorical[0].categories == ()
    with Client(dask_address):  # the Dask pass runs on the session's real LocalCluster
        src = collect_categories(src, max_categories=10)
    assert src.schema.categorical[0].categories == ("blue", "green", "red")
    assert encoded_columns(src.schema) == ["x", "color=blue", "color=green", "color=red", "code"]


def test_too_many_categories_is_a_clear_error(tmp_path, dask_address, monkeypatch):
    """...naming the file by its absolute path when it was given relative (it said `t.csv: categorical ...`, where
    the messages about one of its lines say `/abs/t.csv: ...`)."""
    from distributed import Client

    df = _mixed().assign(color=[f"c{i}" for i in range(40)])
    df.to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.chdir(tmp_path)
    src = inspect_table("t.csv", LoadConfig())
    assert src.uri == "t.csv" and src.shown == str(tmp_path / "t.csv"), "the input as given; shown absolute"
    with Client(dask_address), pytest.raises(InputError) as e:
        collect_categories(src, max_categories=10)
    assert str(e.value).startswith(f"{tmp_path / 't.csv'}: categorical column 'color' has more than 10 distinct values")


def test_unseen_category_encodes_as_zeros_and_is_counted():
    df = _mixed(6)
    schema = infer_schema(df, label="label", id_column="id", exclude=(), allow_nulls=True, source="t")
    schema = schema.with_categories({"color": ("green", "red")})
    new = df.assign(color=["red", "purple", None, "green", "purple", "red"])
    enc = encode_partition(new, schema)
    np.testing.assert_array_equal(enc["color=red"].to_numpy()[[0, 1, 3]], [1, 0, 0])
    assert enc.loc[1, ["color=green", "color=red"]].tolist() == [0, 0], "unseen: all-zero one-hot"
    assert enc.loc[2, ["color=green", "color=red"]].isna().all(), "null stays null"
    assert unseen_categories(new, schema) == {"color": [2, ["purple"]]}
