"""The contract every registered application keeps: one suite, parametrized over the registry
(the seven built-in applications and ``passthrough``, an eighth defined in one module by the
test itself), each checked against its real outputs.

- wiring: the class, its configs, its flow, its `aeflow run APP` command and options;
- a tiny real run (Prefect server, Dask cluster): every output exists and is in the manifest
  with its hash, every headline metric is reported, the saved model loads back through the one
  model loader (a run or a model folder), and reusing it with --model completes, with apply on
  the Dask cluster writing exactly the bytes apply in the flow's own process writes;
- tables: a mixed numeric + categorical table applied, in the same run, to data holding a
  category never seen at fit time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import COMMON_OPTIONS, build_app
from flows.cli.run import option_specs
from flows.pipeline import FLOWS, unused_with_model
from tasks.apps.base import (
    APP_MODULES,
    Application,
    Fitted,
    load_all,
    register,
    unregister,
)
from tasks.apps.kinds import IMAGES, TABLES
from tasks.config import AppConfig, RunConfig, resolve_config
from tasks.storage import open_run
from tests.flows.passthrough import Passthrough
from tests.flows.test_tabular_flows import FAST, mixed_frame, one_thread  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.flows]

APPS = sorted({*APP_MODULES, "passthrough"})
TABULAR = ("detect", "extract", "impute", "passthrough", "reduce")
TINY_CONV = {"model.channels": [8, 16], "model.latent_channels": 8, "train.epochs": 2, "train.batch_size": 16,
             "train.patience": 5}
TINY_RUN: dict[str, dict] = {
    "denoise": {**TINY_CONV, "app.patches": 64, "app.patch_size": 16, "app.baselines": ["tv"], "app.side_by_side": 1,
                "app.eval_images": 2},
    "index": {**TINY_CONV, "load.size": 16},
    "compress": {"app.channels": 8, "app.latent_channels": 8, "app.patches": 8, "app.patch_size": 16,
                 "app.jpeg_qualities": [30, 60, 90], "app.webp_qualities": [30, 60, 90], "train.epochs": 1,
                 "train.batch_size": 8},
}


APPLY_TASK = {"denoise": "denoise_shard", "index": "encode_shard", "compress": "code_shard"}  # Dask drops the "_"


@pytest.fixture(scope="module", autouse=True)
def passthrough_registered():
    """The eighth application: one module (tests/flows/passthrough.py) plus this one registry line."""
    register(Passthrough)
    yield
    unregister("passthrough")


def test_the_registry_holds_every_application():
    assert set(APP_MODULES) | {"passthrough"} == set(load_all())
    assert {a for a, app in load_all().items() if app.data is TABLES} == set(TABULAR)
    assert {a for a, app in load_all().items() if app.data is IMAGES} == {"compress", "denoise", "index"}


def _sample(model: type, path: str, typ: type):
    """A valid value for the config field at ``path`` (one of its choices when it has a fixed set)."""
    import typing

    *sections, leaf = path.split(".")
    for key in sections:
        model = model.model_fields[key].annotation
    annotation = model.model_fields[leaf].annotation
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(optional) == 1:  # X | None: a value of X
        annotation = optional[0]
    choices = [a for a in typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal]
    if choices:
        return choices[-1]
    if path == "model.hidden":
        return [16]
    if path == "app.quality":  # compress: a level the codec to train has (7 by default)
        return 3
    return {int: 16, float: 0.25, str: "1"}[typ]


@pytest.mark.parametrize("name", APPS)
def test_config_and_cli_wiring(name):
    application = load_all()[name]
    assert isinstance(application, Application) and application.name == name
    assert issubclass(application.Config, AppConfig) and application.Config.name == name
    assert issubclass(application.RunConfig, RunConfig) and application.RunConfig().app_name == name
    assert FLOWS[name].name == name
    assert application.headlines, "every application declares the metrics people compare first"
    # Every option maps to a real config key of the app's RunConfig.
    for _name, flags, path, typ, _help in option_specs(application):
        if typ is bool or typ == list[str]:
            continue
        value = _sample(application.RunConfig, path, typ)
        cfg = resolve_config(application.RunConfig, options={path: value})
        node = cfg
        for key in path.split("."):
            node = getattr(node, key)
        assert node == (tuple(value) if isinstance(value, list) else value), f"{flags[0]} -> {path}"
    res = CliRunner().invoke(build_app(), ["run", name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for _n, flags, *_ in COMMON_OPTIONS:
        accepted = application.common_options or application.data.common_options
        assert (flags[0] in res.output) == (accepted is None or _n in accepted), flags[0]
    for flag, *_ in application.cli_options:
        assert flag in res.output
    for path in application.fit_only:  # each names a setting of the app's config (a misspelt one never matches)
        node = application.RunConfig()
        for key in path.split("."):
            assert key in type(node).model_fields, f"{name}.fit_only: {path!r} is no setting"
            node = getattr(node, key)


# Settings given with --model: (those the reused model stands for, named in the run's notes and log; those its
# apply, evaluation or report still read, not named). detect's --contamination (its threshold_ is fixed at fit
# time) went unnamed beside --latent-dim, and so did every application's fit-time app.* settings.
WITH_MODEL: dict[str, tuple[dict, dict]] = {
    "detect": ({"app.contamination": 0.3, "app.knn_k": 5, "app.robust": False, "app.min_steps": 10,
                "model.latent_dim": 3, "train.epochs": 3, "preprocess.scaler": "minmax"},
               {"app.threshold": 2.0, "app.positive_label": "0", "app.bins": 20, "train.seed": 3}),
    "impute": ({"app.members": 2, "app.mask_fraction": 0.5, "app.passes": 1, "app.head_alpha": 0.0},
               {"app.eval_fraction": 0.3, "app.extra_trees": False, "app.knn_neighbors": 3}),
    # extract's evaluation trains encoders with the model and train settings, of the reused model's width
    "extract": ({"model.latent_dim": 3, "preprocess.val_fraction": 0.3, "train.memory_mb": 64},
                {"model.hidden": [16], "train.epochs": 3, "app.cv_folds": 3, "app.input_mask": 0.2}),
    "reduce": ({"model.latent_dim": 3, "train.lr": 0.01}, {"app.trust_sample": 50, "app.plot_points": 200}),
    "denoise": ({"app.sigma": 10.0, "app.patches": 64, "app.noise": ["gaussian", "mask"], "preprocess.val_fraction": 0.3},
                {"app.noise_sigma": 10.0, "app.tile": 64, "app.eval_images": 2}),
    "index": ({"app.latent_noise": 0.0, "model.latent_channels": 4},
              {"app.k": 5, "app.index": "exact", "app.eval_queries": 10, "load.size": 16}),
    "compress": ({"app.lambdas": [0.01, 0.1], "app.codec": "hyperprior", "app.patches": 16},
                 {"app.quality": 1, "app.rd_images": 2, "app.jpeg_qualities": [50]}),
}


@pytest.mark.parametrize("name", sorted(WITH_MODEL))
def test_settings_a_reused_model_stands_for_are_named(name):
    application = load_all()[name]
    ignored, applied = WITH_MODEL[name]
    cfg = resolve_config(application.RunConfig, options={"model_run": "runs/x/y", **ignored, **applied})
    named = unused_with_model(cfg, application.RunConfig(), application.fit_only)
    assert sorted(n.split("=")[0] for n in named) == sorted(ignored), named


# ---------------------------------------------------------------------------------------
# A tiny real run of every application


def _image(i: int, size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    img = 120 + 70 * np.sin(xx / (3 + i % 4)) * np.cos(yy / (4 + i % 3))
    img[5 + i % 7 : 20 + i % 5, 6:30] = 230 if i % 2 else 20
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Per data kind: a labelled mixed table, and class folders of small images."""
    d = tmp_path_factory.mktemp("contract")
    mixed_frame(120, anomalies=12).to_csv(d / "table.csv", index=False)
    for i in range(24):
        path = d / "images" / f"class{i % 3}" / f"im{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(i if i % 3 else i + 1)).save(path)
    return d


