"""Found by the fifth walkthrough (a new user follows the README literally, from a scratch folder): what the
README's commands printed or wrote that was not what it says."""

from __future__ import annotations

import os
from types import SimpleNamespace

import dask
import numpy as np
import pytest
from PIL import Image

from tasks.apps.index import ids_frame
from tasks.errors import InputError
from tasks.images import ImageLoadConfig, inspect_images, load_images
from tasks.search import search_sheet

pytestmark = pytest.mark.cli


def _digits(root, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / label / f"{i:04d}.png")


def _loaded(uri: str):
    with dask.config.set(scheduler="synchronous"):
        return load_images(inspect_images(uri), ImageLoadConfig(size=8), run=None, prefix="x")


@pytest.mark.parametrize("form", ["relative-folder", "relative-glob"])
def test_index_ids_name_each_file_from_any_directory(tmp_path, monkeypatch, form):
    # `aeflow run index --input ./artifacts/sample-data/digit-images` stored './artifacts/.../0/0000.png' in
    # index/ids.parquet, so `aeflow search --sheet` from another directory failed ("query ./artifacts/... does
    # not exist", exit 3) and the printed paths led nowhere; a glob input stored the glob itself for every image.
    _digits(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    ids = ids_frame(_loaded("./imgs" if form == "relative-folder" else "imgs/*/*.png"))
    assert len(ids) == 6 and ids["path"].is_unique
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in ids["path"]), list(ids["path"])
    assert ids["path"].iloc[0] == str(tmp_path / "imgs" / "0" / "0000.png")
    assert list(ids["rel"])[:2] == ["0/0000.png", "0/0001.png"] and list(ids["label"]) == ["0"] * 3 + ["1"] * 3


def test_search_sheet_names_a_vanished_indexed_file_as_the_index_s_not_a_query(tmp_path):
    # The contact sheet re-reads the indexed files; one moved since was reported as "query ... does not exist".
    from tasks.search import SearchHit

    gone = str(tmp_path / "imgs" / "0" / "0000.png")
    loaded = SimpleNamespace(run=SimpleNamespace(uri="/runs/index/r1"),
                             meta={"image": {"mode": "gray", "size": 8, "fit": "resize"}})
    hits = [[SearchHit(1, 0, gone, "0", 0.0)]]
    with pytest.raises(InputError) as e:
        search_sheet(loaded, ["q.png"], [np.zeros((1, 8, 8), np.uint8)], hits)  # type: ignore[arg-type]
    assert str(e.value).startswith(f"{gone}, an image of index /runs/index/r1, no longer exists")
    assert "query" not in str(e.value).split("no longer exists")[0]


def test_a_mistyped_column_is_answered_with_the_close_names():
    # `--label-column targt` on the README's digits table listed its first 20 columns ('id, pixel_0_0, ... …'),
    # none of them 'target': the user could not see the name they meant.
    import pandas as pd

    from tasks.schemas import infer_schema

    sample = pd.DataFrame({"id": [1, 2], **{f"pixel_{i}": [0.0, 1.0] for i in range(64)}, "target": [0, 1]})

    def refused(**kw) -> str:
        args = {"label": None, "id_column": None, "exclude": (), "allow_nulls": False, "source": "data.csv"} | kw
        with pytest.raises(InputError) as e:
            infer_schema(sample, **args)
        return str(e.value)

    msg = refused(label="targt")
    assert msg.startswith("label column 'targt' not found in data.csv (did you mean 'target'?); its columns are: id, ")
    assert msg.endswith(" …")
    assert refused(id_column="ID").startswith("id column 'ID' not found in data.csv (did you mean 'id'?); ")
    assert refused(exclude=("notes",)).startswith("excluded column 'notes' not found in data.csv; its columns are: ")


def test_quiet_and_json_runs_hide_prefects_flush_warnings():
    # `aeflow run reduce ... --skip-existing --json` (and -q) printed "WARNING | EventsWorker - Still processing
    # items: 3 items remaining..." on stderr now and then: Prefect's services flushing at exit, not the run's.
    import logging

    from flows.cli.common import quiet_prefect

    names = ("prefect", "prefect.flow_runs", "prefect.task_runs", "EventsWorker", "APILogWorker")
    before = {n: logging.getLogger(n).level for n in names}
    try:
        quiet_prefect(True)
        for name in ("EventsWorker", "APILogWorker"):
            assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
        assert logging.getLogger("prefect.flow_runs").isEnabledFor(logging.WARNING)  # the run's own warnings stay
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
