"""The contract every registered application keeps (one suite, parametrized over the registry):
config and CLI wiring, and a flow run on a mixed numeric + categorical table that is applied,
in the same run, to data holding a category never seen at fit time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import COMMON_OPTIONS, app as cli
from flows.pipeline import FLOWS
from tasks.apps import TableApp, load_all
from tasks.config import AppConfig, RunConfig, resolve_config
from tasks.storage import open_run
from tests.flows.test_tabular_flows import FAST, mixed_frame, one_thread  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.flows, pytest.mark.tabular]
# Tabular applications; the image applications have their own flow tests (tests/flows/test_image_flows.py).
APPS = sorted(name for name, a in load_all().items() if getattr(a, "kind", "table") == "table")
MAIN_OUTPUT = {"reduce": "embeddings", "extract": "features", "detect": "scores", "impute": "imputed"}


def test_every_application_is_registered():
    assert {"reduce", "extract", "detect", "impute"} <= set(APPS)


@pytest.mark.parametrize("name", APPS)
def test_config_and_cli_wiring(name):
    application = load_all()[name]
    assert isinstance(application, TableApp) and application.name == name
    assert issubclass(application.Config, AppConfig) and application.Config.name == name
    assert issubclass(application.RunConfig, RunConfig) and application.RunConfig().app_name == name
    assert name in FLOWS and FLOWS[name].name == name
    assert not any(getattr(v, "__class__", None) in (list, dict) for v in vars(application).values()), "no mutable state"
    # Every app option maps to a real config key, and the command shows the common options too.
    for flag, path, typ, _help in application.cli_options:
        value = {int: 3, float: 0.25, str: "1"}[typ]
        cfg = resolve_config(application.RunConfig, options={path: value})
        node = cfg
        for key in path.split("."):
            node = getattr(node, key)
        assert node == value, f"{flag} -> {path}"
    res = CliRunner().invoke(cli, ["run", name, "--help"], terminal_width=200)
    assert res.exit_code == 0
    for _n, flags, *_ in COMMON_OPTIONS:
        assert flags[0] in res.output
    for flag, *_ in application.cli_options:
        assert flag in res.output


@pytest.mark.parametrize("name", APPS)
def test_mixed_table_with_an_unseen_category(name, prefect_server, dask_address, tmp_path):
    df = mixed_frame(90, anomalies=0)
    df.to_csv(tmp_path / "train.csv", index=False)
    new = mixed_frame(30, seed=3, anomalies=0)
    new.loc[[2, 5], "color"] = "purple"  # never seen at fit time
    new.to_parquet(tmp_path / "new.parquet", index=False)
    cfg = resolve_config(load_all()[name].RunConfig, options={
        **FAST, "load.input": str(tmp_path / "train.csv"), "load.apply_to": str(tmp_path / "new.parquet"),
        "load.id_column": "id", "load.label_column": "label", "output": str(tmp_path / "art"),
        "dask_address": dask_address, "model.latent_dim": 2,
    })
    result = FLOWS[name](config=cfg)
    manifest = open_run(result.run_uri).manifest()
    saved = open_run(result.run_uri).read_json("model/config.json")["schema"]
    color = next(c for c in saved["features"] if c["name"] == "color")
    assert color == {"name": "color", "kind": "categorical", "categories": ["blue", "green", "red"]}
    out = pd.read_parquet(result.outputs[MAIN_OUTPUT[name]])
    assert out["id"].tolist() == new["id"].tolist(), "one row per applied row, in order, with its id"
    numeric = out.drop(columns=["id"]).select_dtypes("number")
    assert np.isfinite(numeric.to_numpy(dtype="float64")).all()
    warning = [n for n in manifest.extra["notes"] if "purple" in n]
    assert warning and "column 'color' has 2 value(s) of categories not seen at fit time" in warning[0]
    if name == "impute":
        assert out["color"].tolist() == new["color"].tolist(), "observed values, unseen ones too, are kept"
