"""``aeflow search``: the nearest images of query images in an index run.

An index run (``aeflow run index``) stores the FAISS index of its images' codes, the
id -> path map and the model the codes came from; queries are decoded like the indexed
images, encoded in one batch, and searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tasks.apps.base import Fitted
from tasks.apps.index import (
    INDEX_DIR,
    Index,
    contact_sheet,
    deserialize_index,
    encode_images,
)
from tasks.errors import (
    ConfigError,
    InputError,
    ModelMismatchError,
    StorageError,
    StorageUnavailable,
)
from tasks.images import decode_image
from tasks.storage import MODEL_DIR, RunDir, open_run, storage_op, url_to_fs, write_uri


@dataclass
class SearchHit:
    rank: int
    id: int
    path: str
    label: str
    distance: float


@dataclass
class LoadedIndex:
    run: RunDir
    meta: dict[str, Any]
    index: Any
    ids: Any
    fitted: Fitted


def open_index(uri: str, device: torch.device | None = None) -> LoadedIndex:
    """Open an index run and the model it was built with; check they belong together."""
    import pandas as pd

    device = device or torch.device("cpu")
    run = open_run(uri)
    if run.app != "index" or not run.exists(f"{INDEX_DIR}/meta.json"):
        raise ModelMismatchError(f"{uri} is a {run.app!r} run, not an index run (no {INDEX_DIR}/meta.json)")
    meta = run.read_json(f"{INDEX_DIR}/meta.json")
    model_uri = run.uri if run.exists(f"{MODEL_DIR}/config.json") else meta["model_run"]
    try:
        fitted = Index().load(model_uri, device)
    except StorageError as e:
        if model_uri == run.uri or isinstance(e, StorageUnavailable):  # an outage is said as such, and retried
            raise
        # an index applied with --model: its model lives elsewhere, and a moved or deleted one was reported as
        # "not a run URI" or as a run the user never named
        raise StorageError(f"index {uri} was built with the model {model_uri}, which cannot be opened (moved or deleted "
                           f"since?): {e}; put it back there, or rebuild the index with a model that exists") from e
    if meta["image"].get("mode") == "keep":
        # The collection's images all had one mode, the model's: a query of another mode is converted to it
        # (kept as it is, a gray query was refused by an RGB index, and gray and RGB queries failed together).
        channels = fitted.model.config.in_channels
        meta = {**meta, "image": {**meta["image"], "mode": "gray" if channels == 1 else "rgb"}}
    if meta.get("model_weights") and fitted.weights_hash != meta["model_weights"]:
        raise ModelMismatchError(
            f"index {uri} was built with another model: its codes come from weights {meta['model_weights'][:19]}…, "
            f"but {model_uri} holds {str(fitted.weights_hash)[:19]}…; rebuild the index with this model"
        )
    index = deserialize_index(run.read_bytes(f"{INDEX_DIR}/index.faiss"), meta)
    if index.d != meta["dim"]:
        raise ModelMismatchError(f"index {uri}: index dimension {index.d} differs from meta.json's {meta['dim']}")
    with run.open(f"{INDEX_DIR}/ids.parquet", "rb") as f:
        ids = pd.read_parquet(f)
    return LoadedIndex(run, meta, index, ids, fitted)


def read_query(uri: str, meta: dict[str, Any]) -> np.ndarray:
    """Decode a query image the way the index's images were (mode, size): any mode/size is converted."""
    fs, path = url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise InputError(f"query {uri} does not exist") from e
    except OSError as e:
        raise InputError(f"cannot read query {uri}: {e}") from e
    img = meta["image"]
    try:
        return decode_image(data, img["mode"], img["size"], img.get("fit", "resize"))
    except ValueError as e:
        raise InputError(f"query {uri}: {e}") from e


def search(loaded: LoadedIndex, queries: list[str], k: int = 10, device: torch.device | None = None,
           arrays: list[np.ndarray] | None = None) -> tuple[list[list[SearchHit]], list[np.ndarray]]:
    """The ``k`` nearest images of each query (one batched encode and search); ``arrays``: the queries
    already decoded (:func:`read_queries`)."""
    device = device or torch.device("cpu")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if arrays is None:
        arrays = [read_query(q, loaded.meta) for q in queries]
    x = np.stack(arrays)
    want = loaded.fitted.model.config.in_channels
    if x.shape[1] != want:  # cannot happen: queries decode to the index's mode (open_index resolves "keep")
        raise InputError(f"queries decode to {x.shape[1]} channels but the index's model takes {want}")
    codes = encode_images(loaded.fitted.model, x, device)
    if codes.shape[1] != loaded.meta["dim"]:
        raise ModelMismatchError(f"query codes have {codes.shape[1]} dimensions, the index {loaded.meta['dim']}")
    dist, idx = loaded.index.search(codes, min(k, loaded.meta["n"]))
    out = []
    for drow, irow in zip(dist, idx, strict=True):
        hits = []
        for rank, (d, i) in enumerate(((d, i) for d, i in zip(drow, irow, strict=True) if i >= 0), start=1):
            r = loaded.ids.iloc[int(i)]
            hits.append(SearchHit(rank, int(r["id"]), str(r["path"]), str(r["label"]), float(d)))
        out.append(hits)
    return out, arrays


