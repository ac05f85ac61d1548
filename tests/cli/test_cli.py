"""The aeflow CLI through typer's CliRunner, against the session's Prefect server."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

pytestmark = [pytest.mark.cli]
runner = CliRunner()
FAST = ["--epochs", "5", "--patience", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def cli_run(prefect_server, dask_address, digits_csv, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli-out"))
    res = runner.invoke(app, ["run", "reduce", "--input", digits_csv, "--label-column", "target", "--id-column", "id",
                              "--latent-dim", "2", "--output", out, "--dask-address", dask_address, "--json", *FAST])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1]), out


def test_run_json_has_uri_outputs_metrics(cli_run):
    payload, out = cli_run
    assert payload["run_uri"].startswith(out)
    assert set(payload["outputs"]) >= {"embeddings", "embedding_plot", "summary"}
    assert set(payload["metrics"]) >= {"recon_mse", "trustworthiness"}
    assert set(payload["baselines"]["pca"]) == {"recon_mse", "trustworthiness"}


def test_runs_list_and_show(cli_run):
    payload, out = cli_run
    res = runner.invoke(app, ["runs", "list", "--output", out, "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert [r["run_id"] for r in listed] == [payload["run_id"]]
    res = runner.invoke(app, ["runs", "list", "--output", out, "--app", "reduce"])
    assert payload["run_id"] in res.stdout
    # the data each run read (which day of a backfill it was): in the JSON, and in the table when it fits whole
    data = listed[0]["input"]
    assert data.endswith(".csv"), listed
    wide = runner.invoke(app, ["runs", "list", "--output", out], env={"COLUMNS": str(len(data) + 120)})
    assert data in wide.stdout and "a wider terminal" not in wide.stdout, wide.stdout
    narrow = runner.invoke(app, ["runs", "list", "--output", out], env={"COLUMNS": "80"})
    assert payload["run_id"] in narrow.stdout and "(the data each run read: a wider terminal, or --json)" in narrow.stdout
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines() if "│" in line), narrow.stdout
    # the artifact root `aeflow run` writes to by default on a platform (AEFLOW_OUTPUT) is where list looks too
    res = runner.invoke(app, ["runs", "list", "--json"], env={"AEFLOW_OUTPUT": out})
    assert res.exit_code == 0 and [r["run_id"] for r in json.loads(res.stdout)] == [payload["run_id"]], res.output
    res = runner.invoke(app, ["runs", "show", payload["run_uri"]])
    assert res.exit_code == 0 and "embeddings.parquet" in res.stdout and "trustworthiness" in res.stdout
    assert "note: metrics on held-out validation rows" in res.stdout, "the notes say what the metrics were measured on"
    assert any(n.startswith("metrics on held-out validation rows") for n in payload["notes"]), payload["notes"]
    res = runner.invoke(app, ["runs", "show", payload["run_uri"], "--json"])
    assert json.loads(res.stdout)["run_id"] == payload["run_id"]
    # what a typo gives: a refusal, not an empty listing with exit 0
    res = runner.invoke(app, ["runs", "list", "--output", out, "--app", "reduse"])
    assert res.exit_code == 2 and "'reduse' is no application" in res.output, res.output
    res = runner.invoke(app, ["runs", "list", "--output", out + "-typo"])
    assert res.exit_code == 4 and "no artifact root at" in res.output, res.output


def test_config_file_and_set_overrides(prefect_server, dask_address, digits_csv, tmp_path):
    cfg = tmp_path / "reduce.yaml"
    cfg.write_text(yaml.safe_dump({"load": {"input": digits_csv, "id_column": "id", "label_column": "target"},
                                   "model": {"latent_dim": 5, "hidden": [32]}, "train": {"epochs": 3}}))
    res = runner.invoke(app, ["run", "reduce", "--config", str(cfg), "--latent-dim", "3", "--set", "train.epochs=2",
                              "--set", "preprocess.val_fraction=0.3", "--output", str(tmp_path / "o"),
                              "--dask-address", dask_address, "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    emb = pd.read_parquet(payload["outputs"]["embeddings"])
    assert list(emb.columns) == ["id", "z_0", "z_1", "z_2"], "--latent-dim beats the file"
    manifest = json.loads(open(f"{payload['run_uri']}/manifest.json").read())
    assert manifest["config"]["train"]["epochs"] == 2, "--set beats the file"
    assert manifest["config"]["model"]["hidden"] == [32]
    assert manifest["config"]["preprocess"]["val_fraction"] == 0.3
    assert manifest["extra"]["train"]["epochs_run"] == 2


def test_help_lists_commands_and_options():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "runs", "sample-data", "demo"):
        assert cmd in res.stdout
    res = runner.invoke(app, ["run", "reduce", "--help"])
    for opt in ("--input", "--apply-to", "--model", "--latent-dim", "--label-column", "--id-column", "--config", "--set", "--json"):
        assert opt in res.stdout


@pytest.mark.parametrize("name", ["compress", "denoise", "index"])
def test_image_apps_help_shows_only_what_applies_to_images(name):
    res = runner.invoke(app, ["run", name, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "PNG/JPEG" in res.stdout and "CSV/Parquet" not in res.stdout
    for table_only in ("--label-column", "--id-column", "--exclude", "--format", "--hidden"):
        assert table_only not in res.stdout, f"{table_only} does not apply to {name}"
    assert "--quality" in res.stdout if name == "compress" else "--mode" in res.stdout


def test_sample_data(tmp_path):
    res = runner.invoke(app, ["sample-data", "--output", str(tmp_path)])
    assert res.exit_code == 0, res.output
    digits = pd.read_csv(tmp_path / "digits.csv")
    assert digits.shape == (1797, 66) and list(digits.columns[:2]) == ["id", "pixel_0_0"]
    assert pd.read_parquet(tmp_path / "breast_cancer.parquet").shape == (569, 32)
    assert pd.read_csv(tmp_path / "wine.csv")["target"].nunique() == 3
    assert pd.read_parquet(tmp_path / "diabetes.parquet").shape == (442, 12)


def test_one_key_of_a_section_keeps_the_apps_other_defaults():
    """reduce defaults latent_dim to 2; setting only the hidden widths must not reset it."""
    from tasks.apps.reduce import ReduceRunConfig
    from tasks.config import resolve_config

    cfg = resolve_config(ReduceRunConfig, options={"model.hidden": [64]})
    assert cfg.model.hidden == (64,) and cfg.model.latent_dim == 2
    cfg = resolve_config(ReduceRunConfig, sets=["model.latent_dim=5"])
    assert cfg.model.latent_dim == 5 and cfg.model.hidden == ReduceRunConfig().model.hidden


def test_demo_headline_rows_pick_the_best_baseline_by_direction():
    from flows.demo import headline_rows

    rows = headline_rows(
        "impute",
        {"rmse": 0.1, "accuracy": None},
        {"knn": {"rmse": 0.3, "accuracy": None}, "iterative": {"rmse": 0.2}, "mean_mode": {"rmse": 0.5}},
    )
    assert rows == [("rmse (↓)", "0.100", "iterative 0.200")], "lower RMSE is better; a None metric is left out"
    rows = headline_rows("detect", {"roc_auc": 0.9}, {"pca": {"roc_auc": 0.7}, "isolation_forest": {"roc_auc": 0.95}})
    assert rows == [("roc_auc (↑)", "0.900", "isolation_forest 0.950")]
    assert headline_rows("index", {"recall_at_10": 1.0}, {"exact": {"qps": 10.0}}) == [("recall_at_10 (↑)", "1.000", "")]


def test_set_and_config_file_give_a_number_to_a_text_setting(tmp_path):
    """YAML reads `0` as a number: `--set app.positive_label=0` (or the same in a config file)
    is the label "0", not a validation error; numbers stay numbers for numeric settings."""
    from tasks.apps.detect import DetectRunConfig
    from tasks.config import resolve_config

    cfg = resolve_config(DetectRunConfig, sets=["app.positive_label=0", "app.contamination=0.05"])
    assert cfg.app.positive_label == "0" and cfg.app.contamination == 0.05
    f = tmp_path / "detect.yaml"
    f.write_text("app:\n  positive_label: 1\n")
    assert resolve_config(DetectRunConfig, file=f).app.positive_label == "1"


def test_set_keeps_on_off_words_for_choice_settings():
    """YAML 1.1 reads off/on/yes/no as booleans: `--set train.stream=off` is the choice "off", while a
    boolean setting still takes the same words."""
    from tasks.apps.reduce import ReduceRunConfig
    from tasks.config import resolve_config

    cfg = resolve_config(ReduceRunConfig, sets=["train.stream=off", "skip_existing=yes"])
    assert cfg.train.stream == "off" and cfg.skip_existing is True
    assert resolve_config(ReduceRunConfig, sets=["train.stream=on", "skip_existing=false"]).train.stream == "on"


def test_runs_list_shows_the_applications_headline_metric():
    from flows.cli.runs import headline

    detect = {"threshold": 1.7, "n_scored": 569, "roc_auc": 0.91, "average_precision": 0.8}
    assert headline("detect", detect) == ("roc_auc", 0.91), "not the first float (the threshold)"
    assert headline("impute", {"missing_share": 0.0, "rmse": 0.12}) == ("rmse", 0.12)
    assert headline("detect", {"threshold": 1.7}) == ("threshold", 1.7), "no headline metric: the first float"
    assert headline("no-such-app", {"n": 3, "x": 0.5}) == ("x", 0.5) and headline("reduce", {}) is None


def test_top_level_help_imports_no_application_stack():
    """`aeflow --help` (and `aeflow runs --help`) list the commands without importing PyTorch, Prefect or
    the applications (5 s before; the `run` group builds its commands when it is used)."""
    import subprocess
    import sys

    probe = ("import sys\nsys.argv = ['aeflow', {args}]\nfrom flows.cli import main\ntry:\n    main()\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print(sorted(m for m in ('torch', 'prefect', 'sklearn', 'tasks.apps.base') if m in sys.modules))")
    for args in ("'--help'", "'runs', '--help'"):
        res = subprocess.run([sys.executable, "-c", probe.format(args=args)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-500:]
    assert "Commands" in subprocess.run([sys.executable, "-c", probe.format(args="'--help'")],
                                        capture_output=True, text=True, timeout=60).stdout
    # ...and `aeflow run --help` still lists every registered application
    res = runner.invoke(app, ["run", "--help"], terminal_width=200)
    from tasks.apps import load_all

    assert res.exit_code == 0 and all(f" {name} " in res.stdout for name in load_all()), res.stdout


def test_run_help_and_refusals_import_no_baseline_or_plotting_library(tmp_path):
    """`aeflow run APP --help` and a refusal before the run need neither scikit-learn (the baselines, 1.0 s of
    imports) nor matplotlib (the plots, 0.3 s): they are imported where evaluate and report use them. A missing
    local input is refused before Prefect's temporary server starts (it was refused inside the flow, 9 s later)."""
    import subprocess
    import sys

    from tasks.apps import load_all

    missing = tmp_path / "missing.csv"
    probe = ("import sys\nfrom flows.cli import main\n"
             f"for args in {[['run', name, '--help'] for name in load_all()]!r} + [['run', 'detect', '-i', {str(missing)!r}]]:\n"
             "    sys.argv = ['aeflow', *args]\n"
             "    try:\n        main()\n    except SystemExit as e:\n        print('exit', e.code)\n"
             "print(sorted(m for m in ('sklearn', 'matplotlib', 'pyod', 'tasks.apps.base', 'prefect.server.api.server')"
             " if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = res.stdout.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("exit ")] == ["exit 0"] * len(load_all()) + ["exit 3"], res.stdout[-2000:]
    assert f"input {missing} does not exist" in res.stderr, res.stderr[-2000:]
    assert lines[-1] == "['tasks.apps.base']", "the applications load, and nothing of the baselines, plots or server"
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("app_name", ["reduce", "index"])  # compress reads neither train.stream nor memory_mb
def test_show_config_prints_every_key_with_its_meaning_and_is_a_config_file(app_name, tmp_path, monkeypatch):
    """The settings that matter at scale (train.stream, memory_mb, threads, ...) were only in the README: --show-config
    prints the resolved configuration, each key with its description, runs nothing, and reads back as --config."""
    from tasks.apps import get_app
    from tasks.config import resolve_config

    monkeypatch.chdir(tmp_path)
    args = ["run", app_name, "--show-config", "--epochs", "3", "--set", "train.memory_mb=64", "-o", "out"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert "  epochs: 3  # " in text and "  memory_mb: 64  # " in text and 'output: "out"' in text
    assert "  threads: 0  # CPU threads for training" in text and "\n  stream: " in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "artifacts").exists(), "nothing ran"
    (tmp_path / "shown.yaml").write_text(text)
    cls = get_app(app_name).RunConfig
    assert resolve_config(cls, file=tmp_path / "shown.yaml") == resolve_config(
        cls, options={"train.epochs": 3, "output": "out"}, sets=["train.memory_mb=64"])
    assert yaml.safe_load(text)["train"]["epochs"] == 3
    bad = runner.invoke(app, ["run", app_name, "--show-config", "--set", "train.epochs=-1"])
    assert bad.exit_code == 2 and "train.epochs" in bad.output, bad.output


def test_runs_list_incomplete_shows_interrupted_and_running_runs(tmp_path, monkeypatch):
    """Interrupted runs were invisible (runs list shows complete ones): --incomplete lists them with where their
    training checkpoint stands, and which are being run now."""
    from tasks.storage import ArtifactStore

    out = str(tmp_path / "art")
    store = ArtifactStore(out)
    interrupted = store.start_run("reduce", "f" * 64, {})
    interrupted.save_checkpoint({}, {"epoch": 3, "step": 120, "finished": False})
    interrupted.discard()  # as run_app does when interrupted: checkpoint kept, claim released
    running = store.start_run("detect", "e" * 64, {})  # claimed by this process, as a run in progress is
    other_owner = ArtifactStore(out).run("detect", running.run_id)
    early = store.start_run("reduce", "d" * 64, {})  # interrupted before training wrote a checkpoint:
    early.discard()  # removed (nothing to resume), so not listed
    res = runner.invoke(app, ["runs", "list", "-o", out, "--incomplete", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["run_id"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {interrupted.run_id, running.run_id}
    assert rows[interrupted.run_id]["checkpoint"] == {"epoch": 3, "step": 120, "finished": False}
    assert rows[interrupted.run_id]["running"] is None and rows[interrupted.run_id]["state"] == "interrupted"
    assert rows[running.run_id]["state"] == "running", "the table's state, in the JSON too"
    assert rows[running.run_id]["checkpoint"] is None and other_owner.claim_holder() is not None
    assert rows[running.run_id]["running"]["pid"] == os.getpid(), "claimed by a live process: running"
    import io

    from rich.console import Console

    import flows.cli.runs as runs_cli

    wide = io.StringIO()  # terminal_width reaches click, not the rich console the table is printed on
    with monkeypatch.context() as m:
        m.setattr(runs_cli, "out", Console(file=wide, width=250))
        res = runner.invoke(app, ["runs", "list", "-o", out, "--incomplete"], terminal_width=250)
    assert res.exit_code == 0, res.output
    text = wide.getvalue()
    assert "interrupted" in text and "after epoch 3," in text and "none (starts" in text, text
    assert "running (pid" in text and "resumed by the same command (same input and configuration)" in text, text
    assert runner.invoke(app, ["runs", "list", "-o", out]).stdout.startswith("no complete runs"), "list is unchanged"
    running.release()
    only = runner.invoke(app, ["runs", "list", "-o", out, "--incomplete", "--app", "reduce", "--json"])
    assert [r["run_id"] for r in json.loads(only.stdout)] == [interrupted.run_id]


def test_show_config_with_json_is_one_json_object_and_a_config_file(tmp_path, monkeypatch):
    """`--show-config --json` printed YAML (a script's json.load failed)."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "reduce", "-i", "x.csv", "--epochs", "3", "--show-config", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["train"]["epochs"] == 3 and shown["load"]["input"] == "x.csv" and "app_name" not in shown
    (tmp_path / "c.json").write_text(res.stdout)
    again = runner.invoke(app, ["run", "reduce", "--config", "c.json", "--show-config", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == shown, again.output


def test_runs_list_refuses_an_empty_output_and_a_file(tmp_path):
    """`runs list -o ''` listed the working directory and `-o file.csv` said "no complete runs", exit 0."""
    (tmp_path / "w.csv").write_text("a\n1\n")
    res = runner.invoke(app, ["runs", "list", "-o", ""])
    assert res.exit_code == 2 and "--output is empty (an unset variable?)" in res.stderr, res.output
    res = runner.invoke(app, ["runs", "list", "-o", str(tmp_path / "w.csv")])
    assert res.exit_code == 4 and "is a file, not an artifact root" in res.stderr, res.output
