"""Date templates, run dates and model references; prefect.yaml read into deployments (no server)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tasks.apps.reduce import ReduceRunConfig
from tasks.errors import ConfigError, StorageError
from tasks.schedule import date_range, has_template, prepare_config, render, run_date

pytestmark = [pytest.mark.tasks]
REPO = Path(__file__).resolve().parents[2]
DAY = dt.date(2026, 11, 1)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("s3://b/raw/{date}/*.parquet", "s3://b/raw/2026-11-01/*.parquet"),
        ("data/{yesterday}.csv", "data/2026-10-31.csv"),
        ("{tomorrow}|{week_ago}", "2026-11-02|2026-10-25"),
        ("y={year}/m={month}/d={day}/{date_nodash}", "y=2026/m=11/d=01/20261101"),
        ("{date:%Y/%m/%d}/{yesterday:%d.%m.}", "2026/11/01/31.10."),
        ("keep/{other}/{date}", "keep/{other}/2026-11-01"),
        ("no/template.csv", "no/template.csv"),
    ],
)
def test_render(template, expected):
    assert render(template, DAY) == expected


def test_render_refuses_a_format_that_is_no_strftime_directive():
    """The C library writes an unknown %Q as it is: a backfill of data/{date:%Q}/*.csv read the same literal
    path on every date (each failed "matches no file"), where a template without a date field is refused."""
    assert render("d/{date:%-d.%m.%Y}/{yesterday:%A %j %%}", DAY) == "d/1.11.2026/Saturday 304 %"
    with pytest.raises(ConfigError, match=r"bad format '\{date:%Q\}': %Q is no strftime directive"):
        render("data/{date:%Q}/*.csv", DAY)


def test_has_template():
    assert has_template("x/{date}") and has_template("x/{yesterday:%Y}")
    assert not has_template("x/{other}/y.csv")


def test_date_range_and_errors():
    assert date_range(DAY, dt.date(2026, 11, 3)) == [DAY, dt.date(2026, 11, 2), dt.date(2026, 11, 3)]
    assert date_range(DAY, dt.date(2026, 11, 15), 7) == [DAY, dt.date(2026, 11, 8), dt.date(2026, 11, 15)]
    with pytest.raises(ConfigError, match="before start"):
        date_range(DAY, dt.date(2026, 10, 1))
    with pytest.raises(ConfigError, match="invalid date '2026-13-01'"):
        run_date("2026-13-01")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Base'"):
        run_date(None, "Mars/Base")


def test_run_date_outside_a_flow_is_today_in_the_zone():
    assert run_date("2026-11-05") == dt.date(2026, 11, 5)
    assert run_date(None, "UTC") == dt.datetime.now(dt.UTC).date()


def test_prepare_config_fills_templates_and_resolves_latest(tmp_path):
    cfg = ReduceRunConfig.model_validate(
        {"load": {"apply_to": "raw/{yesterday}/*.csv"}, "model_run": "latest", "output": str(tmp_path)}
    )
    with pytest.raises(StorageError, match="no complete reduce run that trained a model") as e:
        prepare_config(cfg, "2026-11-03")
    # a hint that works wherever the schedule runs (the train-apply deployments exist only under `aeflow serve`)
    assert f"`aeflow run reduce --output {tmp_path} ...`" in str(e.value) and "under `aeflow serve`" in str(e.value)
    plain = ReduceRunConfig.model_validate({"load": {"input": "a.csv"}})
    same, day = prepare_config(plain)
    assert same == plain and day is None, "no template, no date: the config is untouched"
    filled, day = prepare_config(cfg.model_copy(update={"model_run": None}), "2026-11-03")
    assert day == dt.date(2026, 11, 3) and filled.load.apply_to == "raw/2026-11-02/*.csv"


def test_prefect_yaml_deployments_load():
    from flows.deploy import load_specs, to_runner_deployment, with_default_deployments
    from flows.orchestration import ENTRYPOINTS
    from flows.pipeline import FLOWS

    specs = load_specs(REPO / "prefect.yaml")
    by_name = {s.name: s for s in specs}
    for app in FLOWS:
        assert app in by_name, f"prefect.yaml has an on-demand deployment for {app}"
    for s in specs:
        assert s.enforce_parameter_schema
        attr = s.module_entrypoint.rsplit(".", 1)[-1]
        assert s.module_entrypoint.startswith("flows.orchestration.") and attr in ENTRYPOINTS
        dep = to_runner_deployment(s)
        assert dep.entrypoint == s.module_entrypoint
        for sched in dep.schedules:
            assert sched.schedule.timezone == sched.parameters["timezone"] == "Europe/Berlin"
        # parameters are valid for the flow: the config parses
        config_cls = ENTRYPOINTS[attr].fn.__annotations__["config"]
        assert isinstance(config_cls, type), "a real class, so Prefect derives the form and validates"
        config_cls.model_validate(s.parameters.get("config", {}))
        assert "config" in ENTRYPOINTS[attr].parameters.definitions or ENTRYPOINTS[attr].parameters.properties["config"].get("$ref")
    nightly = by_name["reduce-nightly"]
    assert nightly.schedules[0]["cron"] == "30 2 * * *"
    assert nightly.parameters["config"]["model_run"] == "latest"
    # everything prefect.yaml names is served as is; only missing pipeline flows are added on demand
    served = [s.name for s in with_default_deployments(specs)]
    assert served[: len(specs)] == [s.name for s in specs]
    added = served[len(specs):]
    assert "reduce-train-apply" not in added and all(n.endswith("-train-apply") for n in added)
    assert len(set(served)) == len(served)


def test_flows_without_an_entry_get_on_demand_deployments(tmp_path):
    from flows.deploy import load_specs, with_default_deployments

    empty = tmp_path / "prefect.yaml"
    empty.write_text("name: x\ndeployments: []\n")
    names = {s.name for s in with_default_deployments(load_specs(empty))}
    assert {"reduce", "reduce-train-apply"} <= names


def test_prefect_yaml_errors(tmp_path, monkeypatch):
    from flows.deploy import load_specs

    with pytest.raises(ConfigError, match="does not exist"):
        load_specs(tmp_path / "nope.yaml")
    f = tmp_path / "p.yaml"
    f.write_text("deployments:\n  - name: a\n    entrypoint: flows/orchestration.py:reduce\n"
                 "    parameters: {config: {output: '{{ $AEFLOW_TEST_OUT }}'}}\n")
    monkeypatch.delenv("AEFLOW_TEST_OUT", raising=False)
    with pytest.raises(ConfigError, match="AEFLOW_TEST_OUT is not set"):
        load_specs(f)
    monkeypatch.setenv("AEFLOW_TEST_OUT", "s3://b/p")
    assert load_specs(f)[0].parameters["config"]["output"] == "s3://b/p"
    with pytest.raises(ConfigError, match="no deployment named"):
        load_specs(f, ["b"])
