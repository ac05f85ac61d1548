"""Bad input through the CLI: one clear message naming the file/column/value, a non-zero
exit, no traceback, and nothing written (no manifest, no outputs)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import files_under
from tests.refusals import assert_refused, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()
FAST = ["--epochs", "3", "--patience", "2"]


def _frame(n=60):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"f{i}" for i in range(5)])
    df.insert(0, "id", range(n))
    df["label"] = rng.integers(0, 2, n)
    return df


def _write(path, df):
    if str(path).endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return str(path)


@refusal("a file, folder or glob that does not exist", 3, "table")
def case_missing_file(d):
    return [str(d / "missing.csv")], "input {d}/missing.csv does not exist"


@refusal("an empty file (0 bytes)", 3, "table")
def case_empty_file(d):
    (d / "empty.csv").write_bytes(b"")
    return [str(d / "empty.csv")], "{d}/empty.csv is empty (0 bytes)"


@refusal("a header but no data rows", 3, "table")
def case_header_only(d):
    (d / "header.csv").write_text("id,f0,f1,label\n")
    return [str(d / "header.csv")], "{d}/header.csv has a header but no data rows"


@refusal("a non-numeric value in a numeric column (the message names file, column, value and line)", 3, "table")
def case_non_numeric(d):
    df = _frame().astype({"f2": object})
    df.loc[17, "f2"] = "twelve"
    return [_write(d / "t.csv", df)], "{d}/t.csv: column 'f2' has non-numeric values: 'twelve' at line 19"


@refusal("a feature column that is entirely null", 3, "table")
def case_all_null(d):
    return [_write(d / "t.csv", _frame().assign(f1=np.nan))], "{d}/t.csv: column 'f1' is entirely null"


@refusal("an infinite value", 3, "table")
def case_inf(d):
    df = _frame()
    df.loc[4, "f3"] = -np.inf
    return [_write(d / "t.parquet", df)], "{d}/t.parquet: column 'f3' has infinite values: -inf at row 4"


@refusal("a --label-column that is not a column", 3, "table")
def case_unknown_label(d):
    return [_write(d / "t.csv", _frame()), "--label-column", "klass"], "label column 'klass' not found in {d}/t.csv"


@refusal("an --id-column that is not a column", 3, "table")
def case_unknown_id(d):
    return [_write(d / "t.csv", _frame()), "--id-column", "key"], "id column 'key' not found in {d}/t.csv"


@refusal("files of one input with different columns", 3, "table")
def case_folder_different_columns(d):
    (d / "in").mkdir()
    _write(d / "in" / "a.csv", _frame())
    _write(d / "in" / "b.csv", _frame().rename(columns={"f4": "f5"}))
    return [str(d / "in")], "{d}/in/b.csv has different columns from {d}/in/a.csv: missing ['f4'], extra ['f5']"


@refusal("a damaged Parquet file", 3, "table")
def case_corrupt_parquet(d):
    (d / "bad.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"not really parquet")
    return [str(d / "bad.parquet")], "{d}/bad.parquet: not a readable Parquet file"


@refusal("a file that is neither CSV nor Parquet", 3, "table")
def case_non_table_file(d):
    (d / "notes.txt").write_text("hello")
    return [str(d / "notes.txt")], "{d}/notes.txt: unknown file type"


@refusal("an option out of its range (e.g. --latent-dim 0)", 2, "configuration")
def case_latent_zero(d):
    return [_write(d / "t.csv", _frame()), "--latent-dim", "0"], "model.latent_dim: Input should be greater than or equal to 1 (got 0)"


@refusal("--epochs below 1", 2, "configuration")
def case_negative_epochs(d):
    return [_write(d / "t.csv", _frame()), "--epochs", "-1"], "train.epochs: Input should be greater than or equal to 1"


@refusal("a folder mixing CSV and Parquet files", 3, "table")
def case_mixed_formats(d):
    (d / "mix").mkdir()
    _write(d / "mix" / "a.csv", _frame())
    _write(d / "mix" / "b.parquet", _frame())
    return [str(d / "mix")], "mixes CSV and Parquet files"


@refusal("a header that repeats a column name", 3, "table")
def case_repeated_column(d):
    (d / "t.csv").write_text("id,a,b,a\n" + "".join(f"{i},1,2,3\n" for i in range(40)))
    return [str(d / "t.csv")], "{d}/t.csv: column name 'a' appears more than once in the header (columns 2 and 4)"


@refusal("a Parquet file named .csv (formats are told by content, not only by name)", 3, "table")
def case_parquet_named_csv(d):
    _frame().to_parquet(d / "t.csv", index=False)
    return [str(d / "t.csv")], "{d}/t.csv is a Parquet file (it starts with the Parquet magic bytes PAR1), not CSV"


@refusal("a CSV file named .parquet", 3, "table")
def case_csv_named_parquet(d):
    _frame().to_csv(d / "t.parquet", index=False)
    return [str(d / "t.parquet")], "{d}/t.parquet is not a Parquet file (no Parquet magic bytes; it looks like text"


@refusal("a truncated .csv.gz, also when the damage lies past the rows sampled at the door", 3, "table")
def case_truncated_gzip_past_the_sample(d):
    import gzip

    data = gzip.compress(_frame(20000).to_csv(index=False).encode())
    (d / "t.csv.gz").write_bytes(data[: int(len(data) * 0.8)])
    return [str(d / "t.csv.gz")], "{d}/t.csv.gz: the file is truncated or corrupted (EOFError: Compressed file ended"


@refusal("a truncated .csv.bz2 or .csv.xz (bzip2 and xz CSVs are read as .csv.gz ones are)", 3, "table")
def case_truncated_bz2_past_the_sample(d):
    import bz2

    data = bz2.compress(_frame(20000).to_csv(index=False).encode())
    (d / "t.csv.bz2").write_bytes(data[: int(len(data) * 0.8)])
    return [str(d / "t.csv.bz2")], "{d}/t.csv.bz2: the file is truncated or corrupted (EOFError: Compressed file ended"


@refusal("a zip archive or a zstd-compressed file, whatever its name (extract it, or compress with gzip, bzip2 or "
         "xz)", 3, "table")
def case_zip_archive(d):
    import zipfile

    with zipfile.ZipFile(d / "t.csv", "w") as z:  # named .csv: told by content
        z.writestr("t.csv", _frame().to_csv(index=False))
    return [str(d / "t.csv")], "{d}/t.csv is a zip archive, which is not read: extract the table, or compress a CSV"


@refusal("a training table too small to train and validate on (e.g. one row; the message gives the minimum)", 3,
         "table")
def case_single_row(d):
    return [_write(d / "t.csv", _frame(1))], ("{d}/t.csv: too few rows to train and validate on: 1 row(s) split into "
                                              "1 for training and 0 held out for validation (val_fraction 0.2); "
                                              "training needs at least 8 training rows and 1 validation row")


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_clear_message_and_writes_nothing(prefect_server, dask_address, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    args, expected = case(data)
    out = tmp_path / "artifacts"
    base = ["run", "reduce", "--output", str(out), "--dask-address", dask_address, *FAST]
    if "--id-column" not in args:
        base += ["--id-column", "id"]
    res = runner.invoke(app, [*base, "--input", *args])
    assert res.exit_code == case.refusal.exit_code, res.output
    assert expected.format(d=data) in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert res.stderr.count("error:") == 1
    # nothing, not even the output folder (a refusal inside the flow left it behind, empty)
    assert not out.exists(), f"nothing may be written on bad input: {files_under(out)}"


@refusal("an input bucket that does not exist", 3, "table")
def test_bucket_that_does_not_exist(prefect_server, dask_address, s3_endpoint, tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--input", "s3://no-such-bucket-here/raw/x.parquet",
                              "--output", str(tmp_path / "o"), "--dask-address", dask_address])
    assert_refused(res, test_bucket_that_does_not_exist, "bucket 'no-such-bucket-here' does not exist")
    assert files_under(tmp_path / "o") == []


@refusal("an --output bucket that does not exist", 4, "storage")
def test_output_bucket_that_does_not_exist(prefect_server, dask_address, s3_endpoint, digits_csv):
    res = runner.invoke(app, ["run", "reduce", "--input", digits_csv, "--output", "s3://no-such-output-bucket/x",
                              "--dask-address", dask_address, *FAST])
    assert_refused(res, test_output_bucket_that_does_not_exist, "bucket 'no-such-output-bucket' does not exist")


@refusal("data without the columns the model was trained on (--model with --apply-to)", 5, "model")
def test_apply_to_with_other_columns(prefect_server, dask_address, tmp_path):
    train = _write(tmp_path / "train.csv", _frame())
    out = tmp_path / "artifacts"
    res = runner.invoke(app, ["run", "reduce", "--input", train, "--id-column", "id", "--label-column", "label",
                              "--output", str(out), "--dask-address", dask_address, "--json", *FAST])
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    before = files_under(out)
    new = _write(tmp_path / "new.parquet", _frame().drop(columns=["f1"]).assign(extra=1.0))
    res = runner.invoke(app, ["run", "reduce", "--model", model, "--apply-to", new, "--output", str(out),
                              "--dask-address", dask_address])
    assert_refused(res, test_apply_to_with_other_columns,
                   f"apply-to {new} does not have the columns the model was trained on: missing ['f1'] (expected features "
                   "['f0', 'f1', 'f2', 'f3', 'f4']); it has ['extra'], which the model was trained without (renamed?)")
    assert files_under(out) == before, "a failed run writes nothing and leaves earlier runs untouched"


@refusal("a --model run that does not exist", 4, "storage")
def test_model_that_does_not_exist(prefect_server, tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--model", str(tmp_path / "runs" / "reduce" / "nope"),
                              "--apply-to", str(tmp_path / "x.csv"), "--output", str(tmp_path / "o")])
    assert_refused(res, test_model_that_does_not_exist, "does not exist")


@refusal("a --model run that itself applied another run's model (it saved none: the message names the run to pass)", 4,
         "storage")
def test_model_of_a_run_that_applied_another_runs_model(prefect_server, dask_address, tmp_path):
    """It said only "has no saved model (model/config.json is missing)", though the manifest names the model used."""
    data = _write(tmp_path / "t.csv", _frame())
    out = str(tmp_path / "artifacts")
    common = ["--output", out, "--dask-address", dask_address, "--json"]
    res = runner.invoke(app, ["run", "reduce", "--input", data, "--id-column", "id", *common, *FAST])
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    res = runner.invoke(app, ["run", "reduce", "--model", trained, "--apply-to", data, *common])
    assert res.exit_code == 0, res.output
    applied = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    res = runner.invoke(app, ["run", "reduce", "--model", applied, "--apply-to", data, "--output", out,
                              "--dask-address", dask_address])
    assert_refused(res, test_model_of_a_run_that_applied_another_runs_model,
                   f"{applied} has no saved model: that run applied the model of {trained} (it was given --model); "
                   f"pass --model {trained}")


def test_a_failed_first_run_leaves_no_empty_folders(prefect_server, dask_address, tmp_path):
    """The run's directory was removed, but `runs/reduce/` stayed behind, empty, in a new output folder."""
    df = _frame(400).astype(object)
    df.iloc[350, 2] = "twelve"  # found while preprocessing, after the run's directory was made
    bad = _write(tmp_path / "bad.csv", df)
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "reduce", "--input", bad, "--output", str(out), "--dask-address", dask_address, *FAST])
    assert res.exit_code == 3 and "'twelve'" in res.output, res.output
    assert not out.exists() or list(out.iterdir()) == [], sorted(str(p) for p in out.rglob("*"))