def _options(name: str, d, dask_address: str, out: str) -> dict:
    if name in TABULAR:
        return {**FAST, "load.input": str(d / "table.csv"), "load.id_column": "id", "load.label_column": "label",
                "output": out, "dask_address": dask_address, **({"app.positive_label": "1"} if name == "detect" else {})}
    return {**TINY_RUN[name], "load.input": str(d / "images"), "output": out, "dask_address": dask_address}


def _sha256(path: str) -> str:
    return "sha256:" + hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("name", APPS)
def test_a_real_run_keeps_the_contract(name, prefect_server, dask_address, inputs, tmp_path, monkeypatch):
    application = load_all()[name]
    out = str(tmp_path / "art")
    cfg = resolve_config(application.RunConfig, options=_options(name, inputs, dask_address, out))
    result = FLOWS[name](config=cfg)
    run = open_run(result.run_uri)
    manifest = run.manifest()
    assert manifest.app == name and manifest.timings.keys() >= {"inspect", application.data.load_stage, "train",
                                                                 "apply", "evaluate", "report"}
    recorded = {o.path: o.hash for o in manifest.outputs}
    for key, uri in result.outputs.items():
        assert os.path.exists(uri), f"{name}: output {key} missing"
        if os.path.isfile(uri):
            rel = os.path.relpath(uri, result.run_uri).replace(os.sep, "/")
            assert recorded[rel] == _sha256(uri), f"{name}: {rel} differs from its manifest record"
    heads = application.headlines_of(result.metrics)
    missing = [m for m, _ in heads if m not in result.metrics] + ["?"] * (len(application.headlines) - len(heads))
    assert not missing, f"{name} did not report its headline metrics {application.headlines}: {result.metrics}"
    # The one model loader: the run, and the same model as a bare model folder, load to the same weights.
    meta = run.read_json("model/config.json")
    assert meta.get("app") == name and meta["weights"] == _sha256(os.path.join(result.run_uri, "model",
                                                                                "weights.safetensors"))
    folder = tmp_path / "model-folder"
    shutil.copytree(os.path.join(result.run_uri, "model"), folder)
    from_run, from_folder = application.load(result.run_uri, torch.device("cpu")), application.load(str(folder), torch.device("cpu"))
    assert isinstance(from_run, Fitted) and from_run.source_run == result.run_uri
    for (k, a), (_, b) in zip(from_run.model.state_dict().items(), from_folder.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # Train once, apply later: --model (here the folder) on the same data.
    reuse = resolve_config(application.RunConfig, options={
        **_options(name, inputs, dask_address, out), "model_run": str(folder), "load.input": None,
        "load.apply_to": cfg.load.input})
    again = FLOWS[name](config=reuse)
    m2 = open_run(again.run_uri).manifest()
    assert m2.model_run == str(folder) and "train" not in m2.timings
    assert again.outputs and (name not in TABULAR or application.output in again.outputs)
    # Apply ran as tasks on the Dask cluster's workers (asserted from the scheduler) ...
    from distributed import Client

    with Client(dask_address, timeout="20s") as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert APPLY_TASK.get(name, "apply_part_task") in prefixes
    # ... and wrote the same bytes as apply in the flow's own process.
    monkeypatch.setattr("tasks.dask_client.current_client", lambda: None)
    here = FLOWS[name](config=reuse.model_copy(update={"output": str(tmp_path / "in-process")}))
    on_cluster, in_process = _applied_files(again.run_uri), _applied_files(here.run_uri)
    assert on_cluster and on_cluster.keys() == in_process.keys()
    differ = [rel for rel in on_cluster if on_cluster[rel] != in_process[rel]]
    assert not differ, f"{name}: apply on the cluster and in process differ in {differ}"
    if name in ("reduce", "index"):  # one table app, one image app: the run's own LocalCluster of worker threads
        monkeypatch.undo()
        local = FLOWS[name](config=reuse.model_copy(update={"output": str(tmp_path / "local"), "dask_address": None}))
        dask_info = open_run(local.run_uri).manifest().extra["execution"]["dask"]
        assert dask_info["scheduler"] is None and dask_info["workers_are"] == "threads", "small inputs: threads (auto)"
        assert _applied_files(local.run_uri) == on_cluster, f"{name}: apply on local worker threads differs"


def _applied_files(run_uri: str) -> dict[str, str]:
    """The hashes of what apply wrote (not reports, timings or the preprocessed input)."""
    skip = ("report/", "preprocessed", "images/", "model/", "manifest.json", "per_image.parquet")
    return {o.path: o.hash for o in open_run(run_uri).manifest().outputs if not o.path.startswith(skip)}


@pytest.mark.parametrize("name", TABULAR)
def test_mixed_table_with_an_unseen_category(name, prefect_server, dask_address, tmp_path):
    application = load_all()[name]
    df = mixed_frame(90, anomalies=0)
    df.to_csv(tmp_path / "train.csv", index=False)
    new = mixed_frame(30, seed=3, anomalies=0)
    new.loc[[2, 5], "color"] = "purple"  # never seen at fit time
    new.to_parquet(tmp_path / "new.parquet", index=False)
    cfg = resolve_config(application.RunConfig, options={
        **FAST, "load.input": str(tmp_path / "train.csv"), "load.apply_to": str(tmp_path / "new.parquet"),
        "load.id_column": "id", "load.label_column": "label", "output": str(tmp_path / "art"),
        "dask_address": dask_address, "model.latent_dim": 2,
    })
    result = FLOWS[name](config=cfg)
    manifest = open_run(result.run_uri).manifest()
    saved = open_run(result.run_uri).read_json("model/config.json")["schema"]
    color = next(c for c in saved["features"] if c["name"] == "color")
    assert color == {"name": "color", "kind": "categorical", "categories": ["blue", "green", "red"]}
    out = pd.read_parquet(result.outputs[application.output])
    assert out["id"].tolist() == new["id"].tolist(), "one row per applied row, in order, with its id"
    numeric = out.drop(columns=["id"]).select_dtypes("number")
    assert np.isfinite(numeric.to_numpy(dtype="float64")).all()
    warning = [n for n in manifest.extra["notes"] if "purple" in n]
    assert warning and "column 'color' has 2 value(s) of categories not seen at fit time" in warning[0]
    if name == "impute":
        assert out["color"].tolist() == new["color"].tolist(), "observed values, unseen ones too, are kept"


def test_an_eighth_application_gets_its_cli_command_and_flow(prefect_server, dask_address, inputs, tmp_path):
    """What adding an application buys: `aeflow run passthrough` works end to end from the CLI."""
    res = CliRunner().invoke(build_app(), [
        "run", "passthrough", "--input", str(inputs / "table.csv"), "--id-column", "id", "--label-column", "label",
        "--output", str(tmp_path / "art"), "--dask-address", dask_address, "--epochs", "3", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    table = pd.read_parquet(result["outputs"]["passthrough"])
    src = pd.read_csv(inputs / "table.csv")
    assert table["id"].tolist() == src["id"].tolist() and "a" in table.columns
    assert 0 <= result["metrics"]["recon_mse"] < 1.0
