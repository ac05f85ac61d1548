"""The train-then-apply pipeline flow with date templates, then a nightly-style run with ``model_run: latest``."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from flows.orchestration import TRAIN_APPLY
from flows.pipeline import FLOWS
from tasks.apps.reduce import ReduceRunConfig
from tasks.storage import open_run

pytestmark = [pytest.mark.flows]


def test_train_then_apply_over_dated_partitions(prefect_server, dask_address, digits_frame, tmp_path):
    for i, day in enumerate(("2026-11-01", "2026-11-02")):
        (tmp_path / "raw" / day).mkdir(parents=True)
        digits_frame.iloc[i * 200:(i + 1) * 200].to_csv(tmp_path / "raw" / day / "part.csv", index=False)
    out = str(tmp_path / "out")
    cfg = ReduceRunConfig.model_validate({
        "load": {"input": f"{tmp_path}/raw/*/part.csv", "apply_to": f"{tmp_path}/raw/{{yesterday}}/*.csv",
                 "id_column": "id", "label_column": "target"},
        "train": {"epochs": 3, "batch_size": 64}, "model": {"latent_dim": 2},
        "output": out, "dask_address": dask_address,
    })
    state = TRAIN_APPLY["reduce"](config=cfg, date=dt.date(2026, 11, 3), return_state=True)
    assert state.is_completed(), state.message
    res = state.result()
    train_m, apply_m = open_run(res.train.run_uri).manifest(), open_run(res.apply.run_uri).manifest()
    assert train_m.model_run is None and len(train_m.inputs["input"]) == 2
    assert apply_m.model_run == res.train.run_uri, "the apply run names the model it used"
    assert apply_m.inputs["apply_to"][0].path.endswith("2026-11-02/part.csv")
    emb = pd.read_parquet(res.apply.outputs["embeddings"])
    assert emb["id"].tolist() == digits_frame["id"].iloc[200:400].tolist()

    # nightly: the latest trained model applied to the day's partition, date from the parameter
    nightly = ReduceRunConfig.model_validate({
        "model_run": "latest", "load": {"apply_to": f"{tmp_path}/raw/{{date}}/*.csv", "id_column": "id"},
        "output": out, "dask_address": dask_address,
    })
    r = FLOWS["reduce"](config=nightly, date="2026-11-01")
    m = open_run(r.run_uri).manifest()
    assert m.model_run == res.train.run_uri
    assert m.inputs["apply_to"][0].path.endswith("2026-11-01/part.csv")
