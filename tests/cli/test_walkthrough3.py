"""Found by the third walkthrough (configuration, runs, object storage): refused with one line and the
documented exit code where they crashed, printed a traceback, or said nothing."""

from __future__ import annotations

import json
import logging

import botocore.exceptions
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import StorageError
from tasks.storage import open_model_source, storage_error
from tests.refusals import assert_raised, assert_refused, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()


@refusal("object-store keys that the store refuses (403: wrong key id or secret, no access to the bucket), "
         "or a local file without permission", 4, "storage")
def test_access_refused_by_the_store_is_one_storage_line():
    # s3fs turns a 403 into PermissionError; the CLI printed "unexpected error (a bug)" (exit 1) for --output,
    # a bare traceback for `runs list`, and exit 3 (invalid input) for --input
    denied = PermissionError("Forbidden")
    denied.__cause__ = botocore.exceptions.ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")
    e = storage_error(denied, "write", "s3://walk/aeflow")
    assert isinstance(e, StorageError) and not e.transient
    assert_raised(e, test_access_refused_by_the_store_is_one_storage_line, "cannot write s3://walk/aeflow: the object "
                  "store at", "refused access (Forbidden): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    signature = botocore.exceptions.ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "no"}}, "ListObjectsV2")
    assert "refused access" in str(storage_error(signature, "list", "s3://walk/raw"))
    local = storage_error(PermissionError(13, "Permission denied", "/data/x.csv"), "read", "/data/x.csv")
    assert str(local) == "cannot read /data/x.csv: permission denied ([Errno 13] Permission denied: '/data/x.csv')"
    assert storage_error(FileNotFoundError("x"), "read", "s3://walk/x") is None  # not every OSError is storage's


def _damaged_run(root, text: str) -> str:
    run = root / "runs" / "reduce" / "r1"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "weights.safetensors").write_bytes(b"")
    (run / "manifest.json").write_text(text)
    return str(run)


@pytest.mark.parametrize("text", ["{not json", "", json.dumps({"app": "reduce"})], ids=["bad-json", "empty", "fields"])
@refusal("a run whose manifest.json cannot be read (damaged, or written by an incompatible aeflow), "
         "in runs show and as --model", 4, "storage")
