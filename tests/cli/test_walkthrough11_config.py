"""An eleventh walkthrough, of an ML engineer who drives aeflow by configuration files: ``--show-config`` written
to a file, edited and fed back with ``--config``. A config file that is not a readable text file, that repeats a
key, that leaves a section empty or that was written for another application gets one clear message (or the
defaults), exit 2; and ``--show-config`` prints the output a run would use under ``$AEFLOW_OUTPUT``."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
pytestmark = pytest.mark.cli


def show(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["run", *args, "--show-config"], env={"COLUMNS": "300", "NO_COLOR": "1", **(env or {})})


def text(res) -> str:
    return " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_a_config_file_that_is_not_a_text_file_is_one_message_exit_2(tmp_path, kind):
    """`--config /tmp` (a folder) and a config file that is not UTF-8 ended in a traceback (IsADirectoryError,
    UnicodeDecodeError): with --show-config exit 1 and the traceback; a run called it "a bug"."""
    path = tmp_path
    if kind == "binary":
        path = tmp_path / "app.yaml"
        path.write_bytes(b"\xff\xfe\x00train")
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 2, res.output
    assert f"config file {str(path)!r}" in text(res), res.output
    assert "Traceback" not in res.output


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a `train:` block appended to a --show-config file (which has
    one) silently dropped every setting of the first, here epochs 3."""
    path = tmp_path / "app.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  latent_dim: 4\ntrain:\n  lr: 0.01\n")
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 2, res.output
    assert "found the key 'train' a second time (first at line 1)" in text(res), res.output
    # a merge key (<<: *base) may still be overridden by the mapping's own keys
    path.write_text("base: &b {epochs: 3, lr: 0.01}\ntrain:\n  <<: *b\n  epochs: 4\n")
    res = show("reduce", "--config", str(path))
    assert "second time" not in text(res) and "base: Extra inputs are not permitted" in text(res), res.output


def test_a_section_with_every_key_commented_out_keeps_the_applications_defaults(tmp_path):
    """`train:` with its keys commented out is YAML's null: it was refused ("train: Input should be a valid
    dictionary or instance of TrainConfig (got None)"). It means the section's defaults, the application's own."""
    defaults = yaml.safe_load(show("detect").output)
    path = tmp_path / "app.yaml"
    path.write_text("app:\n#  contamination: 0.2\ntrain:\n#  epochs: 3\nmodel:\n  latent_dim: 3\n")
    res = show("detect", "--config", str(path))
    assert res.exit_code == 0, res.output
    got = yaml.safe_load(res.output)
    assert got["model"]["latent_dim"] == 3
    assert got["train"] == defaults["train"] and got["app"] == defaults["app"]
    # through a deployment (its parameters are the base) an empty section overrides nothing of the deployment's
    from flows.backfill import explicit_overrides

    assert explicit_overrides(path) == {"model": {"latent_dim": 3}}


def test_a_config_of_another_application_is_named_as_such(tmp_path):
    """detect's --show-config given to reduce listed each of its 16 app keys as "Extra inputs are not permitted"
    in one long line, with no word of what had happened."""
    path = tmp_path / "detect.yaml"
    res = show("detect")
    path.write_text(res.output)
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 2, res.output
    said = text(res)
    assert "the app section holds settings of detect, not of reduce" in said, said
    assert "aeflow run reduce --show-config" in said and "Extra inputs are not permitted" not in said, said


def test_show_config_prints_the_output_a_run_would_use_and_reads_back_the_same(tmp_path):
    """With $AEFLOW_OUTPUT set, --show-config printed output "./artifacts"; fed back with --config, that counted
    as given and sent the run to ./artifacts instead of $AEFLOW_OUTPUT. Now it prints the output the run uses,
    and the file reads back to the same configuration (an explicit --output still wins)."""
    env = {"AEFLOW_OUTPUT": str(tmp_path / "shared")}
    first = show("reduce", "--epochs", "3", env=env)
    assert first.exit_code == 0, first.output
    assert yaml.safe_load(first.output)["output"] == str(tmp_path / "shared")
    path = tmp_path / "reduce.yaml"
    path.write_text(first.output)
    again = show("reduce", "--config", str(path), env=env)
    assert again.output == first.output
    assert yaml.safe_load(show("reduce", "-o", str(tmp_path / "mine"), env=env).output)["output"] == str(tmp_path / "mine")


