"""An eleventh walkthrough, of the tabular apps' ids and inputs: a CSV's ids are carried as written (00042 was
carried as 42, and 042 and 42 became one id), in every block and when a model is applied; text in a numeric
column of a glob's short first file is named by file, line and value (it made the column categorical, and the
numbers of the next files its "more than 100 distinct values"); --id-column with a --model whose id column has
another name is refused naming the model's id column (it was ignored, and the id reported as a missing column)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import LoadConfig
from tasks.errors import InputError, ModelMismatchError
from tasks.load import SAMPLE_ROWS, inspect_table, to_dask
from tasks.preprocess import collect_categories
from tests.refusals import assert_raised, refusal

runner = CliRunner()


def _table(ids, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(len(ids), 4)), columns=list("abcd"))
    df.insert(0, "id", ids)
    return df


def _ids(uri: str, **load) -> tuple[str | None, list]:
    src = inspect_table(uri, LoadConfig(**load))
    return src.schema.id_dtype, to_dask(src).compute(scheduler="sync")["id"].tolist()


@pytest.mark.cli
def test_csv_ids_with_leading_zeros_reach_the_outputs_as_written(prefect_server, dask_address, tmp_path):
    ids = ["042", "42", "00107", "7"] + [f"{i:05d}" for i in range(60)]
    _table(ids).to_csv(tmp_path / "t.csv", index=False)
    res = runner.invoke(app, ["run", "reduce", "--input", str(tmp_path / "t.csv"), "--id-column", "id", "--output",
                              str(tmp_path / "out"), "--dask-address", dask_address, "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    assert pd.read_parquet(f"{run}/embeddings.parquet")["id"].tolist() == ids


def test_csv_ids_that_numbers_would_change_are_text_in_every_block(tmp_path):
    # ids zero-padded, over a file of several 1 MiB blocks: later blocks are read by byte range, without the header
    n = 30_000
    written = [f"{i:07d}" for i in range(n)]
    _table(written).to_csv(tmp_path / "big.csv", index=False)
    src = inspect_table(str(tmp_path / "big.csv"), LoadConfig(id_column="id", blocksize_mb=1))
    assert src.n_partitions > 1 and src.schema.id_dtype == "str"
    assert to_dask(src).compute(scheduler="sync")["id"].tolist() == written
    # other numbers that would not give an id back as written; plain integer ids stay integers
    for ids in (["+5", "6", "7"], ["1e3", "2", "3"], ["1.50", "2.5", "3.5"]):
        _table(ids).to_csv(tmp_path / "t.csv", index=False)
        assert _ids(str(tmp_path / "t.csv"), id_column="id") == ("str", ids)
    _table([5, 42, 107]).to_csv(tmp_path / "t.csv", index=False)
    assert _ids(str(tmp_path / "t.csv"), id_column="id") == ("int64", [5, 42, 107])


def test_a_model_applied_to_csv_ids_with_leading_zeros_keeps_them(tmp_path):
    _table(list(range(50))).to_csv(tmp_path / "train.csv", index=False)  # trained with integer ids
    schema = inspect_table(str(tmp_path / "train.csv"), LoadConfig(id_column="id")).schema
    assert schema.id_dtype == "int64"
    new = [f"{i:05d}" for i in range(1, 30)]
    _table(new, seed=1).to_csv(tmp_path / "new.csv", index=False)
    src = inspect_table(str(tmp_path / "new.csv"), LoadConfig(), schema=schema, role="apply-to")
    assert src.schema.id_dtype == "str"
    assert to_dask(src).compute(scheduler="sync")["id"].tolist() == new


@refusal("CSV ids that a number would change (00042) only past the sampled rows of an --id-column read as "
         "numbers (the message names the line)", 3, "table")
def test_csv_ids_that_numbers_would_change_past_the_sample_are_refused(tmp_path):
    n = 30_000
    ids = [str(i) for i in range(n)]
    late = n - 10  # in the file's last block, read by byte range
    ids[late] = f"000{late}"
    _table(ids).to_csv(tmp_path / "big.csv", index=False)
    src = inspect_table(str(tmp_path / "big.csv"), LoadConfig(id_column="id", blocksize_mb=1))
    assert src.n_partitions > 1 and src.schema.id_dtype == "int64" and late > SAMPLE_ROWS
    with pytest.raises(InputError) as e:
        to_dask(src).compute(scheduler="sync")
    assert_raised(e.value, test_csv_ids_that_numbers_would_change_past_the_sample_are_refused,
                  f"big.csv: id column 'id' has ids that would change as numbers: {ids[late]!r} at line {late + 2}",
                  "write the input as Parquet with the id column as text")


def test_text_in_a_numeric_column_of_a_short_first_file_is_named(tmp_path):
    """The sample was the first file's rows alone: its 'abc' made f0 categorical, and the next file's numbers
    were refused as "more than 100 distinct values" of it. One file of the same rows names the value."""
    rng = np.random.default_rng(0)
    first = pd.DataFrame({"f0": ["abc"], "f1": [0.5], "f2": [1.5]})
    second = pd.DataFrame(rng.normal(size=(300, 3)), columns=["f0", "f1", "f2"])
    (tmp_path / "in").mkdir()
    first.to_csv(tmp_path / "in" / "a.csv", index=False)
    second.to_csv(tmp_path / "in" / "b.csv", index=False)
    pd.concat([first, second]).to_csv(tmp_path / "one.csv", index=False)

    def message(uri: str) -> str:
        with pytest.raises(InputError) as e:
            src = collect_categories(inspect_table(uri, LoadConfig()))  # as a run does before validating
            to_dask(src).compute(scheduler="sync")
        return str(e.value)

    single = message(str(tmp_path / "one.csv"))
    assert "non-numeric values: 'abc' at line 2" in single
    assert message(str(tmp_path / "in")) == single.replace(str(tmp_path / "one.csv"), str(tmp_path / "in" / "a.csv"))


@refusal("--id-column naming another column than the --model's id column (it cannot rename it)", 2, "configuration")
def test_id_column_other_than_the_models_is_refused_naming_it(tmp_path):
    from tasks.config import ConfigError

    _table(list(range(40))).to_csv(tmp_path / "train.csv", index=False)
    schema = inspect_table(str(tmp_path / "train.csv"), LoadConfig(id_column="id")).schema
    _table(list(range(40)), seed=1).rename(columns={"id": "key"}).to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(ConfigError) as e:
        inspect_table(str(tmp_path / "new.csv"), LoadConfig(id_column="key"), schema=schema, role="apply-to")
    assert_raised(e.value, test_id_column_other_than_the_models_is_refused_naming_it,
                  "--id-column 'key': the model's id column is 'id'", "--id-column cannot rename it")
    # without --id-column: the missing column is said to be the model's id column, not taken for a feature
    with pytest.raises(ModelMismatchError, match=re.escape("missing ['id'] ('id' is the model's id column; expected "
                                                           "features ['a', 'b', 'c', 'd'])")):
        inspect_table(str(tmp_path / "new.csv"), LoadConfig(), schema=schema, role="apply-to")