def test_a_damaged_manifest_is_one_line_in_runs_show_and_no_model(tmp_path, text, caplog):
    run = _damaged_run(tmp_path, text)
    res = runner.invoke(app, ["runs", "show", run])
    assert_refused(res, test_a_damaged_manifest_is_one_line_in_runs_show_and_no_model,
                   f"{run}: its manifest.json cannot be read (")
    with pytest.raises(StorageError, match="manifest.json cannot be read") as e:
        open_model_source(run)  # --model of that run: it is not a complete run (runs list skips it too)
    assert_raised(e.value, test_a_damaged_manifest_is_one_line_in_runs_show_and_no_model)
    # runs list skips it with one warning that names it once (the path and "cannot be read" were said twice)
    with caplog.at_level(logging.WARNING, logger="aeflow.storage"):
        res = runner.invoke(app, ["runs", "list", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    [warning] = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert warning.startswith(f"skipping {run}: its manifest.json cannot be read (") and warning.count(run) == 1 and \
        warning.count("cannot be read") == 1 and warning.endswith("damaged or was written by an incompatible aeflow"), warning


@refusal("aeflow runs list on a bucket that does not exist (it said 'no complete runs', exit 0)", 4, "storage")
def test_runs_list_on_a_missing_bucket(s3_endpoint):
    res = runner.invoke(app, ["runs", "list", "-o", "s3://no-such-bucket-9/aeflow"])
    assert_refused(res, test_runs_list_on_a_missing_bucket, "bucket 'no-such-bucket-9' does not exist")


def test_list_settings_take_the_forms_the_cli_takes():
    """`--hidden 64` worked, but YAML `hidden: 64`, `--set model.hidden=64,32` and YAML `exclude_columns: notes`
    were refused ('Input should be a valid tuple')."""
    from tasks.apps import get_app
    from tasks.config import resolve_config

    reduce = get_app("reduce").RunConfig
    assert resolve_config(reduce, sets=["model.hidden=64"]).model.hidden == (64,)
    assert resolve_config(reduce, sets=["model.hidden=64,32"]).model.hidden == (64, 32)
    assert resolve_config(reduce, sets=["model.hidden=[64,32]"]).model.hidden == (64, 32)
    assert resolve_config(reduce, sets=["load.exclude_columns=notes"]).load.exclude_columns == ("notes",)


def test_an_empty_hidden_width_is_refused_and_none_is_a_linear_autoencoder(tmp_path):
    """`--hidden ""` built a linear autoencoder silently and `--hidden 64,,32` was read as 64,32."""
    from tasks.apps import get_app
    from tasks.config import resolve_config
    from tasks.errors import ConfigError

    reduce = get_app("reduce").RunConfig
    assert resolve_config(reduce, sets=["model.hidden=none"]).model.hidden == ()
    assert resolve_config(reduce, sets=["model.hidden=[]"]).model.hidden == ()
    for bad in ("64,,32", "64,"):
        with pytest.raises(ConfigError, match="has an empty width"):
            resolve_config(reduce, sets=[f"model.hidden={bad}"])
    data = tmp_path / "t.csv"
    data.write_text("a,b\n1,2\n")
    for bad in ("", "64,,32"):
        res = runner.invoke(app, ["run", "reduce", "-i", str(data), "-o", str(tmp_path / "o"), "--hidden", bad])
        assert res.exit_code == 2, res.output
        assert "--hidden" in res.output and "has an empty width" in " ".join(res.output.split()), res.output
        assert res.stderr.count("error:") == 1 and "Usage:" not in res.output, res.output  # not typer's usage box
    assert not (tmp_path / "o").exists()


def test_the_metrics_table_folds_rather_than_cuts_at_80_columns():
    """detect's seven baselines at 80 columns showed as 'isolation…', 'pyod_aut…', 'average_…' (found by the
    ninth walkthrough): every name and value is printed whole (headers folded), the metric names unbroken."""
    import io

    from rich.console import Console

    from flows.cli.common import metrics_table

    metrics = {"roc_auc": 0.9512, "average_precision": 0.7123, "precision_at_threshold": 0.5}
    baselines = {k: {"roc_auc": 0.9, "average_precision": 0.6} for k in
                 ("isolation_forest", "pca", "ecod", "copod", "hbos", "pyod_autoencoder")}
    buf = io.StringIO()
    Console(file=buf, width=80).print(metrics_table("detect", metrics, baselines))
    text = buf.getvalue()
    assert "…" not in text, text
    assert all(f"│ {m} " in text for m in metrics), text


@pytest.mark.parametrize("argv", [["backfill"], ["run", "reduce"], ["run", "detect"], ["run", "impute"],
                                  ["run", "compress"], ["run", "index"], ["runs", "list"], ["search"]])
def test_help_at_80_columns_cuts_nothing(argv):
    """backfill --help cut its -i example to "'s3://b/raw/{date…" in a narrow column (found by the ninth
    walkthrough): no help text is cut with an ellipsis on an 80-column terminal."""
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, [*argv, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    cut = [line for line in res.output.splitlines() if "…" in line]
    assert not cut, "\n".join(cut)


@pytest.mark.parametrize("argv", [["run", "reduce"], ["runs", "list"], ["compress"], ["platform", "up"]])
def test_help_shows_no_type_beside_flags(argv):
    """Typer's rich help printed "<bool>" beside every flag (--json, --quiet, --help: they take no value);
    options that take one keep their type."""
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, [*argv, "--help"], terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output, res.output
    assert "--help" in res.output and ("<int>" in res.output or "<str>" in res.output), res.output
