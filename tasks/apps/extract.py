"""extract: feature extraction with the encoder of a dense autoencoder.

Output ``features.parquet``: the id column (when given), then ``f_0..f_{k-1}``
(the encoder's code), one row per input row in input order. The autoencoder is a
denoising one (``input_mask``, 0.5: half of each training row's cells are set to
the column mean and rebuilt from the rest), which on digits made the features beat
PCA's on unshuffled folds too, where the plain autoencoder's did not
(benchmarks/RESULTS.md). With a label
column, ``evaluate`` reports stratified k-fold (default 5) accuracy of a
LogisticRegression on the raw (scaled) features, on PCA-k and on AE-k, where
PCA and the autoencoder are fitted on the training folds only; and the same
with few labels (10 and 50 per class: the classifier sees only those, PCA and
the encoder all training-fold rows without their labels).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from models.dense import DenseAutoencoder, seeded
from models.training import predict
from tasks.apps.base import Evaluation, Fitted, register
from tasks.apps.kinds import TableContext
from tasks.apps.tabular import TableApp
from tasks.config import AppConfig, ModelConfig, RunConfig, TrainConfig
from tasks.train import train_model


class Config(AppConfig):
    """Settings of the extract application."""

    name = "extract"
    cv_folds: int = Field(5, ge=2, le=20, description="Stratified folds of the downstream-accuracy evaluation.")
    few_labels: tuple[int, ...] = Field((10, 50), description="Labels per class of the few-label evaluation.")
    cv_max_rows: int = Field(5000, ge=50, description="Rows (sampled) used by the evaluation, which trains one encoder per fold.")
    logreg_max_iter: int = Field(2000, ge=10, description="Iterations of the downstream LogisticRegression.")
    input_mask: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="Denoising: share of input cells set to the column mean in each training batch (the encoder "
        "learns to rebuild them from the rest); 0: a plain autoencoder.",
    )


class ExtractRunConfig(RunConfig):
    """A run of extract: the flow's parameter."""

    app: Config = Config()
    # (512, 256) measured better than (256, 128) for downstream accuracy on digits at every split seed
    # and label budget (benchmarks/RESULTS.md, extract).
    model: ModelConfig = ModelConfig(latent_dim=16, hidden=(512, 256))


# ---------------------------------------------------------------------------------------
# Plain functions (used by the app and by benchmarks/quality_tabular.py)


def masking_loss(model: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator, hide: float = 0.0) -> torch.Tensor:
    """Denoising objective (Vincent et al. 2008): set a random ``hide`` share of the (scaled) input
    cells to 0, the column mean, and reconstruct every cell of the clean row. 0: the plain
    reconstruction loss."""
    if hide <= 0:
        return torch.nn.functional.mse_loss(model(batch).x_hat.float(), batch.float())
    keep = (torch.rand(batch.shape, generator=generator) >= hide).to(batch.device)
    return torch.nn.functional.mse_loss(model(batch * keep).x_hat.float(), batch.float())


def train_encoder(
    x: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig, val_fraction: float = 0.1, seed: int = 0,
    input_mask: float = 0.0,
) -> DenseAutoencoder:
    """Train a dense autoencoder on ``x`` (a random ``val_fraction`` of rows drives early stopping),
    with the denoising objective when ``input_mask`` > 0 (:func:`masking_loss`)."""
    rng = np.random.default_rng(seed)
    val = rng.random(len(x)) < val_fraction
    if val.all() or not val.any():
        val = np.zeros(len(x), bool)
    with seeded(train_cfg.seed):
        model = DenseAutoencoder(model_cfg.dense(x.shape[1]))
    train_model(model, x[~val], x[val], train_cfg, run=None, loss_fn=partial(masking_loss, hide=input_mask),
                label="extract encoder (evaluation fold)", show_progress=False)
    return model


def encode(model: torch.nn.Module, x: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    model.eval()
    return predict(model.encode, x, device=torch.device(device))


def _few(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(idx))


def _accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, max_iter: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=max_iter).fit(scaler.transform(f_train), y_train)
    return float(np.mean(clf.predict(scaler.transform(f_test)) == y_test))


