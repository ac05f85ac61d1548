"""HNSW's ef_search calibration: the default settings reach the target recall on hard codes."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.apps.index import Config, build_index, exact_neighbours, recall_at_k

pytestmark = pytest.mark.tasks


def _recall(index, base, queries, k=10) -> float:
    _, truth = exact_neighbours(base, queries, k)
    _, got = index.search(queries, k)
    return recall_at_k(got, truth, k)


def test_ef_search_is_raised_until_the_target_recall():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6000, 48)).astype(np.float32)  # iid Gaussian: no structure to exploit
    base, queries = data[:5000], data[5000:]
    plain, _ = build_index(base, "hnsw", Config(hnsw_m=8, ef_construction=40, ef_search=10, target_recall=0.0))
    assert plain.hnsw.efSearch == 10
    low = _recall(plain, base, queries)
    assert low < 0.9, f"the uncalibrated index should miss neighbours here (recall {low:.3f})"
    calibrated, kind = build_index(base, "hnsw", Config(hnsw_m=8, ef_construction=40, ef_search=10, target_recall=0.95))
    assert kind == "hnsw" and calibrated.hnsw.efSearch > 10
    # measured on queries that were not part of the calibration sample
    assert _recall(calibrated, base, queries) >= 0.93


def test_calibration_stops_at_the_cap():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3000, 48)).astype(np.float32)
    index, _ = build_index(base, "hnsw", Config(hnsw_m=4, ef_construction=8, ef_search=4, max_ef_search=16,
                                                target_recall=1.0))
    assert index.hnsw.efSearch == 16
