"""detect: anomaly detection with an autoencoder, with the pyod contract.

The score of a row (higher = more anomalous) is a weighted sum of parts, each
first put on a common scale with its training median and interquartile range
(``scaling="robust"``; ``models/detector.py``):

- ``input_weight`` (8) x the mean fractional (Minkowski p = ``input_p`` = 0.5)
  distance of the (scaled) row to its ``knn_k`` (30) nearest training rows: rows
  in empty regions of the data;
- ``knn_weight`` (1) x the mean distance of the row's autoencoder code to its
  ``knn_k`` nearest training codes: rows in empty regions of the code space;
- a tail probability part in the manner of COPOD: rows in the far tails of many
  columns at once. Its weight is chosen at fit time without labels: 0 unless the
  part agrees with the input-space part on the training rows (Spearman correlation
  above ``tail_min_agreement``, 0.8), then growing linearly to ``tail_weight``
  (128) at full agreement. Where both agree the data's anomalies are global
  extremes, which the tail part ranks best (breast cancer); where they disagree the
  anomalies sit between normal rows (digits, wine) and the tail part would add noise;
- ``center_weight`` (0) x the row's mean squared distance to the training column
  means, in training standard deviations, and ``recon_weight`` (0) x the
  autoencoder's reconstruction error.

Be clear about what ranks: on the benchmark (benchmarks/RESULTS.md) the
input-space distance carries most of it, the tail part carries breast cancer
(there the score is close to COPOD's own), and the code-space distance (the only
part the autoencoder contributes) adds little; the reconstruction error made
every ranking worse, so by default it weighs 0 (set ``app.recon_weight`` to use it).

``contamination`` is validated in (0, 0.5]; ``threshold_`` is fixed once at fit
time as the (1 - contamination) percentile of the training scores, or given with
``--threshold``. Output ``scores.parquet``: the id column (when given), ``score``
and ``is_anomaly`` (``score > threshold_``), one row per input row in input order.

Semi-supervised use: fit on ``--input`` (normal data), score ``--apply-to``.
Unsupervised use: fit and score the same data. The fit is robust to the
anomalies it contains (``robust``, the default): each batch's largest-loss share
(the contamination) is left out of the loss, and a first fit ranks the rows so
that the worst-reconstructed contamination share is set aside before the final
fit and is not part of the code-space reference (the input-space reference and the
centre use every training row).

With a label column (``positive_label`` marks anomalies): ROC-AUC and average
precision for ours and, on the same data in the same run, for IsolationForest,
PCA reconstruction error and pyod's ``ECOD``, ``COPOD``, ``HBOS`` and
``AutoEncoder``, each with its default settings (``BASELINES``).
"""
# (This docstring is `aeflow run detect --help`.) Over 400 lines on purpose: the application and the
# plain functions that benchmarks/quality_tabular.py and detect_speed.py import (fit_detector,
# anomaly_scores, baseline_scores) stay in one module, so the benchmarks measure exactly what the app runs.

from __future__ import annotations

import logging
import time
import warnings
from functools import partial
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor, nn

from models.dense import DenseAutoencoder, seeded
from models.detector import DetectorConfig, KnnAutoencoderDetector
from models.training import predict
from tasks.apps.base import FIT_ONLY, Evaluation, Fitted, register
from tasks.apps.kinds import TableContext
from tasks.apps.tabular import TableApp
from tasks.config import AppConfig, ModelConfig, RunConfig, TrainConfig
from tasks.report import pyplot, save_figure
from tasks.train import train_model