def expand_queries(queries: list[str], skip_bad: bool = False) -> tuple[list[str], list[str]]:
    """Query images and folders of them (``aeflow search --query``) as the URIs of every image, and what was left out.

    A folder holding files that are not PNG/JPEG images is refused naming the first (as a run's input is),
    or with ``skip_bad`` they are left out (so is a query file that is not one): the second list says which
    and why (``"uri: reason"``).

    Raises:
        InputError: a query that does not exist, is not a PNG/JPEG image, or a folder with other files.
    """
    from tasks.images import list_images, not_an_image, other_files_error
    from tasks.inputs import find_files
    from tasks.storage import to_uri

    out: list[str] = []
    left_out: list[str] = []
    for q in queries:
        try:
            fs, paths, others, _root = list_images(q, "query")
        except InputError:
            # A query file that is not a PNG/JPEG image (or a folder or glob of only such files) is refused
            # like a folder holding one, and with skip_bad left out like one: it failed even with --skip-bad.
            if not skip_bad:
                raise
            fs, found, _root = find_files(q, "query")
            if not found:  # nothing there at all: not a bad file to leave out
                raise
            left_out += [f"{to_uri(fs, p)}: {not_an_image(p)}" for p in found]
            continue
        others = [to_uri(fs, p) for p in others]
        if others and not skip_bad:
            raise other_files_error(others, "query", q, "pass --skip-bad to search the others")
        left_out += [f"{o}: {not_an_image(o)}" for o in others]
        out += [to_uri(fs, p) for p in paths]
    if not out and left_out:  # --skip-bad left out every file
        raise InputError(f"no query is a PNG/JPEG image: {left_out[0]}"
                         + (f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else ""))
    return out, left_out


def read_queries(queries: list[str], meta: dict[str, Any], skip_bad: bool = False
                 ) -> tuple[list[str], list[np.ndarray], list[str]]:
    """The queries that decode, their arrays, and (with ``skip_bad``) those left out as ``"uri: reason"``.

    Raises:
        InputError: a query that does not decode (without ``skip_bad``), or none that does.
    """
    kept, arrays, left_out = [], [], []
    for q in queries:
        try:
            arrays.append(read_query(q, meta))
        except InputError as e:
            if not skip_bad:
                raise
            left_out.append(str(e).removeprefix("query "))
            continue
        kept.append(q)
    if not kept:
        raise InputError(f"none of the {len(queries)} queries is a decodable PNG/JPEG image")
    return kept, arrays, left_out


def write_search_sheet(dest: str, loaded: LoadedIndex, queries: list[str], arrays: list[np.ndarray],
                       hits: list[list[SearchHit]]) -> None:
    write_uri(dest, search_sheet(loaded, queries, arrays, hits))


def _read_result(path: str, loaded: LoadedIndex) -> np.ndarray:
    """An indexed image, read again for the contact sheet: one that is gone is named as the index's, not a query."""
    fs, p = url_to_fs(path)
    with storage_op("read", path):
        there = fs.exists(p)
    if not there:
        raise InputError(f"{path}, an image of index {loaded.run.uri}, no longer exists (moved or deleted since the "
                         "index was built?): the contact sheet shows the indexed files; search without --sheet, "
                         "or rebuild the index")
    return read_query(path, loaded.meta)


def search_sheet(loaded: LoadedIndex, queries: list[str], arrays: list[np.ndarray], hits: list[list[SearchHit]]) -> bytes:
    """Contact sheet of queries and their results (results decoded from their original files)."""
    results = [[_read_result(h.path, loaded) for h in row] for row in hits]
    dist = np.array([[h.distance for h in row] + [np.nan] * (max(len(r) for r in hits) - len(row)) for row in hits])
    return contact_sheet(arrays, results, dist, queries, [[h.path for h in row] for row in hits])
