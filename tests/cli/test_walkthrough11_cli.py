"""CLI leftovers of the eleventh walkthrough: ``--json`` failures on stdout, Ctrl-C before a backfill, codec globs.

``--json`` commands that fail say why on stdout too, as one JSON object a script can read.

Before, a failed ``--json`` command left stdout empty: a script that parsed it had only the exit
code (and stderr, meant for people).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = [pytest.mark.cli]
runner = CliRunner()


def _error_object(res) -> dict:
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert lines, f"nothing on stdout; stderr: {res.stderr}"
    payload = json.loads(lines[-1])
    assert set(payload) == {"error", "kind", "exit_code"}
    assert payload["exit_code"] == res.exit_code
    return payload


def test_run_json_bad_input_prints_an_error_object(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1.0, 2.0, None], "b": [1.0, 2.0, 3.0]}).to_csv(bad, index=False)
    res = runner.invoke(app, ["run", "reduce", "--input", str(bad), "--output", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 3, res.output
    payload = _error_object(res)
    assert payload["kind"] == "input"
    assert str(bad) in payload["error"] and "column 'a'" in payload["error"]
    assert "column 'a'" in res.stderr  # people still read it on stderr


def test_run_json_bad_setting_is_a_configuration_error_object(tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--input", str(tmp_path / "x.csv"), "--set", "train.epochs=-1",
                              "--json"])
    assert res.exit_code == 2, res.output
    assert _error_object(res)["kind"] == "configuration"


def test_runs_show_json_missing_run(tmp_path):
    missing = str(tmp_path / "runs" / "reduce" / "nope")
    res = runner.invoke(app, ["runs", "show", missing, "--json"])
    assert res.exit_code == 4, res.output
    payload = _error_object(res)
    assert payload["kind"] == "storage" and missing in payload["error"]


def test_without_json_stdout_stays_empty(tmp_path):
    missing = str(tmp_path / "runs" / "reduce" / "nope")
    res = runner.invoke(app, ["runs", "show", missing])
    assert res.exit_code == 4
    assert res.stdout.strip() == ""


def test_platform_json_error_object_and_brackets_kept(tmp_path):
    where = tmp_path / "no[bold]platform"
    res = runner.invoke(app, ["platform", "status", "--dir", str(where), "--json"])
    assert res.exit_code == 4, res.output
    payload = _error_object(res)
    assert str(where) in payload["error"]
    # the message on stderr keeps the path whole ('[bold]' was taken as markup there and vanished)
    assert "no[bold]platform" in res.stderr.replace("\n", "")


def test_ctrl_c_before_any_backfill_date_speaks_of_the_backfill(monkeypatch, tmp_path):
    """It said aeflow run's "the run is incomplete ... training goes on from its last checkpoint": no run had
    started. With --json the same words go to stdout as an 'interrupted' object."""
    import flows.backfill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.backfill, "run_in_process", interrupted)
    args = ["backfill", "reduce", "-i", str(tmp_path / "{date}.csv"), "--start", "2026-11-01", "--end",
            "2026-11-02", "--output", str(tmp_path / "out")]
    res = runner.invoke(app, args)
    assert res.exit_code == 130, res.output
    said = " ".join(res.stderr.split())
    assert "the backfill stopped before its dates ran" in said and "the run is incomplete" not in said, said
    res = runner.invoke(app, [*args, "--json"])
    payload = _error_object(res)
    assert payload["kind"] == "interrupted" and payload["error"].startswith("the backfill stopped")


def test_codec_commands_expand_a_quoted_glob_and_keep_literal_names(tmp_path):
    """An object store's glob ('s3://b/codes/*.aec': no shell expands it) was taken as one file's name and
    refused ("no such file"); a quoted local glob is the same path through the command. A file whose name
    merely looks like a glob (img[1].png) stays itself."""
    import os

    import numpy as np
    from PIL import Image

    codec = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "benchmarks", "weights", "codec")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "img[1].png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / name)
    res = runner.invoke(app, ["compress", str(photos / "*.png"), "--model", codec, "-o", str(tmp_path / "codes"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["a.aec", "b.aec", "img[1].aec"]
    res = runner.invoke(app, ["compress", str(photos / "img[1].png"), "--model", codec, "-o",
                              str(tmp_path / "one"), "--json"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["img[1].aec"]
    res = runner.invoke(app, ["decompress", str(tmp_path / "codes" / "*.aec"), "--model", codec, "-o",
                              str(tmp_path / "decoded")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == ["a.png", "b.png", "img[1].png"]
    res = runner.invoke(app, ["decompress", str(tmp_path / "codes" / "*.webp"), "--model", codec, "-o",
                              str(tmp_path / "none")])
    assert res.exit_code == 3 and "matches no file" in res.stderr, res.output