log = logging.getLogger("aeflow.detect")


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger, as training's lines use (outside a flow, ``aeflow.train``'s): the plain ``log`` has no
    handler in a run, so its lines (rows set aside, the tail part's agreement and weight, a baseline skipped)
    never reached the terminal or the UI."""
    from tasks.train import run_logger

    return run_logger()


PYOD_MIN_ROWS = 64
SCALE_ROWS = 100_000  # training rows (sampled) whose score parts fix the parts' centres and scales
THRESHOLD_ROWS = 100_000  # training rows (sampled) whose scores fix threshold_
EVAL_ROWS = 100_000  # scored rows (sampled) the metrics, the baselines and the histogram use


class Config(AppConfig):
    """Settings of the detect application."""

    name = "detect"
    contamination: float = Field(
        0.1, gt=0.0, le=0.5, description="Expected share of anomalies in the training data, in (0, 0.5]."
    )
    threshold: float | None = Field(
        None, allow_inf_nan=False,
        description="Fixed score threshold (default: the training scores' (1 - contamination) percentile).",
    )
    robust: bool = Field(
        True,
        description="Robust fit for data that may hold anomalies: trim each batch's largest losses (the contamination "
        "share) and set the worst-reconstructed contamination share of rows aside before the final fit.",
    )
    knn_k: int = Field(
        30, ge=1, description="Neighbours (in code space and in input space) whose mean distance is part of the score."
    )
    knn_weight: float = Field(1.0, ge=0.0, description="Weight of the code-space distance in the score.")
    input_weight: float = Field(
        8.0, ge=0.0,
        description="Weight of the input-space distance to the training rows in the score (0: no input-space part; "
        "the model then keeps no copy of the training rows, which otherwise take rows x columns x 4 bytes).",
    )
    input_p: float = Field(
        0.5, gt=0.0,
        description="Exponent of the Minkowski distance in the input space: 2 is Euclidean; below 1 a fractional "
        "distance, which separates near from far rows better when there are many columns.",
    )
    center_weight: float = Field(
        0.0, ge=0.0,
        description="Weight of the row's mean squared distance to the training column means (in training standard "
        "deviations) in the score: rows extreme in many columns at once (0 since the tail part does this better; "
        "benchmarks/RESULTS.md).",
    )
    tail_weight: float = Field(
        128.0, ge=0.0,
        description="Largest weight of the tail probability part (COPOD-style: rows in the far tails of many columns) "
        "in the score; the weight in use is chosen at fit time, without labels, from how well the part agrees with "
        "the input-space part on the training rows (see tail_min_agreement). 0: no tail part.",
    )
    tail_min_agreement: float = Field(
        0.8, ge=0.0, lt=1.0,
        description="Spearman correlation of the tail part with the input-space part (training rows) at and below "
        "which the tail part weighs 0; above it its weight grows linearly to tail_weight at correlation 1.",
    )
    recon_weight: float = Field(
        0.0, ge=0.0,
        description="Weight of the autoencoder's reconstruction error in the score (0 by default: on the benchmark "
        "it made every ranking worse; benchmarks/RESULTS.md).",
    )
    scaling: Literal["median", "robust"] = Field(
        "robust",
        description="How the score's parts are put on one scale: 'robust' = (part - training median) / training "
        "interquartile range; 'median' = part / training median (the detector before input_weight existed).",
    )
    max_reference: int = Field(
        10000, ge=2,
        description="Training rows (sampled) kept as each kNN reference (code and input space); scoring time grows "
        "with it (benchmarks/RESULTS.md: detect scoring speed).",
    )
    min_steps: int = Field(
        300, ge=0, description="At least this many optimiser steps per fit: small tables get more epochs than train.epochs."
    )
    positive_label: str = Field("1", description="Label value that marks an anomaly (for the metrics).")
    bins: int = Field(50, ge=5, description="Bins of the score histogram.")


class DetectRunConfig(RunConfig):
    """A run of detect: the flow's parameter."""

    app: Config = Config()
    # A short, regularised fit: an autoencoder trained to convergence also learns to reconstruct
    # the anomalies in its training data (benchmarks/RESULTS.md: contaminated regime). Latent 8 with
    # batch norm was the best default across breast cancer, wine and digits in one-seed-set sweeps
    # (16- and 32-wide codes were no better once the score has its input-space part).
    model: ModelConfig = ModelConfig(latent_dim=8, hidden=(64, 32), dropout=0.2, batch_norm=True)
    train: TrainConfig = TrainConfig(epochs=15, default_batch_size=32, weight_decay=1e-5)


# ---------------------------------------------------------------------------------------
# Plain functions (used by the app and by benchmarks/quality_tabular.py)


def trimmed_loss(model: nn.Module, batch: Tensor, generator: torch.Generator, trim: float = 0.0) -> Tensor:
    """Mean squared reconstruction error over the batch's rows, leaving out its ``trim`` share
    of largest per-row losses: anomalies in the training data then barely shape the model."""
    per_row = ((model(batch).x_hat.float() - batch.float()) ** 2).mean(dim=1)
    keep = len(per_row) - int(np.floor(trim * len(per_row)))
    if 0 < keep < len(per_row):
        per_row = torch.topk(per_row, keep, largest=False).values
    return per_row.mean()


def _train_ae(model: nn.Module, train_x: np.ndarray, val_x: np.ndarray, train_cfg: TrainConfig, trim: float, *,
              run, show_progress: bool, label: str):
    loss = partial(trimmed_loss, trim=trim)
    return train_model(model, train_x, val_x, train_cfg, run=run, loss_fn=loss, label=label, show_progress=show_progress)


def min_step_epochs(n_train: int, train_cfg: TrainConfig, min_steps: int) -> int:
    """``train.epochs``, or more on a small table: enough epochs for ``min_steps`` optimiser steps."""
    steps_per_epoch = max(1, -(-n_train // (train_cfg.batch_size or train_cfg.default_batch_size)))
    if train_cfg.epochs * steps_per_epoch < min_steps:
        return -(-min_steps // steps_per_epoch)
    return train_cfg.epochs


def fit_detector(
    train_x: np.ndarray, val_x: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
    contamination: float, robust: bool = True, knn_k: int = 30, knn_weight: float = 1.0,
    input_weight: float = 8.0, input_p: float = 0.5, center_weight: float = 0.0, recon_weight: float = 0.0,
    tail_weight: float = 128.0, tail_min_agreement: float = 0.8,
    scaling: str = "robust", max_reference: int = 10000, min_steps: int = 300,
    run=None, show_progress: bool = False,
) -> tuple[KnnAutoencoderDetector, object]:
    """Fit the detector on scaled rows (``train_x`` for the weights, ``val_x`` for early stopping).

    With ``robust`` (unsupervised use: the data may hold anomalies): a first autoencoder with
    the trimmed loss ranks the rows by reconstruction error, the ``contamination`` share with
    the largest errors is set aside, and the detector is trained on the rest; its kNN
    reference (in code and input space) holds only the rows kept. Without ``robust``: one plain
    fit on every row. The input-space reference and the centre are every training row (set-aside
    rows included: a few anomalies among many rows barely move a k = 30 distance, and leaving
    out the most extreme normal rows of clean data hurt); the parts' centres and scales come
    from every training row.

    The tail part's weight is chosen without labels (``tail_weight_in_use``): ``tail_weight`` x
    ``clip((rho - tail_min_agreement) / (1 - tail_min_agreement), 0, 1)``, where rho is the
    Spearman correlation of the tail part with the input-space part over the training rows. When
    the two agree, the anomalies the data can show are global extremes (rows in the far tails of
    many columns), which the tail part ranks best; when they disagree (anomalies in empty regions
    between normal rows, as on digits), the tail part is mostly noise and weighs 0 (the part is then
    removed). Without an input-space part the code-space part stands in for it.
    Only the final fit writes checkpoints to ``run`` (the first one is short and seeded).
    """
    ae_cfg = model_cfg.dense(train_x.shape[1])
    trim = contamination if robust else 0.0
    train_cfg = train_cfg.model_copy(update={"epochs": min_step_epochs(len(train_x), train_cfg, min_steps)})
    keep_train = np.ones(len(train_x), bool)
    keep_val = np.ones(len(val_x), bool)
    if robust and len(train_x) + len(val_x) >= 10:
        with seeded(train_cfg.seed):  # initial weights fixed by the seed: the same in every process
            first = DenseAutoencoder(ae_cfg)
        _train_ae(first, train_x, val_x, train_cfg, trim, run=None, show_progress=show_progress,
                  label="detect autoencoder (ranking pass)")
        err_train, err_val = _recon_error(first, train_x), _recon_error(first, val_x)
        cutoff = np.quantile(np.concatenate([err_train, err_val]), 1.0 - contamination)
        keep_train, keep_val = err_train <= cutoff, err_val <= cutoff
        if keep_val.sum() == 0 or keep_train.sum() < 2:  # tiny data: nothing sensible to set aside
            keep_train[:], keep_val[:] = True, True
        _log().info("detect: %d of %d rows set aside before the final fit (largest reconstruction errors)",
                    int((~keep_train).sum() + (~keep_val).sum()), len(train_x) + len(val_x))
    with seeded(train_cfg.seed + 1):
        model = KnnAutoencoderDetector(DetectorConfig(ae_cfg, 0, k=knn_k, knn_weight=knn_weight,
                                                      input_weight=input_weight, scaling=scaling,
                                                      recon_weight=recon_weight, input_p=input_p,
                                                      center_weight=center_weight, tail_weight=tail_weight))
    result = _train_ae(model, train_x[keep_train], val_x[keep_val], train_cfg.model_copy(update={"seed": train_cfg.seed + 1}),
                       trim, run=run, show_progress=show_progress, label="detect autoencoder")
    model.eval()
    rows = np.concatenate([train_x, val_x])
    kept = np.concatenate([train_x[keep_train], val_x[keep_val]])
    if len(kept) > max_reference:
        kept = kept[np.sort(np.random.default_rng(train_cfg.seed).choice(len(kept), max_reference, replace=False))]
    every = rows
    if len(every) > max_reference:
        every = every[np.sort(np.random.default_rng(train_cfg.seed + 1).choice(len(every), max_reference, replace=False))]
    device = next(model.parameters()).device
    model.set_reference(torch.from_numpy(predict(model.encode, kept, device=device)), torch.from_numpy(every))
    if len(rows) > SCALE_ROWS:  # medians and quartiles of the parts: a sample is as good and the kNN parts cost
        rows = rows[np.sort(np.random.default_rng(train_cfg.seed + 2).choice(len(rows), SCALE_ROWS, replace=False))]
    _log().info("detect: scoring %s rows to fix the score's scales", f"{len(rows):,}")
    parts = _score_parts(model, rows, device)
    if tail_weight > 0:
        names = model.config.part_names
        rho = part_agreement(parts[:, names.index("tail")], parts[:, names.index("input" if "input" in names else "code")])
        weight = tail_weight * float(np.clip((rho - tail_min_agreement) / max(1.0 - tail_min_agreement, 1e-12), 0.0, 1.0))
        _log().info("detect: tail part agrees with the %s part at Spearman %.3f: weight %.3g of %.3g",
                    "input" if "input" in names else "code", rho, weight, tail_weight)
        model.set_tail_weight(weight)
        if weight == 0:
            parts = parts[:, [i for i, n in enumerate(names) if n != "tail"]]
    model.set_scales(torch.from_numpy(parts))
    return model, result


def score_description(model: KnnAutoencoderDetector) -> str:
    """The score's parts and weights in words (for the run's notes): what ranks, and what the autoencoder adds."""
    words = {"recon": "reconstruction error (autoencoder)", "code": "code-space kNN distance (autoencoder)",
             "input": "input-space kNN distance", "center": "centre distance", "tail": "COPOD-style tail part"}
    c = model.config
    parts = ", ".join(f"{w:g} x {words[n]}" for n, w in zip(c.part_names, c.part_weights, strict=True) if w > 0)
    tail = "" if c.tail_weight > 0 else ("; no tail part (app.tail_weight = 0, or at fit time it did not agree with the "
                                         "input-space part on the training rows)")
    return f"score = {parts}, each on the training rows' scale{tail}"


def part_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score parts over the same rows (0 when undefined:
    fewer than 3 rows, or a constant part)."""
    if len(a) < 3:
        return 0.0
    ra, rb = (pd.Series(v).rank().to_numpy() for v in (a, b))
    if ra.std() < 1e-12 or rb.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def detector_options(cfg: Config) -> dict:
    """``fit_detector``'s keyword options from the app's settings (the app and the benchmark)."""
    return dict(contamination=cfg.contamination, robust=cfg.robust, knn_k=cfg.knn_k, knn_weight=cfg.knn_weight,
                input_weight=cfg.input_weight, input_p=cfg.input_p, center_weight=cfg.center_weight,
                recon_weight=cfg.recon_weight, tail_weight=cfg.tail_weight, tail_min_agreement=cfg.tail_min_agreement,
                scaling=cfg.scaling, max_reference=cfg.max_reference, min_steps=cfg.min_steps)


def _recon_error(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    model.eval()
    x_hat = predict(lambda b: model(b).x_hat, x, device=torch.device(device))
    return np.mean((x_hat.astype("float64") - x) ** 2, axis=1)


def _score_parts(model: KnnAutoencoderDetector, x: np.ndarray, device) -> np.ndarray:
    """The score's parts per row (rows x parts, float32)."""
    return predict(lambda b: torch.stack(model.score_parts(b), dim=1), x, device=torch.device(device))


def anomaly_scores(model: nn.Module, x: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Anomaly score per row (higher = more anomalous). A :class:`KnnAutoencoderDetector` adds
    its code-space and input-space distances to the reconstruction error (each put on the
    training rows' scale); a plain autoencoder (detect models saved before the detector
    existed) scores by reconstruction MSE alone."""
    if isinstance(model, KnnAutoencoderDetector):
        model.eval()
        return predict(model.score, x, device=torch.device(device)).astype("float64")
    return _recon_error(model, x, device)


def fit_threshold(train_scores: np.ndarray, contamination: float) -> float:
    """pyod's rule: the (1 - contamination) percentile of the training scores."""
    return float(np.percentile(train_scores, 100.0 * (1.0 - contamination)))


#: The in-run baselines, in the order of the evaluation (names as in ``baseline_scores``' result).
BASELINES = ("isolation_forest", "pca", "ecod", "copod", "hbos", "pyod_autoencoder")


def baseline_scores(
    fit_x: np.ndarray, x: np.ndarray, *, k: int, contamination: float, seed: int,
    seconds: dict[str, float] | None = None, skipped: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Scores (higher = more anomalous) of the detectors a user would otherwise pick, fitted on
    ``fit_x``, scoring ``x``: IsolationForest, PCA reconstruction error, and pyod's ECOD, COPOD,
    HBOS and AutoEncoder, each with its default settings. A baseline that fails is logged and
    left out (it must never fail the run it is compared in). ``seconds``, when given, receives
    each baseline's fit + scoring time; ``skipped`` why each baseline left out was."""
    skipped = {} if skipped is None else skipped
    from pyod.models.copod import COPOD
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from pyod.models.ecod import ECOD
    from pyod.models.hbos import HBOS

    def pca_error() -> np.ndarray:
        pca = PCA(n_components=min(k, fit_x.shape[1], len(fit_x)), random_state=seed).fit(fit_x)
        return np.mean((pca.inverse_transform(pca.transform(x)) - x) ** 2, axis=1)

    detectors = {
        "isolation_forest": lambda: -IsolationForest(random_state=seed, contamination=contamination).fit(fit_x).score_samples(x),
        "pca": pca_error,
        "ecod": lambda: ECOD(contamination=contamination).fit(fit_x).decision_function(x),
        "copod": lambda: COPOD(contamination=contamination).fit(fit_x).decision_function(x),
        "hbos": lambda: HBOS(contamination=contamination).fit(fit_x).decision_function(x),
    }
    out: dict[str, np.ndarray] = {}
    for name, score in detectors.items():
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pyod's and numpy's warnings on constant columns
                out[name] = np.asarray(score(), dtype="float64")
        except Exception as e:  # a baseline must never fail the run it is compared in
            _log().warning("%s baseline skipped: %s: %s", name, type(e).__name__, e)
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        took = time.perf_counter() - t0
        _log().info("detect: baseline %s fitted on %s rows, scored %s rows in %.1f s", name, f"{len(fit_x):,}",
                    f"{len(x):,}", took)
        if seconds is not None:
            seconds[name] = took
    if len(fit_x) < PYOD_MIN_ROWS:
        # pyod drops the ragged last batch of 32: with fewer rows it trains on nothing and fails.
        _log().warning("pyod AutoEncoder baseline skipped: %d rows, it needs at least %d", len(fit_x), PYOD_MIN_ROWS)
        skipped["pyod_autoencoder"] = f"{len(fit_x)} rows to fit on, it needs at least {PYOD_MIN_ROWS}"
        return out
    torch_state = torch.random.get_rng_state()
    t0 = time.perf_counter()
    try:
        from pyod.models.auto_encoder import AutoEncoder

        pyod_ae = AutoEncoder(contamination=contamination, random_state=seed, verbose=0)
        pyod_ae.fit(fit_x)
        out["pyod_autoencoder"] = np.asarray(pyod_ae.decision_function(x), dtype="float64")
        took = time.perf_counter() - t0
        _log().info("detect: baseline pyod_autoencoder fitted on %s rows, scored %s rows in %.1f s",
                    f"{len(fit_x):,}", f"{len(x):,}", took)
        if seconds is not None:
            seconds["pyod_autoencoder"] = took
    except Exception as e:  # a baseline must never fail the run it is compared in
        _log().warning("pyod AutoEncoder baseline skipped: %s: %s", type(e).__name__, e)
        skipped["pyod_autoencoder"] = f"{type(e).__name__}: {e}"
    finally:
        torch.random.set_rng_state(torch_state)
    return out


#: The pyod baselines, as the run's notes name them (each with its default settings, as IsolationForest).
PYOD_NAMES = {"ecod": "ECOD", "copod": "COPOD", "hbos": "HBOS", "pyod_autoencoder": "AutoEncoder"}


def baselines_note(ran: list[str], skipped: dict[str, str]) -> str:
    """The notes' words on the baselines: those that ran with their default settings (PCA takes k = the code width),
    and those left out and why (a 14-row table's notes listed pyod's AutoEncoder, which had been skipped)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]

    parts = ["IsolationForest"] if "isolation_forest" in ran else []
    pyod = [name for b, name in PYOD_NAMES.items() if b in ran]
    if pyod:
        parts.append(f"pyod's {listed(pyod)}")
    out = f"; {' and '.join(parts)} with their default settings" if parts else ""
    if skipped:
        who = {"isolation_forest": "IsolationForest", "pca": "PCA", **{b: f"pyod's {n}" for b, n in PYOD_NAMES.items()}}
        out += "; not run: " + "; ".join(f"{who.get(b, b)} ({why})" for b, why in skipped.items())
    return out


def ranking_metrics(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {"roc_auc": float(roc_auc_score(y, scores)), "average_precision": float(average_precision_score(y, scores))}


# ---------------------------------------------------------------------------------------
# The application


@register
class Detect(TableApp):
    name = "detect"
    Config = Config
    RunConfig = DetectRunConfig
    output = "scores"
    headlines = (("roc_auc", True), ("average_precision", True))
    # A reused detector keeps what its fit fixed: the score's parts and weights, its references and threshold_ (from
    # its contamination); --threshold, --positive-label and app.bins still apply.
    fit_only = FIT_ONLY + tuple(f"app.{k}" for k in (
        "contamination", "robust", "knn_k", "knn_weight", "input_weight", "input_p", "center_weight", "tail_weight",
        "tail_min_agreement", "recon_weight", "scaling", "max_reference", "min_steps"))
    # --epochs is no maximum here: a small table trains for more (min_step_epochs)
    option_help: ClassVar[dict[str, str]] = {
        "epochs": "Maximum epochs (early stopping usually ends sooner); a small table gets more, enough for "
                  "app.min_steps optimiser steps.",
    }
    cli_options = (
        ("--contamination", "app.contamination", float, "Expected share of anomalies in the training data, in (0, 0.5]."),
        ("--threshold", "app.threshold", float, "Fixed score threshold instead of the contamination percentile."),
        ("--positive-label", "app.positive_label", str, "Label value that marks an anomaly (metrics only; default 1)."),
        ("--latent-dim", "model.latent_dim", int, "Width of the autoencoder's code."),
    )

    def fit(self, ctx: TableContext) -> Fitted:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        train_x, val_x = self.training_rows(ctx)
        epochs = min_step_epochs(len(train_x), ctx.config.train, cfg.min_steps)
        if epochs != ctx.config.train.epochs:  # the README says so; the run's notes did not
            ctx.notes.append(f"training: up to {epochs} epochs, not train.epochs={ctx.config.train.epochs}: "
                             f"app.min_steps={cfg.min_steps} optimiser steps on {len(train_x)} training rows")
        model, result = fit_detector(train_x, val_x, ctx.config.model, ctx.config.train, **detector_options(cfg),
                                     run=ctx.run, show_progress=True)
        rows = np.concatenate([train_x, val_x])
        if len(rows) > THRESHOLD_ROWS:  # scoring every fit row (1M at the default memory_mb) took minutes for one percentile
            rows = rows[np.sort(np.random.default_rng(ctx.config.train.seed + 3).choice(len(rows), THRESHOLD_ROWS,
                                                                                       replace=False))]
            ctx.notes.append(f"threshold_ and the training score mean from a seeded sample of {len(rows):,} of the "
                             f"{len(train_x) + len(val_x):,} training rows' scores")
        _log().info("detect: scoring %s training rows for the threshold", f"{len(rows):,}")
        scores = anomaly_scores(model, rows, ctx.device)
        threshold = cfg.threshold if cfg.threshold is not None else fit_threshold(scores, cfg.contamination)
        state = {
            "threshold_": float(threshold),
            "threshold_source_": "given" if cfg.threshold is not None else f"training percentile {100 * (1 - cfg.contamination):g}",
            "contamination": cfg.contamination,
            "train_score_mean_": float(scores.mean()),
        }
        return Fitted(model=model, schema=ctx.schema, stats=ctx.train.stats, train=result, state=state)

    def threshold(self, ctx: TableContext, fitted: Fitted) -> float:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        # A --threshold given when reusing a model overrides the fitted one; otherwise threshold_ stands.
        return float(cfg.threshold) if cfg.threshold is not None else float(fitted.state["threshold_"])

    def output_columns(self, latent_dim: int) -> list[str]:
        return ["score", "is_anomaly"]

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        s = anomaly_scores(fitted.model, x, ctx.device)
        return pd.DataFrame({"score": s.astype("float64"), "is_anomaly": s > self.threshold(ctx, fitted)})

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        ev = Evaluation()
        x, side, total = ctx.sample("target", "all", EVAL_ROWS, ctx.config.train.seed)
        if total > len(x):
            ev.notes.append(f"metrics and baselines on a seeded sample of {len(x):,} of the {total:,} scored rows")
        scores = anomaly_scores(fitted.model, x, ctx.device)
        ctx.cache["detect_eval_scores"] = (scores, side)  # the histogram plots these: not scored twice
        thr = self.threshold(ctx, fitted)
        flagged = scores > thr
        ev.metrics["threshold"] = thr
        ev.metrics["anomaly_rate"] = float(flagged.mean())
        if isinstance(fitted.model, KnnAutoencoderDetector):
            ev.notes.append(score_description(fitted.model))
        label = ctx.schema.label
        missing = self.no_label_note(ctx, "ROC-AUC and average precision not evaluated")
        if missing or label not in side.columns:
            ev.notes.append(missing or "no label column: ROC-AUC and average precision not evaluated")
            return ev
        known = side[label].notna().to_numpy()
        if not known.all():
            ev.notes.append(f"{int((~known).sum())} row(s) without a label (null {label!r}) left out of the ranking "
                            "metrics")
        y = (side[label].astype(str).to_numpy() == cfg.positive_label)[known]
        values = sorted(side[label][known].astype(str).unique())
        if not y.any() and len(values) > 1:
            shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            ev.notes.append(f"--positive-label {cfg.positive_label!r} is none of label {label!r}'s values ({shown}): "
                            "ranking metrics skipped; pass the value that marks the anomalies")
            return ev
        if y.all() or not y.any():
            ev.notes.append(f"labels hold a single class (positive_label={cfg.positive_label!r}): ranking metrics skipped")
            return ev
        ev.metrics.update(ranking_metrics(y, scores[known]))
        if y.mean() > 0.5:  # anomalies are the rare class: the label most likely names the normal rows
            ev.notes.append(f"label {label!r} == {cfg.positive_label!r} marks {y.mean():.0%} of the rows as anomalies "
                            f"(ROC-AUC {ev.metrics['roc_auc']:.3f}): is --positive-label the normal class? The metrics "
                            "assume it marks the anomalies")
        tp = int((flagged[known] & y).sum())
        ev.metrics["precision_at_threshold"] = tp / max(int(flagged[known].sum()), 1)
        ev.metrics["recall_at_threshold"] = tp / int(y.sum())
        if ctx.train is not None:
            seed = ctx.config.train.seed
            fit_x = np.concatenate([ctx.sample("train", split, EVAL_ROWS // 2, seed)[0] for split in ("train", "val")])
            where = "fitted on the input, scoring the applied data" if ctx.target is not ctx.train else "fitted and scored on the input"
        else:
            fit_x, where = x, "fitted and scored on the applied data (the model was reused)"
        skipped: dict[str, str] = {}
        for name, s in baseline_scores(fit_x, x, k=fitted.model.config.latent_dim, contamination=cfg.contamination,
                                       seed=ctx.config.train.seed, skipped=skipped).items():
            ev.baselines[name] = ranking_metrics(y, s[known])
        ev.notes.append(f"anomalies: label {label!r} == {cfg.positive_label!r}; baselines {where}"
                        + baselines_note(list(ev.baselines), skipped))
        return ev

    def report(self, ctx: TableContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        plt = pyplot()

        cfg: Config = ctx.config.app  # type: ignore[assignment]
        if "detect_eval_scores" in ctx.cache:  # evaluate's sample and scores (the same seeded sample)
            scores, side = ctx.cache["detect_eval_scores"]
        else:
            x, side, _ = ctx.sample("target", "all", EVAL_ROWS, ctx.config.train.seed)
            scores = anomaly_scores(fitted.model, x, ctx.device)
        thr = self.threshold(ctx, fitted)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        label = ctx.schema.label
        if label and label in side.columns and side[label].notna().any():
            y = side[label].astype(str).to_numpy() == cfg.positive_label
            ax.hist([scores[~y], scores[y]], bins=cfg.bins, stacked=True, label=["normal (label)", "anomaly (label)"])
            ax.legend()
        else:
            ax.hist(scores, bins=cfg.bins)
        ax.axvline(thr, color="red", ls="--", label=f"threshold {thr:.4g}")
        ax.set_xlabel("anomaly score (weighted parts, each on the training rows' scale)")
        ax.set_ylabel("rows")
        ax.set_title(f"Scores: {int((scores > thr).sum())} of {len(scores)} above the threshold")
        ax.legend()
        out = super().report(ctx, fitted, evaluation)
        out["histogram"] = save_figure(ctx.run, "report/score_histogram.png", fig)
        return out
