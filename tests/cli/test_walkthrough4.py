"""A tenth walkthrough, of the README as a new user reads it: the metrics table keeps every number whole on an
80-column terminal (or a pipe), denoise's --help says what --apply-to does for it, and a denoise run's notes
name only the baselines that took the noise sigma."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
pytestmark = pytest.mark.cli
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DENOISE = os.path.join(REPO, "benchmarks", "weights", "denoise")

DETECT_METRICS = {"threshold": 137.6, "anomaly_rate": 0.05097, "roc_auc": 0.1351, "average_precision": 0.4411,
                  "precision_at_threshold": 0.06897, "recall_at_threshold": 0.005602}
DETECT_BASELINES = {name: {"roc_auc": 0.2012 + i / 1000, "average_precision": 0.4686 + i / 1000}
                    for i, name in enumerate(("isolation_forest", "pca", "ecod", "copod", "hbos", "pyod_autoencoder"))}


@pytest.mark.parametrize("width", [80, 100])
def test_the_metrics_table_keeps_every_number_whole_at_80_columns(width):
    """detect's seven baselines at 80 columns (a terminal, or any pipe) printed ROC-AUC 0.1351 as '0.135' over
    '1' and 'aeflow' as 'aeflo' over 'w': the table was folded to fit. Now every value and every column name
    is whole on one line (the baselines that do not fit go to a continuation table), within the width."""
    from rich.console import Console

    from flows.cli.common import metrics_table
    from tasks.report import _fmt

    buf = io.StringIO()
    Console(file=buf, width=width).print(metrics_table("metrics", DETECT_METRICS, DETECT_BASELINES))
    text = buf.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), text
    cells = [c.strip() for line in lines for c in re.split(r"[│┃]", line)]
    values = [_fmt(v) for v in DETECT_METRICS.values()]
    values += [_fmt(v) for b in DETECT_BASELINES.values() for v in b.values()]
    assert not [v for v in values if v not in cells], text
    assert not [n for n in ("aeflow", *DETECT_BASELINES, *DETECT_METRICS) if n not in cells], text


def test_the_metrics_table_is_one_table_when_it_fits():
    from rich.console import Console

    from flows.cli.common import metrics_table

    buf = io.StringIO()
    Console(file=buf, width=200).print(metrics_table("metrics", DETECT_METRICS, DETECT_BASELINES))
    assert "continued" not in buf.getvalue() and buf.getvalue().count("┏") == 1, buf.getvalue()


def _flat(help_text: str) -> str:
    """--help without its box and line breaks."""
    return " ".join(help_text.replace("│", " ").split())


def test_denoise_help_does_not_say_its_input_is_applied():
    """`aeflow run denoise --help` said --apply-to defaults to the input, but a training run denoises nothing
    (its input is clean images): it applies only to --apply-to. index and compress do apply to their input."""
    res = runner.invoke(app, ["run", "denoise", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    line = _flat(res.output)
    assert "(default: the input)" not in line, res.output
    assert "--apply-to" in line and "Without it a training run applies nothing" in line, res.output
    res = runner.invoke(app, ["run", "index", "--help"], terminal_width=200)
    assert "(default: the input)" in _flat(res.output), res.output


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48), dtype=np.uint8)).save(path)


def test_denoise_notes_name_the_noise_sigma_only_for_the_baselines_that_use_it(tmp_path, prefect_server):
    """With `--set 'app.baselines=[tv]'` (the README's way to leave BM3D out) the notes still said 'noise sigma
    for NL-means/BM3D 25.0/255', of baselines that did not run."""
    for i, name in enumerate(("a.png", "b.png")):
        _image(tmp_path / "noisy" / name, i)
        _image(tmp_path / "clean" / name, i + 10)
    res = runner.invoke(app, ["run", "denoise", "--model", DENOISE, "--apply-to", str(tmp_path / "noisy"),
                              "--clean-reference", str(tmp_path / "clean"), "--noise-sigma", "25",
                              "--set", "app.baselines=[tv]", "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(result["baselines"]) == {"tv"}, result
    notes = " ".join(result["notes"])
    assert "PSNR (dB) and SSIM on 2 applied images" in notes, notes
    assert "NL-means" not in notes and "BM3D" not in notes, notes


def test_incomplete_runs_keep_the_run_id_whole_at_80_columns(monkeypatch):
    """`aeflow runs list --incomplete` folded the run id at 80 columns ('20261201T051334Z' over '-6ac8f8d6'):
    the one value a user copies (to resume or delete the run) is now whole on one line."""
    from rich.console import Console

    import flows.cli.runs as runs_cli

    buf = io.StringIO()
    monkeypatch.setattr(runs_cli, "out", Console(file=buf, width=80))
    run_id = "20261201T051334Z-6ac8f8d6"
    runs_cli._print_incomplete([{"app": "reduce", "run_id": run_id, "run_uri": f"/a/runs/reduce/{run_id}",
                                 "created": "2026-12-01T05:13:34Z", "running": None, "checkpoint": {"epoch": 5}}],
                               "./artifacts", None, False)
    text = buf.getvalue()
    assert run_id in text and "interrupted" in text, text
    assert all(len(line) <= 80 for line in text.splitlines() if "│" in line), text


def test_the_demo_table_keeps_metric_names_and_numbers_whole_at_80_columns():
    """`make demo` on an 80-column terminal (or a pipe) folded "average_precision (↑)" into "average_precisio"
    over "n (↑)" and "bd_rate_vs_jpeg_pct (↓)" likewise; then "breast_cancer" over two lines: the data column
    wraps at spaces only, the baseline column too."""
    import io

    from rich.console import Console

    from flows.cli.demo import summary_table

    rows = [("detect", "breast_cancer", "average_precision (↑)", "0.776", "hbos 0.852"),
            ("impute", "wine", "rmse (↓)", "0.125", "iterative 0.138"),
            ("extract", "digits", "accuracy_10_per_class (↑)", "0.898", "raw 0.889"),
            ("index", "digit images", "precision_at_10 (↑)", "0.968", "raw_pixels 0.967"),
            ("compress", "photos (held out)", "bd_rate_vs_jpeg_pct (↓)", "-20.392", ""),
            ("index", "digit images", "precision_at_10 (↑)", "0.968", "raw_pixels 0.967")]
    table = summary_table(tuple(r[1] for r in rows))
    for r in rows:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=80).print(table)
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert all(line.rstrip()[-1] in "┓┃┩│┤┘" for line in lines[1:] if line.strip()), text  # not cropped
    for _app, data, metric, ours, _best in rows:
        assert metric in text and ours in text and data.split()[0] in text, text