@pytest.mark.parametrize("how", ["set", "config", "option"])
def test_a_backfill_refuses_one_run_id_for_many_dates(tmp_path, monkeypatch, how):
    """`--set run_id=myrun` (or run_id in the --config file) over two dates: the first date's run took the
    folder, the second failed "already exists and is complete; choose another --run-id", and the same command
    again, which "redoes only the dates that failed", failed the same way. Refused before any date runs."""
    import flows.backfill

    ran = []
    monkeypatch.setattr(flows.backfill, "run_in_process", lambda *a, **k: ran.append(a) or [])
    given = ["--set", "run_id=myrun"] if how == "set" else ["--run-id", "myrun"]  # `aeflow run`'s option, too
    if how == "config":
        (tmp_path / "app.yaml").write_text("run_id: myrun\ntrain: {epochs: 1}\n")
        given = ["--config", str(tmp_path / "app.yaml")]
    args = ["backfill", "reduce", "-i", str(tmp_path / "{date}.csv"), "--start", "2026-11-01", "--end", "2026-11-02"]
    res = runner.invoke(app, [*args, *given], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 2, res.output
    assert "run_id 'myrun' names one run, and a backfill makes one per date" in text(res), res.output
    assert ran == []


def test_a_backfill_of_one_date_takes_run_id(tmp_path, monkeypatch):
    """`aeflow backfill ... --run-id x` was "No such option: --run-id (Possible options: --end)"."""
    import flows.backfill

    ran = []
    monkeypatch.setattr(flows.backfill, "run_in_process", lambda app_name, dates, cfg, **k: ran.append(cfg) or [])
    res = runner.invoke(app, ["backfill", "reduce", "-i", str(tmp_path / "{date}.csv"), "--start", "2026-11-01",
                              "--end", "2026-11-01", "--run-id", "redo-nov-1"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert [c.run_id for c in ran] == ["redo-nov-1"]


def test_clearing_exclude_columns_excludes_nothing(tmp_path):
    """`--set load.exclude_columns=` (to clear the list of a --config file) excluded a column named '': the run
    failed "excluded column '' not found" (exit 3); `exclude_columns:` left empty in the file was refused."""
    path = tmp_path / "app.yaml"
    path.write_text("load:\n  exclude_columns: [notes]\n")
    res = show("reduce", "--config", str(path), "--set", "load.exclude_columns=")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["load"]["exclude_columns"] == []
    path.write_text("load:\n  exclude_columns:\n")
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["load"]["exclude_columns"] == []


def test_a_backfill_refuses_a_device_this_machine_lacks_before_any_date(tmp_path, monkeypatch):
    """`--set train.device=tpu` was refused by `aeflow run` (exit 2, the README's table) but a backfill ran every
    date into the same error and exited 1."""
    import flows.backfill

    ran = []
    monkeypatch.setattr(flows.backfill, "run_in_process", lambda *a, **k: ran.append(a) or [])
    args = ["backfill", "reduce", "-i", str(tmp_path / "{date}.csv"), "--start", "2026-11-01", "--end", "2026-11-03",
            "--set", "train.device=tpu"]
    res = runner.invoke(app, args, env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 2, res.output
    assert "train.device: 'tpu' is not a device" in text(res), res.output
    assert ran == []


@pytest.mark.parametrize("how", ["config", "set"])
def test_a_backfill_takes_its_date_template_from_the_config(tmp_path, monkeypatch, how):
    """load.input with {date} in the --config file (or --set) was refused "--input-template is required": the
    README has backfills take --config and --set for any key and templates in any string of the config."""
    import flows.backfill

    seen = []
    monkeypatch.setattr(flows.backfill, "run_in_process", lambda app_name, dates, cfg, **k: seen.append(cfg) or [])
    template = str(tmp_path / "{date}" / "*.csv")
    given = ["--set", f"load.input={template}"]
    if how == "config":
        (tmp_path / "app.yaml").write_text(yaml.safe_dump({"load": {"input": template}, "train": {"epochs": 1}}))
        given = ["--config", str(tmp_path / "app.yaml")]
    args = ["backfill", "reduce", "--start", "2026-11-01", "--end", "2026-11-02", *given]
    res = runner.invoke(app, args, env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert [c.load.input for c in seen] == [template]
    # still refused when the config's input has no date field: every date would read the same data
    given[-1] = given[-1].replace("{date}", "day") if how == "set" else given[-1]
    if how == "config":
        (tmp_path / "app.yaml").write_text(yaml.safe_dump({"load": {"input": str(tmp_path / "day.csv")}}))
    res = runner.invoke(app, ["backfill", "reduce", "--start", "2026-11-01", "--end", "2026-11-02", *given],
                        env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 2 and "--input-template is required" in text(res), res.output


def test_on_and_off_in_a_config_file_are_the_words_as_the_readme_writes_them(tmp_path):
    """`stream: off` in a --config file (the README writes `stream` (auto|on|off) unquoted) was refused: YAML 1.1
    read off as false, "train.stream: Input should be 'auto', 'on' or 'off' (got False)". Boolean settings still
    read yes/on/true."""
    path = tmp_path / "app.yaml"
    path.write_text("train:\n  stream: off\n  compile: on\nmodel:\n  batch_norm: yes\nskip_existing: True\n")
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert (shown["train"]["stream"], shown["train"]["compile"]) == ("off", "on"), res.output
    assert shown["model"]["batch_norm"] is True and shown["skip_existing"] is True, res.output


@pytest.mark.parametrize(("body", "said"), [
    ("train:\n  epochs: [5\n", "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence, line 3"),
    ("train:\n\tepochs: 5\n", "found character '\\t' that cannot start any token (while scanning for the next token, "
                              "line 2, column 1)"),
])
def test_a_config_file_that_is_not_yaml_is_one_line_naming_where(tmp_path, body, said):
    """PyYAML's message spans lines and names "<unicode string>" where the file is; and "token: found ..."
    was taken for a secret and printed as "token: *** character"."""
    path = tmp_path / "app.yaml"
    path.write_text(body)
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and "<unicode string>" not in res.stderr, res.stderr
    assert f"config file {str(path)!r} is not valid YAML: {said}" in res.stderr, res.stderr


def test_a_key_in_the_wrong_section_is_pointed_to_its_section(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text("latent_dim: 4\ntrain:\n  latent_dim: 4\n")
    res = show("reduce", "--config", str(path))
    assert res.exit_code == 2, res.output
    assert text(res).count("(did you mean 'model.latent_dim'?)") == 2, res.output
    res = runner.invoke(app, ["run", "detect", "--set", "contamination=0.1", "--show-config"],
                        env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert res.exit_code == 2 and "(did you mean 'app.contamination'?)" in text(res), res.output
