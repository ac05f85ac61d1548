"""Tables a new user brings (second walkthrough): dates, numbers with thousands separators, ids that repeat
or are missing, a table too small to train on, apply data with a column the model never saw. Each is read
with a note or refused with one message naming the file, the column, a value and what to do."""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.apps import get_app
from tasks.apps.kinds import TableContext
from tasks.config import LoadConfig, PreprocessConfig
from tasks.errors import InputError
from tasks.load import SAMPLE_ROWS, Block, inspect_table, to_dask
from tasks.preprocess import check_training_rows, prepare
from tasks.schemas import infer_schema
from tests.refusals import assert_raised, refusal
from tests.tasks.test_walkthrough_inputs import _frame as first_walkthrough_frame

pytestmark = [pytest.mark.tasks, pytest.mark.tabular]


@pytest.fixture(autouse=True)
def _no_cluster():
    """prepare() computes on the default scheduler: synchronous here (an earlier test may have left the
    distributed scheduler configured with no client, which fails every compute)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def _frame(n=40, seed=0):
    return first_walkthrough_frame(n, seed)  # id, a, b, c


def _kinds(df, **roles):
    schema = infer_schema(df, label=None, id_column=roles.get("id_column"), exclude=roles.get("exclude", ()),
                          allow_nulls=False, source="t.csv")
    return {c.name: c.kind for c in schema.features}


def _days(n, every="D"):
    return pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) % 3, unit=every)


@pytest.mark.parametrize("fmt, when, shown", [
    ("parquet", lambda n: _days(n), "2024-01-01 00:00:00"),  # a timestamp column, 3 distinct values
    ("parquet", lambda n: [datetime.date(2024, 1, 1 + i % 28) for i in range(n)], "2024-01-01"),  # date32
    ("csv", lambda n: _days(n).strftime("%Y-%m-%d"), "2024-01-01"),  # few values: one-hot encoded before
    ("csv", lambda n: (pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(n) * 37, unit="min"))
     .strftime("%Y-%m-%dT%H:%M:%SZ"), "2024-01-01T00:00:00Z"),  # one value per row: 'too many categories' before
    # as spreadsheets and locales write them: one-hot encoded as categories (one per row) without a word before
    ("csv", lambda n: _days(n).strftime("%m/%d/%Y"), "01/01/2024"),
    ("csv", lambda n: (pd.Timestamp("2024-01-28") + pd.to_timedelta(np.arange(n), unit="D")).strftime("%d.%m.%Y %H:%M"),
     "28.01.2024 00:00"),
    ("csv", lambda n: (pd.Timestamp("2024-01-28") + pd.to_timedelta(np.arange(n), unit="D")).strftime("%d-%b-%y"),
     "28-Jan-24"),
], ids=["parquet-timestamp", "parquet-date", "csv-dates", "csv-datetimes", "csv-us-dates", "csv-dotted-dates",
        "csv-month-names"])
@refusal("a feature column of dates or times (Parquet timestamp/date/time; in CSV text ISO dates/times, or dates as "
         "locales write them: 01/31/2026, 31.01.2026 14:30, 31-Jan-26)", 3, "table")
def test_dates_and_times_are_refused_by_name(tmp_path, fmt, when, shown):
    df = _frame().assign(when=lambda d: when(len(d)))
    path = tmp_path / f"t.{fmt}"
    getattr(df, f"to_{fmt}")(path, index=False)
    with pytest.raises(InputError, match=rf"t\.{fmt}: column 'when' holds dates/times \(e\.g\. '{shown}'\); dates and "
                                         r"times are not used as features: --exclude 'when' \(or.*--id-column 'when'\)") as e:
        inspect_table(str(path), LoadConfig(id_column="id"))
    assert_raised(e.value, test_dates_and_times_are_refused_by_name)
    assert inspect_table(str(path), LoadConfig(id_column="id", exclude_columns=("when",))).schema.feature_names == list("abc")
    assert inspect_table(str(path), LoadConfig(id_column="when")).schema.id == "when"


def test_codes_and_numbers_that_are_not_dates_keep_their_kind():
    df = _frame(6).assign(code=["A1", "B2", "A1", "C3", "B2", "A1"], year=[2024, 2025] * 3,
                          month=["2024-01", "2024-02"] * 3,  # a year-month is a plain category here
                          mixed=["2024-01-05", "soon", "2024-01-06", "later", "2024-01-05", "soon"],
                          version=["1.2.10", "1.2.3", "2.0.1"] * 2, share=["3/4", "1/2", "2/3"] * 2,  # not dates either
                          us_mixed=["01/05/2024", "n/a", "01/06/2024"] * 2)
    assert _kinds(df, id_column="id") == {"a": "numeric", "b": "numeric", "c": "numeric", "code": "categorical",
                                          "year": "numeric", "month": "categorical", "mixed": "categorical",
                                          "version": "categorical", "share": "categorical", "us_mixed": "categorical"}


@refusal("a text column of numbers written with thousands separators or a decimal comma ('1,257.30')", 3, "table")
def test_numbers_with_thousands_separators_are_refused_by_name(tmp_path):
    df = _frame().assign(amount=lambda d: [f"{v:,.2f}" for v in np.linspace(10, 5000, len(d))])
    df.loc[0, "amount"] = "1,257.30"
    df.to_csv(tmp_path / "t.csv", index=False)
    assert '"1,257.30"' in (tmp_path / "t.csv").read_text()  # quoted, as spreadsheets write it
    with pytest.raises(InputError, match=r"t\.csv: column 'amount' looks like numbers written with thousands separators"
                                         r".*\(e\.g\. '1,257\.30'\); numbers must be plain.*--exclude 'amount'") as e:
        inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))
    assert_raised(e.value, test_numbers_with_thousands_separators_are_refused_by_name)
    # Text with commas that is not numbers stays categorical.
    df = _frame(4).assign(pair=["red,blue", "red,green", "red,blue", "1,5 kg"])
    assert _kinds(df, id_column="id")["pair"] == "categorical"


@pytest.mark.parametrize("fmt, first", [
    (lambda v: f"${v:,.2f}", "$1,257.30"),
    (lambda v: f"{v / 50:.1f}%", "12.5%"),
    (lambda v: f"{v:.2f} \u20ac".replace(".", ","), "1257,30 \u20ac"),
    (lambda v: f"-\u00a3{v:.0f}", "\u00a3 12"),
], ids=["dollars", "percent", "euros-decimal-comma", "pounds"])
@refusal("a text column of amounts or percentages written with a currency symbol or a percent sign ('$1,257.30', "
         "'12.5%')", 3, "table")
def test_amounts_and_percentages_with_symbols_are_refused_by_name(tmp_path, fmt, first):
    """Such a column was read as categories (one-hot, a category per distinct amount) without a word."""
    df = _frame().assign(amount=lambda d: [fmt(v) for v in np.linspace(10, 500, len(d))])
    df.loc[0, "amount"] = first
    df.loc[1, "amount"] = "42"  # a plain number among them does not make the column categorical either
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"t\.csv: column 'amount' looks like amounts or percentages written with a "
                                         rf"currency symbol or a percent sign \(e\.g\. '{re.escape(first)}'\); numbers "
                                         r"must be plain.*--exclude 'amount'$") as e:
        inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))
    assert_raised(e.value, test_amounts_and_percentages_with_symbols_are_refused_by_name)
    assert inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id", exclude_columns=("amount",))) \
        .schema.feature_names == list("abc")


def test_text_with_symbols_that_is_not_amounts_stays_categorical():
    df = _frame(6).assign(tier=["gold", "silver", "$$$", "gold", "50% off", "silver"],
                          price=["$5", "cheap", "$5", "free", "$7", "cheap"],
                          share=["5%", "10%", "5%", "10%", "5%", "n/a"])
    assert _kinds(df, id_column="id") == {"a": "numeric", "b": "numeric", "c": "numeric", "tier": "categorical",
                                          "price": "categorical", "share": "categorical"}


def _blocks(src, path, step):
    size = path.stat().st_size
    return replace(src, blocks=tuple(Block(str(path), "csv", i, o, min(step, size - o), (), 0 if o == 0 else None,
                                           None, src.columns) for i, o in enumerate(range(0, size, step))))


def test_duplicate_ids_are_a_warning_in_the_log_and_the_notes(tmp_path, caplog):
    df = _frame(300)
    df.loc[[5, 250, 290], "id"] = 7  # id 7 on rows 5, 7, 250 and 290: in other partitions than row 7
    df.loc[100, "id"] = 101
    df.to_csv(tmp_path / "t.csv", index=False)
    src = inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))
    src = _blocks(src, tmp_path / "t.csv", 4000)
    assert src.n_partitions >= 3
    prep = prepare(src, PreprocessConfig(), run=None)
    assert prep.duplicate_ids == (2, 6, 7, 4)
    ctx = TableContext(config=get_app("detect").RunConfig(), run=None, device=torch.device("cpu"), train=prep,
                       target=prep)
    with caplog.at_level(logging.WARNING):
        get_app("detect").check_data(ctx)
    said = "id column 'id' has 2 value(s) on more than one row (6 rows; e.g. 7 on 4 rows)"
    assert [n for n in ctx.notes if said in n and n.startswith("warning: ")] and said in caplog.text, ctx.notes
    assert prepare(inspect_table(str(tmp_path / "t.csv"), LoadConfig()), PreprocessConfig(), run=None).duplicate_ids == ()
    df["id"] = np.arange(300)
    df.to_csv(tmp_path / "u.csv", index=False)
    assert prepare(inspect_table(str(tmp_path / "u.csv"), LoadConfig(id_column="id")), PreprocessConfig(),
                   run=None).input_warnings == []


@refusal("a table too small to train on (fewer than 9 rows: the message gives the number needed)", 3, "table")
def test_a_table_too_small_to_train_on_says_how_many_rows_it_needs(tmp_path):
    _frame(3).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"t\.csv: too few rows to train and validate on: 3 row\(s\).*so at least 9 "
                                         r"rows: add rows$") as e:
        prepare(inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id")), PreprocessConfig(), run=None)
    assert "val-fraction" not in str(e.value)  # no --val-fraction gives 3 rows 9
    assert_raised(e.value, test_a_table_too_small_to_train_on_says_how_many_rows_it_needs)
    with pytest.raises(InputError, match=r"so at least 8 rows: add rows$"):
        check_training_rows("t.csv", 3, 0, 0.0)
    # Enough rows, but the random split left none for validation: then another fraction or split can help.
    with pytest.raises(InputError, match=r"about 20 rows are needed at val_fraction 0\.05\): add rows, change "
                                         r"--val-fraction, or try another split with --set preprocess\.split_seed=N"):
        check_training_rows("t.csv", 12, 0, 0.05)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_apply_data_with_a_column_the_model_never_saw_leaves_it_out_with_a_note(tmp_path, fmt):
    train, new = tmp_path / f"train.{fmt}", tmp_path / f"new.{fmt}"
    getattr(_frame(), f"to_{fmt}")(train, index=False)
    getattr(_frame(12, seed=1).assign(extra=[[1]] * 12 if fmt == "parquet" else "x"), f"to_{fmt}")(new, index=False)
    schema = inspect_table(str(train), LoadConfig(id_column="id")).schema
    src = inspect_table(str(new), LoadConfig(id_column="id"), schema=schema, role="apply-to")
    assert src.ignored == ("extra",)
    assert list(to_dask(src).compute(scheduler="sync").columns) == ["id", "a", "b", "c"]
    prep = prepare(src, PreprocessConfig(), run=None, split=False)
    assert prep.input_warnings == [f"{new}: column(s) ['extra'] left out: the model was trained without them"]
    # --exclude'd by the user: left out without a word
    assert inspect_table(str(new), LoadConfig(exclude_columns=("extra",)), schema=schema).ignored == ()


# A null in the sampled rows (the ids read as floats), or past them (read as integers: it fails their coercion).
@pytest.mark.parametrize("null_row", [6, SAMPLE_ROWS + 50], ids=["in-sample", "past-sample"])
@refusal("null values in the --id-column (the message names the line)", 3, "table")
def test_null_ids_are_refused_as_ids_with_their_line(tmp_path, null_row):
    df = _frame(SAMPLE_ROWS + 100).astype({"id": "Int64"})
    df.loc[null_row, "id"] = pd.NA  # written as an empty field; the other ids as integers
    df.to_csv(tmp_path / "t.csv", index=False)
    src = inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))
    with pytest.raises(InputError, match=rf"t\.csv: id column 'id' has null values: null at line {null_row + 2}; ids "
                                         r"must not be null") as e:
        to_dask(src).compute(scheduler="sync")
    assert "impute" not in str(e.value)
    assert_raised(e.value, test_null_ids_are_refused_as_ids_with_their_line)


@refusal("--exclude of a column that a --model reads (one of its features, or its id column)", 2, "configuration")
def test_excluding_a_column_the_model_reads_is_refused(tmp_path):
    """`--model M --apply-to X --exclude a` with `a` a feature of the model: the model read `a` all the same,
    and nothing said so."""
    from tasks.config import ConfigError

    _frame().to_csv(tmp_path / "train.csv", index=False)
    schema = inspect_table(str(tmp_path / "train.csv"), LoadConfig(id_column="id")).schema
    for name, said in (("a", "--exclude 'a': the model was trained on that column and reads it from every table"),
                       ("id", "--exclude 'id': it is the model's id column")):
        with pytest.raises(ConfigError, match=re.escape(said)) as e:
            inspect_table(str(tmp_path / "train.csv"), LoadConfig(exclude_columns=(name,)), schema=schema)
        assert_raised(e.value, test_excluding_a_column_the_model_reads_is_refused)
    # a column the model was trained without: excluded without a word
    _frame().assign(notes="n").to_csv(tmp_path / "new.csv", index=False)
    src = inspect_table(str(tmp_path / "new.csv"), LoadConfig(exclude_columns=("notes",)), schema=schema)
    assert src.ignored == () and src.schema.feature_names == schema.feature_names


@refusal("a CSV whose first data line has more values than the header names columns (a title line above the header)",
         3, "table")
def test_data_lines_wider_than_the_header(tmp_path):
    """Data lines ending with a comma (the header not) made pandas read the first field as the index: ids became
    the first feature's values, each feature its neighbour's, and the last one null ("column 'c' is entirely
    null"; with --exclude c a run went through on shifted columns). A title line above the header was misread
    the same way."""
    df = _frame(30)
    body = "\n".join(",".join(map(str, row)) + "," for row in df.values.tolist())
    (tmp_path / "t.csv").write_text(",".join(df.columns) + "\n" + body + "\n")
    got = to_dask(inspect_table(str(tmp_path / "t.csv"), LoadConfig(id_column="id"))).compute(scheduler="sync")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), df, check_dtype=False)
    df.to_csv(tmp_path / "titled.csv", index=False)
    (tmp_path / "titled.csv").write_text("Sales report, December\n" + (tmp_path / "titled.csv").read_text())
    with pytest.raises(InputError, match=r"titled\.csv: line 2 has 4 fields but the header names 2 column\(s\) \(a "
                                         r"column without a name in the header, or a separator inside an unquoted"):
        inspect_table(str(tmp_path / "titled.csv"), LoadConfig())
    (tmp_path / "titled.csv").write_text("Sales report\n" + df.to_csv(index=False))
    with pytest.raises(InputError, match=r"line 2 has 4 fields but the header names 1 column\(s\) \(a title line "
                                         r"above the header\? remove it\)") as e:
        inspect_table(str(tmp_path / "titled.csv"), LoadConfig())
    assert_raised(e.value, test_data_lines_wider_than_the_header)
