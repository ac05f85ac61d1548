"""The tabular apps' plain functions: the classical peers in the evaluation (detect: pyod's ECOD,
COPOD, HBOS beside IsolationForest, PCA and pyod's AutoEncoder; impute: IterativeImputer over
ExtraTrees), reproducible fits, and the extract evaluation's unshuffled folds. Tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.apps import detect, extract, impute
from tasks.config import ModelConfig, TrainConfig

pytestmark = [pytest.mark.tasks, pytest.mark.tabular]
TINY_TRAIN = TrainConfig(epochs=3, batch_size=32, patience=2, threads=1)


def shifted_rows(n: int = 200, d: int = 5, n_anom: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows near a plane, the last ``n_anom`` far off it (extreme in every column); labels (True = anomaly)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)) @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(n, d))
    x[-n_anom:] = rng.choice([-1.0, 1.0], size=(n_anom, d)) * rng.uniform(6, 8, size=(n_anom, d))
    x = (x - x.mean(0)) / x.std(0)
    return x.astype("float32"), np.arange(n) >= n - n_anom


def test_detect_baselines_hold_every_peer_with_sane_rankings_and_times():
    x, y = shifted_rows()
    seconds: dict[str, float] = {}
    scores = detect.baseline_scores(x, x, k=3, contamination=0.05, seed=0, seconds=seconds)
    assert tuple(scores) == detect.BASELINES, "every peer, in the documented order"
    assert set(seconds) == set(scores) and all(s > 0 for s in seconds.values())
    for name, s in scores.items():
        assert s.shape == (len(x),) and np.isfinite(s).all(), name
        assert detect.ranking_metrics(y, s)["roc_auc"] > 0.9, f"{name} misses rows far off the plane"


def test_detect_baselines_leave_out_a_peer_that_fails_and_keep_the_rest():
    x, _ = shifted_rows(n=40)  # under pyod AutoEncoder's minimum
    scores = detect.baseline_scores(x, x, k=3, contamination=0.1, seed=0)
    assert set(scores) == set(detect.BASELINES) - {"pyod_autoencoder"}


def _detector_scores(x: np.ndarray) -> np.ndarray:
    model, _ = detect.fit_detector(x[:160], x[160:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN,
                                   contamination=0.05, knn_k=5, min_steps=0)
    return detect.anomaly_scores(model, x)


def test_detect_fit_is_reproducible_within_a_process():
    x, _ = shifted_rows()
    first = _detector_scores(x)
    torch.rand(100)  # the global RNG moves on between the two fits, as it does between two runs
    np.testing.assert_array_equal(_detector_scores(x), first)


def _holes(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, 1))
    x = np.hstack([t, 2 * t, -t, t**2]) + 0.05 * rng.normal(size=(n, 4))
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    groups = impute.numeric_groups(4)
    holed, hidden = impute.hide_cells(x, groups, 0.2, seed)
    return x, holed, hidden, groups


def test_impute_fit_is_reproducible_whatever_the_global_rng_state():
    _, holed, _, groups = _holes()

    def imputed() -> np.ndarray:
        model, _ = impute.fit_imputer(holed[:100], holed[100:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN,
                                      mask_fraction=0.25, members=2)
        return impute.fill(holed, impute.reconstruct(model, holed), groups)

    torch.manual_seed(123)
    first = imputed()
    torch.manual_seed(456)  # a fresh process starts from an OS-seeded state: another state going in
    np.testing.assert_array_equal(imputed(), first)


def test_impute_extra_trees_baseline_beats_the_mean_and_honours_its_row_cap():
    x, holed, hidden, groups = _holes(n=200)
    lo, hi = x.min(0), x.max(0)
    seconds: dict[str, float] = {}
    out = impute.baseline_imputations(None, holed, groups, seed=0, extra_trees=True, seconds=seconds)
    assert set(out) == {"mean_mode", "knn", "iterative", "iterative_extratrees"} == set(seconds)
    rmse = {k: impute.imputation_errors(x, v, hidden, groups, lo, hi)["rmse"] for k, v in out.items()}
    assert 0 < rmse["iterative_extratrees"] < 0.5 * rmse["mean_mode"], rmse
    assert not np.isnan(out["iterative_extratrees"]).any()
    capped = impute.baseline_imputations(None, holed, groups, seed=0, extra_trees=True, extra_trees_max_rows=30)
    assert not np.array_equal(capped["iterative_extratrees"], out["iterative_extratrees"]), "fitted on 30 rows"
    np.testing.assert_array_equal(capped["knn"], out["knn"])  # the cap is the ExtraTrees baseline's only
    assert "iterative_extratrees" not in impute.baseline_imputations(None, holed, groups, seed=0)


def test_extract_unshuffled_folds_do_not_depend_on_the_seed():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    x = (rng.normal(size=(60, 6)) + y[:, None] * np.linspace(0, 1.5, 6)).astype("float32")
    x[::2] += 0.5 * rng.normal(size=(30, 6))  # rows unlike their neighbours: the fold assignment matters
    cfg = ModelConfig(latent_dim=2, hidden=(8,))

    def raw(seed: int, shuffle: bool) -> float:
        return extract.downstream_accuracy(x, y, cfg, TINY_TRAIN, folds=3, few_labels=(), seed=seed,
                                           shuffle=shuffle)["raw"]["accuracy"]

    assert raw(0, False) == raw(1, False), "contiguous folds: the same whatever the seed"
    assert len({raw(s, True) for s in range(4)}) > 1, "shuffled folds change with the seed"
