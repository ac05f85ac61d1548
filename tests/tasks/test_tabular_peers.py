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
    skipped: dict[str, str] = {}
    scores = detect.baseline_scores(x, x, k=3, contamination=0.1, seed=0, skipped=skipped)
    assert set(scores) == set(detect.BASELINES) - {"pyod_autoencoder"}
    assert skipped == {"pyod_autoencoder": "40 rows to fit on, it needs at least 64"}, "the run's notes say why"


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


def test_impute_head_never_sees_the_validation_rows(monkeypatch):
    """The run's evaluation hides cells of the validation rows; a head fitted on them (it was, on training and
    validation rows) knew their true values, and its RMSE there was 3-9% lower than a head that had not seen them."""
    from models.dense import MaskedImputer

    seen: list[np.ndarray] = []
    fit_head = MaskedImputer.fit_head
    monkeypatch.setattr(MaskedImputer, "fit_head", lambda self, x, *a, **k: (seen.append(np.asarray(x)),
                                                                              fit_head(self, x, *a, **k))[1])
    _, holed, _, _ = _holes()
    impute.fit_imputer(holed[:100], holed[100:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN,
                       mask_fraction=0.25, members=1)
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], holed[:100])


def test_the_long_steps_after_training_say_what_they_do(caplog):
    """impute's head fit and detect's scoring ran for minutes on a big table without a line in the log."""
    import logging

    from tasks.apps import detect

    _, holed, _, _ = _holes()
    with caplog.at_level(logging.INFO):
        impute.fit_imputer(holed[:100], holed[100:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN,
                           mask_fraction=0.25, members=1)
        x = np.nan_to_num(holed)
        detect.fit_detector(x[:100], x[100:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN, contamination=0.1,
                            min_steps=1)
    # on the training rows only: the evaluation hides cells of the validation rows (holed[100:])
    assert "impute: fitting the per-column linear head on 100 training rows" in caplog.text
    assert f"detect: scoring {len(holed)} rows to fix the score's scales" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # impute's baselines, minutes together on a big table: each says it ended
        impute.baseline_imputations(holed[:100], holed[100:], impute.numeric_groups(4), k=3)
    for name in ("mean_mode", "knn", "iterative"):
        assert f"impute evaluation: {name} baseline fitted on 100 rows, imputed 20 in " in caplog.text, caplog.text


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


def test_part_agreement_is_a_rank_correlation_and_zero_when_undefined():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert detect.part_agreement(a, a**3) == pytest.approx(1.0), "monotone: full agreement"
    assert detect.part_agreement(a, -a) == pytest.approx(-1.0)
    assert detect.part_agreement(a, np.ones(4)) == 0.0, "a constant part agrees with nothing"
    assert detect.part_agreement(a[:2], a[:2]) == 0.0, "too few rows to say"


def test_tail_part_weighs_only_where_it_agrees_with_the_input_space_part():
    """Chosen without labels: on Gaussian rows (anomalies would be global extremes) the tail part agrees
    with the input-space distance and gets a weight; on rows in separated clusters (anomalies would sit
    between them) it does not, and the detector has no tail part."""
    rng = np.random.default_rng(0)
    gauss = rng.normal(size=(300, 6)).astype("float32")
    clusters = (rng.normal(size=(300, 6)) * 0.3 + rng.choice([-2.0, 2.0], size=(300, 2)).repeat(3, axis=1)).astype("float32")
    cfg = ModelConfig(latent_dim=2, hidden=(8,))

    def fitted(x: np.ndarray, **kw) -> detect.KnnAutoencoderDetector:
        return detect.fit_detector(x[:250], x[250:], cfg, TINY_TRAIN, contamination=0.05, min_steps=0, **kw)[0]

    g = fitted(gauss)
    assert 0 < g.config.tail_weight < 128 and g.config.part_names[-1] == "tail"
    c = fitted(clusters)
    assert c.config.tail_weight == 0 and "tail" not in c.config.part_names
    assert "tail" not in fitted(gauss, tail_weight=0.0).config.part_names
    assert "COPOD-style tail part" in detect.score_description(g)
    assert "no tail part" in detect.score_description(c) and "8 x input-space" in detect.score_description(c)
    s = detect.anomaly_scores(g, gauss)
    assert s.shape == (300,) and np.isfinite(s).all()


def test_masking_loss_hides_input_cells_and_scores_the_clean_row():
    class Identity(torch.nn.Module):
        def forward(self, x):
            return type("Out", (), {"x_hat": x})()

    batch = torch.ones(64, 10)
    gen = torch.Generator().manual_seed(0)
    assert extract.masking_loss(Identity(), batch, gen, hide=0.0).item() == 0.0, "plain: the identity rebuilds all"
    masked = extract.masking_loss(Identity(), batch, gen, hide=0.5).item()
    assert 0.4 < masked < 0.6, "about half the cells set to 0 (the mean) cost 1 each against the clean row"


class _RunLog:
    """Stands in for Prefect's run logger (what reaches the terminal and the UI in a run)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, fmt: str, *args) -> None:
        self.lines.append(fmt % args)

    warning = info


def test_detect_fit_lines_reach_the_run_log(monkeypatch):
    """detect's fit lines went to a plain ``aeflow.detect`` logger that has no handler in a run: the 3-minute
    silence after training on 3.75M rows never said what it did, nor the tail part's agreement the README cites."""
    run_log = _RunLog()
    monkeypatch.setattr("tasks.train.run_logger", lambda: run_log)
    x, _ = shifted_rows()
    detect.fit_detector(x[:150], x[150:], ModelConfig(latent_dim=2, hidden=(8,)), TINY_TRAIN, contamination=0.1,
                        min_steps=1)
    said = "\n".join(run_log.lines)
    assert "detect: 20 of 200 rows set aside before the final fit" in said, said
    assert "detect: scoring 200 rows to fix the score's scales" in said, said
    assert "detect: tail part agrees with the input part at Spearman" in said, said
    run_log.lines.clear()  # the evaluation's baselines took 4 silent minutes on 100,000 rows
    detect.baseline_scores(x, x, k=2, contamination=0.1, seed=0)
    assert [line.split(" fitted on")[0] for line in run_log.lines] == [f"detect: baseline {b}" for b in detect.BASELINES]


def test_detect_threshold_comes_from_a_capped_sample_of_the_training_scores(monkeypatch):
    """Detect.fit scored every fit row (a 1.1M-row sample at the default memory_mb: 3 silent minutes on 2 cores)
    only to take one percentile: a seeded sample of THRESHOLD_ROWS of them fixes it, and the notes say so."""
    from types import SimpleNamespace

    x, _ = shifted_rows()
    monkeypatch.setattr(detect, "THRESHOLD_ROWS", 60, raising=False)
    monkeypatch.setattr(detect.Detect, "training_rows", lambda self, ctx: (x[:150], x[150:]))
    scored: list[np.ndarray] = []
    real = detect.anomaly_scores

    def recording(model, rows, device="cpu"):
        scored.append(real(model, rows, device))
        return scored[-1]

    monkeypatch.setattr(detect, "anomaly_scores", recording)
    cfg = detect.DetectRunConfig().model_copy(update={
        "train": TINY_TRAIN, "model": ModelConfig(latent_dim=2, hidden=(8,)),
        "app": detect.Config(min_steps=1, contamination=0.1)})
    ctx = SimpleNamespace(config=cfg, notes=[], run=None, device=torch.device("cpu"), schema=None,
                          train=SimpleNamespace(stats=None))
    fitted = detect.Detect().fit(ctx)
    assert [len(s) for s in scored] == [60], "the threshold's scores: 60 sampled training rows, not all 200"
    assert fitted.state["threshold_"] == pytest.approx(np.percentile(scored[0], 90.0))
    assert any("seeded sample of 60 of the 200 training rows' scores" in n for n in ctx.notes), ctx.notes


def test_table_apply_says_how_far_it_is_on_long_work(monkeypatch):
    """Apply over 30 partitions of 3.75M rows ran 8 minutes (detect) without a line in the log."""
    from types import SimpleNamespace

    from tasks.apps import get_app

    run_log = _RunLog()
    monkeypatch.setattr("tasks.train.run_logger", lambda: run_log)
    monkeypatch.setattr("tasks.train.STEP_LOG_EVERY_S", 0.0)  # a line per partition (but the last)
    app = get_app("reduce")
    monkeypatch.setattr(type(app), "map_shards",
                        lambda self, ctx, fitted, fn, items, on_done=None: [on_done(10) or 10 for _ in items])
    app.apply(SimpleNamespace(target=SimpleNamespace(parts=("a", "b", "c"), n_rows=30)), None)
    assert len(run_log.lines) == 2, run_log.lines
    import re

    assert re.fullmatch(r"reduce apply: 1/3 partitions, 10 of 30 rows, [\d,]+ rows/s, about \d+ (s|min|h \d+ min) left",
                        run_log.lines[0]), run_log.lines
    assert run_log.lines[1].startswith("reduce apply: 2/3 partitions, 20 of 30 rows, "), run_log.lines


def test_impute_help_names_the_settings_it_cites():
    """`aeflow run impute --help` (the module docstring without its double backticks) read "an ensemble of members such
    autoencoders ... and passes refinement passes": the setting names turned into words."""
    doc = " ".join(impute.__doc__.replace("``", "").split())
    assert "an ensemble of app.members (5) such autoencoders" in doc
    assert "app.passes (2) refinement passes" in doc
    assert impute.Config().members == 5 and impute.Config().passes == 2, "the defaults the help cites"


def test_impute_baselines_fit_in_float64_and_one_that_fails_is_left_out(monkeypatch):
    """On a 20,000-row sample of a 1M-row table (36 numeric, 2 categorical columns) IterativeImputer overflowed on
    the float32 rows ("Input X contains infinity") and its traceback failed the run after 7 minutes, discarding a
    finished imputed.parquet: the baselines now compute in float64, and a baseline that still fails is left out."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, SimpleImputer

    _, holed, _, groups = _holes()
    assert holed.dtype == np.float32
    dtypes: list = []
    real_fit = SimpleImputer.fit
    monkeypatch.setattr(SimpleImputer, "fit", lambda self, X, y=None: dtypes.append(X.dtype) or real_fit(self, X, y))

    def overflow(self, X):
        raise ValueError("Input X contains infinity or a value too large for dtype('float32').")

    monkeypatch.setattr(IterativeImputer, "transform", overflow)
    run_log = _RunLog()
    monkeypatch.setattr("tasks.train.run_logger", lambda: run_log)
    out = impute.baseline_imputations(holed[:100], holed[100:], groups, seed=0)
    assert set(out) == {"mean_mode", "knn"}, "the failing IterativeImputer is left out, the others stay"
    assert dtypes and all(d == np.float64 for d in dtypes), dtypes
    said = ("impute: iterative baseline skipped: ValueError: Input X contains infinity or a value too large for "
            "dtype('float32').")
    assert [x for x in run_log.lines if "baseline fitted on" not in x] == [said], run_log.lines
    assert [x.split(" baseline")[0] for x in run_log.lines if "baseline fitted on" in x] == \
        ["impute evaluation: mean_mode", "impute evaluation: knn"], "the two that ran say so; the failed one does not"


def test_impute_knn_baseline_computes_its_distances_in_small_chunks(monkeypatch):
    """KNNImputer's pairwise distances come in chunks of sklearn's working_memory (1 GiB by default): the impute
    run's process peaked at 3.5-3.8 GB on 20,000 x 20,000 baseline rows (found by the ninth walkthrough). The
    baselines run with a small working memory (0.46 GB peak there, and faster), and the setting is restored."""
    import sklearn
    from sklearn.impute import KNNImputer

    _, holed, _, groups = _holes()
    seen = []
    real = KNNImputer.transform
    monkeypatch.setattr(KNNImputer, "transform", lambda self, X: seen.append(sklearn.get_config()["working_memory"])
                        or real(self, X))
    before = sklearn.get_config()["working_memory"]
    out = impute.baseline_imputations(holed[:100], holed[100:], groups, seed=0)
    assert seen == [impute.BASELINE_WORKING_MEMORY_MB] and impute.BASELINE_WORKING_MEMORY_MB <= 128
    assert sklearn.get_config()["working_memory"] == before
    assert np.isfinite(out["knn"]).all()