def downstream_accuracy(
    x: np.ndarray,
    y: np.ndarray,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    folds: int = 5,
    few_labels: tuple[int, ...] = (10, 50),
    seed: int = 0,
    max_iter: int = 2000,
    encoder_fn: Any = None,
    shuffle: bool = True,
    input_mask: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Stratified k-fold accuracy of LogisticRegression on raw, PCA-k and AE-k features.

    PCA and the autoencoder are fitted on the training folds only (all their rows,
    without labels); the few-label variants fit the classifier on ``n`` labelled
    rows per class of the training fold. ``shuffle=False``: the folds are contiguous blocks of
    rows (per class), as in scikit-learn's unshuffled ``StratifiedKFold`` (for data in collection
    order, e.g. digits by writer, the test fold then holds rows unlike the training folds').

    Returns:
        ``{"raw"|"pca"|"ae": {"accuracy": ..., "accuracy_10_per_class": ..., ...}}`` (fold means).
    """
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold

    k = model_cfg.latent_dim
    encoder_fn = encoder_fn or (lambda xt, s: train_encoder(xt, model_cfg, train_cfg, seed=s, input_mask=input_mask))
    skf = StratifiedKFold(n_splits=folds, shuffle=shuffle, random_state=seed if shuffle else None)
    acc: dict[str, dict[str, list[float]]] = {m: {} for m in ("raw", "pca", "ae")}
    for fold, (tr, te) in enumerate(skf.split(x, y)):
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {"raw": (x[tr], x[te])}
        if k <= min(len(tr), x.shape[1]):
            pca = PCA(n_components=k, random_state=seed).fit(x[tr])
            feats["pca"] = (pca.transform(x[tr]), pca.transform(x[te]))
        model = encoder_fn(x[tr], seed + fold)
        feats["ae"] = (encode(model, x[tr]), encode(model, x[te]))
        rng = np.random.default_rng([seed, fold])
        subsets = {"accuracy": np.arange(len(tr))}
        for n in few_labels:
            subsets[f"accuracy_{n}_per_class"] = _few(y[tr], n, rng)
        for method, (ftr, fte) in feats.items():
            for metric, sub in subsets.items():
                acc[method].setdefault(metric, []).append(_accuracy(ftr[sub], y[tr][sub], fte, y[te], max_iter))
    return {m: {name: float(np.mean(v)) for name, v in d.items()} for m, d in acc.items() if d}


# ---------------------------------------------------------------------------------------
# The application


@register
class Extract(TableApp):
    name = "extract"
    Config = Config
    RunConfig = ExtractRunConfig
    output = "features"
    headlines = (("accuracy", True), ("accuracy_10_per_class", True))
    # The evaluation's cross-validated encoders train with the model and train settings, so with --model those
    # still apply, except the code's width (the reused model's), and what only a run's own fit reads.
    fit_only = ("preprocess", "model.latent_dim", "train.checkpoint_seconds", "train.stream", "train.memory_mb")
    cli_options = (
        ("--latent-dim", "model.latent_dim", int, "Number of extracted features k (f_0..f_{k-1})."),
        ("--cv-folds", "app.cv_folds", int, "Stratified folds of the downstream-accuracy evaluation."),
    )

    def loss_fn(self, ctx: TableContext):
        return partial(masking_loss, hide=ctx.config.app.input_mask)  # the app's fit: the same objective as evaluate's

    def output_columns(self, latent_dim: int) -> list[str]:
        return self.code_columns(latent_dim, "f_")

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        return self.code_frame(self.encode(fitted, x, ctx.device), "f_")

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        ev = Evaluation()
        label = ctx.schema.label
        missing = self.no_label_note(ctx, "downstream accuracy not evaluated")
        if missing:
            ev.notes.append(missing)
            return ev
        # The evaluation trains one encoder per fold: on a seeded sample of at most cv_max_rows rows.
        x, side, total = ctx.sample("target", "all", cfg.cv_max_rows, ctx.config.train.seed)
        if total > len(x):
            ev.notes.append(f"evaluation on a seeded sample of {len(x):,} of {total:,} rows")
        y = side[label].to_numpy()
        keep = pd.notna(side[label]).to_numpy()
        if not keep.all():
            ev.notes.append(f"{int((~keep).sum())} row(s) without a label (null {label!r}) left out of the evaluation")
        x, y = x[keep], y[keep].astype(str)
        classes, counts = np.unique(y, return_counts=True)
        rare = classes[counts < 2]  # a class of one row cannot be in a training and a test fold
        if len(rare) and (counts >= 2).sum() >= 2:
            shown = ", ".join(repr(str(c)) for c in rare[:5]) + (", ..." if len(rare) > 5 else "")
            ev.notes.append(f"{int(counts[counts < 2].sum())} row(s) of class(es) with a single row left out of the "
                            f"evaluation ({shown})")
            keep_rows = ~np.isin(y, rare)
            x, y, counts = x[keep_rows], y[keep_rows], counts[counts >= 2]
        folds = min(cfg.cv_folds, int(counts.min()) if len(counts) else 0)
        if len(counts) < 2 or folds < 2:
            ev.notes.append("fewer than 2 classes with 2 rows each: downstream accuracy not evaluated")
            return ev
        if folds < cfg.cv_folds:
            ev.notes.append(f"{folds} folds (the smallest class has {counts.min()} rows)")
        train_cfg = ctx.config.train.model_copy(update={"device": str(ctx.device)})
        res = downstream_accuracy(
            x, y, ctx.config.model.model_copy(update={"latent_dim": fitted.model.config.latent_dim}), train_cfg,
            folds=folds, few_labels=tuple(cfg.few_labels), seed=ctx.config.train.seed, max_iter=cfg.logreg_max_iter,
            input_mask=cfg.input_mask,
        )
        ev.metrics.update(res["ae"])
        ev.metrics["n_eval_rows"] = len(x)
        ev.baselines["raw"] = res["raw"]
        k = fitted.model.config.latent_dim
        if "pca" in res:
            ev.baselines["pca"] = res["pca"]
        else:
            ev.notes.append(f"PCA baseline skipped: {k} components need at least {k} features "
                            f"(the data has {x.shape[1]} after encoding); lower --latent-dim to compare with PCA-k")
        # The floor a classifier must beat: on unbalanced labels, accuracy below it says the features did not help
        # (a 2% positive label scored 0.9786 against always guessing the majority's 0.98, and nothing said so).
        top = int(np.argmax(counts))
        share = float(counts[top] / counts.sum())
        floor = (f"always predicting the most frequent class ({str(np.unique(y)[top])!r}, {share:.1%} of the rows) "
                 f"scores accuracy {share:.4f}")
        if ev.metrics.get("accuracy") is not None and ev.metrics["accuracy"] <= share:
            floor += (f"; the AE features' {ev.metrics['accuracy']:.4f} is not above it (with labels this unbalanced, "
                      "accuracy says little about the features)")
        ev.notes.append(floor)
        fitted_on = "PCA and the autoencoder" if "pca" in res else "the autoencoder"
        ev.notes.append(
            f"stratified {folds}-fold LogisticRegression accuracy; {fitted_on} fitted on training folds only"
        )
        return ev
