"""Tables as users have them (found by walking through the CLI with awkward files): each is read
correctly or refused with one message naming the file, the column and what to do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.apps import get_app
from tasks.config import ConfigError, LoadConfig, resolve_config
from tasks.errors import InputError
from tasks.load import inspect_table, to_dask
from tasks.scaling import ScalingStats, merge_moments, partition_moments
from tests.refusals import assert_raised, refusal

pytestmark = pytest.mark.tasks


def _frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    df.insert(0, "id", np.arange(n))
    return df


def _read(uri, **load):
    return to_dask(inspect_table(uri, LoadConfig(**load))).compute(scheduler="sync").reset_index(drop=True)


@refusal("a CSV column without a name in the header (pandas' index) given no role (--exclude or --id-column it)", 3,
         "table")
def test_a_csv_with_pandas_index_needs_a_role_for_its_unnamed_column(tmp_path):
    df = _frame()
    df.to_csv(tmp_path / "t.csv")  # pandas' default: the row index, in a column without a name
    with pytest.raises(InputError, match=r"column 1 has no name.*--exclude 'Unnamed: 0'") as e:
        inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))
    assert_raised(e.value, test_a_csv_with_pandas_index_needs_a_role_for_its_unnamed_column)
    got = _read(str(tmp_path / "t.csv"), id_column="id", exclude_columns=("Unnamed: 0",))
    pd.testing.assert_frame_equal(got, df, check_dtype=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_files_of_a_glob_with_their_columns_in_another_order(tmp_path, fmt):
    df = _frame()
    first, second = df.iloc[:30], df.iloc[30:][["c", "id", "b", "a"]]
    for name, part in (("p0", first), ("p1", second)):
        getattr(part, f"to_{fmt}")(tmp_path / f"{name}.{fmt}", index=False)
    ddf = to_dask(inspect_table(str(tmp_path / f"*.{fmt}"), LoadConfig(id_column="id")))
    parts = [p.compute(scheduler="sync") for p in ddf.to_delayed()]
    assert [list(p.columns) for p in parts] == [list(ddf.columns)] * 2  # as Dask's metadata says (it refused otherwise)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), df, check_dtype=False)


@refusal("a semicolon-, tab- or pipe-separated file (aeflow reads comma-separated CSV)", 3, "table")
def test_a_semicolon_separated_file_is_refused_by_name(tmp_path):
    _frame().to_csv(tmp_path / "s.csv", sep=";", index=False)
    with pytest.raises(InputError, match=r"s\.csv: the header line is one column.*semicolon-separated") as e:
        inspect_table(str(tmp_path / "s.csv"), LoadConfig())
    assert_raised(e.value, test_a_semicolon_separated_file_is_refused_by_name)


def test_header_names_with_spaces_after_the_commas(tmp_path):
    df = _frame()
    (tmp_path / "sp.csv").write_text(df.to_csv(index=False).replace(",", ", "))
    got = _read(str(tmp_path / "sp.csv"), id_column="id")
    assert list(got.columns) == ["id", "a", "b", "c"]
    np.testing.assert_allclose(got[["a", "b", "c"]].to_numpy(), df[["a", "b", "c"]].to_numpy())


@refusal("a Parquet list, struct or map column that is not excluded", 3, "table")
def test_list_and_struct_columns_are_refused_unless_excluded(tmp_path):
    t = pa.Table.from_pandas(_frame(), preserve_index=False)
    t = t.append_column("tags", pa.array([[1, 2]] * t.num_rows))
    pq.write_table(t, tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"column 'tags' holds list<.*--exclude 'tags'") as e:
        inspect_table(str(tmp_path / "n.parquet"), LoadConfig(id_column="id"))
    assert_raised(e.value, test_list_and_struct_columns_are_refused_unless_excluded)
    assert list(_read(str(tmp_path / "n.parquet"), id_column="id", exclude_columns=("tags",)).columns) == ["id", "a", "b", "c"]


@refusal("a value beyond float32's range (±3.4e38; the message names the line)", 3, "table")
def test_values_beyond_float32_are_refused_with_their_line(tmp_path):
    df = _frame()
    df.loc[7, "b"] = 1e308  # finite in float64, inf in the models' float32
    df.to_csv(tmp_path / "big.csv", index=False)
    with pytest.raises(InputError, match=r"big\.csv: column 'b' has values beyond the range of the 32-bit.*1e\+308 at line 9") as e:
        _read(str(tmp_path / "big.csv"), id_column="id")
    assert_raised(e.value, test_values_beyond_float32_are_refused_with_their_line)


def test_a_validation_value_far_outside_the_training_rows_is_found():
    df = _frame(200)
    df["__aeflow_val"] = np.arange(200) % 5 == 0
    df.loc[10, "b"] = 1e20  # a validation row: the training rows' scale cannot hold it
    mom = merge_moments([partition_moments(df.iloc[:100], ["a", "b", "c"]), partition_moments(df.iloc[100:], ["a", "b", "c"])])
    stats = ScalingStats.from_moments(["a", "b", "c"], mom, "standard", [False] * 3)
    far = stats.extremes(mom["lo_all"], mom["hi_all"])
    assert [(name, value) for name, value, _ in far] == [("b", 1e20)] and far[0][2] > 1e19
    df.loc[10, "b"] = 50.0  # far, but learnable
    mom = merge_moments([partition_moments(df, ["a", "b", "c"])])
    assert ScalingStats.from_moments(["a", "b", "c"], mom, "standard", [False] * 3).extremes(mom["lo_all"], mom["hi_all"]) == []


@pytest.mark.parametrize("app, options, needle", [
    ("reduce", {"train.seed": -5}, "train.seed"),
    ("reduce", {"load.id_column": "id", "load.exclude_columns": ["id"]}, "'id' is the id_column and also in exclude_columns"),
    # it was exit 3 (input), found once the data had been read, beside --exclude's exit 2 for the same contradiction
    ("detect", {"load.label_column": "label", "load.id_column": "label"},
     "'label' is both the label_column and the id_column"),
    ("reduce", {"run_id": "../escape"}, "run_id"),
    ("reduce", {"run_id": "latest"}, "'latest' is what --model latest means"),
    ("reduce", {"model.hidden": "64,x"}, "hidden expects comma-separated integers"),
    ("detect", {"app.threshold": "nan"}, "app.threshold"),
])
@refusal("settings that contradict each other or are not values (--exclude of the --id-column, one column as "
         "--label-column and --id-column, a negative --seed, "
         "a --run-id that is not a name, --threshold nan)", 2, "configuration")
def test_settings_refused_before_any_work(app, options, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        resolve_config(get_app(app).RunConfig, options={"load.input": "x.csv", **options})
    assert_raised(e.value, test_settings_refused_before_any_work)
