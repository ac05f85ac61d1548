"""impute: missing values filled by a masked (denoising) autoencoder.

The only application that accepts nulls in its feature columns. The model sees
each row's observed values and its missingness mask; it is trained by hiding a
random share (``mask_fraction``) of the *observed* cells of every batch and
reconstructing them. The model (``models/dense.py: MaskedImputer``) is an ensemble
of ``app.members`` (5) such autoencoders, each with a linear path beside the nonlinear
one and ``app.passes`` (2) refinement passes (a pass's imputations are the next pass's input);
the imputation is the members' mean, passed through a per-column linear head fitted
in closed form after training on the training rows (stacking, ``head_alpha``: for each numeric column, a
ridge regression of its observed values, hidden one column at a time, on the ensemble's
prediction of it and the row's other cells). Output ``imputed.parquet``: the input's columns (excluded
ones aside), in their order and with the dtypes they were read with at fit time
(float64 for an integer or boolean column whose values now include fractions, said in
the notes), one row per input row in input order, no nulls in the features, and every
observed value unchanged (filled cells only). Categorical cells are filled with
the category whose one-hot output is largest; integer columns are rounded.

``evaluate`` hides a further share of observed cells (``eval_fraction``, default
20%, MCAR, seeded by ``eval_seed``) of the held-out rows and reports RMSE on them
(numeric columns, on min-max scaled values) and accuracy (categorical columns),
for ours and for mean/mode, ``KNNImputer(k=5)``, ``IterativeImputer``
(BayesianRidge) and (``extra_trees``, on by default) ``IterativeImputer`` over
``ExtraTreesRegressor`` (MissForest-style, on at most ``extra_trees_max_rows``
sampled rows), fitted on the same training rows.

Runs are reproducible: the same command on the same file gives the same model,
metrics and ``imputed.parquet`` (the initial weights, the training batches and
hidden cells, the evaluation's hidden cells and the baselines are all seeded by
``train.seed`` / ``eval_seed``).
"""

from __future__ import annotations

import decimal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import Field

from models.dense import ImputerConfig, MaskedImputer, imputer_loss, seeded
from models.training import predict
from tasks.apps.base import FIT_ONLY, Evaluation, Fitted, register
from tasks.apps.kinds import TableContext
from tasks.apps.tabular import TableApp
from tasks.config import AppConfig, ModelConfig, RunConfig, TrainConfig
from tasks.errors import InputError
from tasks.load import read_block, read_decimal_columns
from tasks.scaling import ScalingStats
from tasks.schemas import ColumnSpec, TableSchema
from tasks.train import train_model


class Config(AppConfig):
    """Settings of the impute application."""

    name = "impute"
    mask_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Share of observed cells hidden in each training batch.")
    members: int = Field(5, ge=1, description="Autoencoders trained side by side; the imputation is their mean (1: fastest).")
    passes: int = Field(2, ge=1, description="Refinement passes: each pass's imputations are the next pass's input.")
    head_alpha: float = Field(
        20.0, ge=0.0,
        description="Ridge penalty of the per-column linear head fitted after training on the ensemble's "
        "imputations (stacking); 0: no head.",
    )
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of observed cells hidden (MCAR) for the evaluation.")
    eval_seed: int = Field(0, description="Seed of the evaluation's hidden cells.")
    eval_rows: int = Field(
        20000, ge=10,
        description="Rows (a seeded sample when there are more) whose observed cells the evaluation hides; aeflow "
        "and every baseline impute them (KNN and the iterative imputers take minutes per 100,000 rows).",
    )
    knn_neighbors: int = Field(5, ge=1, description="k of the KNNImputer baseline.")
    baseline_max_rows: int = Field(20000, ge=10, description="Training rows (sampled) the baselines are fitted on.")
    extra_trees: bool = Field(
        True, description="Also compare with IterativeImputer over ExtraTrees (MissForest-style; the slowest baseline)."
    )
    extra_trees_max_rows: int = Field(
        2000, ge=10,
        description="Training rows (sampled) the ExtraTrees baseline is fitted on (it took ~90 s on 1,797 x 64 on one "
        "core; its time grows with rows x columns^2).",
    )


class ImputeRunConfig(RunConfig):
    """A run of impute: the flow's parameter."""

    app: Config = Config()
    model: ModelConfig = ModelConfig(latent_dim=32, hidden=(256, 128))
    train: TrainConfig = TrainConfig(patience=30, weight_decay=1e-5)


# ---------------------------------------------------------------------------------------
# Plain functions (used by the app and by benchmarks/quality_tabular.py)


@dataclass(frozen=True)
class Group:
    """One feature and the columns of the encoded matrix that hold it."""

    spec: ColumnSpec
    cols: tuple[int, ...]


def feature_groups(schema: TableSchema) -> list[Group]:
    out, i = [], 0
    for c in schema.features:
        width = 1 if c.kind == "numeric" else len(c.categories)
        out.append(Group(c, tuple(range(i, i + width))))
        i += width
    return out


def numeric_groups(d: int) -> list[Group]:
    """Groups of a purely numeric matrix (benchmarks)."""
    return [Group(ColumnSpec(f"x{i}"), (i,)) for i in range(d)]


HEAD_MAX_FEATURES = 1024


def fit_imputer(
    train_x: np.ndarray, val_x: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
    mask_fraction: float, members: int = 5, passes: int = 2, head_alpha: float = 20.0,
    head_columns: Sequence[int] | None = None, run=None, show_progress: bool = False,
) -> tuple[MaskedImputer, object]:
    """Train the imputer on scaled rows with ``NaN`` for missing cells, then fit its linear
    head (``head_alpha`` > 0) on the training rows, for ``head_columns`` (default: all; the app
    passes the numeric ones). No head on tables wider than ``HEAD_MAX_FEATURES`` encoded columns
    (its fit solves one such system per column).

    Not on the validation rows: the run's evaluation hides cells of those rows, and a head that had
    seen their true values reported an RMSE 3-9% lower there than a head that had not (means of two
    seeds: breast cancer 0.041 vs 0.044, wine 0.133 vs 0.140, diabetes 0.165 vs 0.170, digits 0.138
    vs 0.143), where the baselines beside it are fitted on the training rows only. On rows neither
    saw, the two heads impute alike (0.047 / 0.047, 0.142 / 0.145, 0.186 / 0.186, 0.145 / 0.146).
    With no training rows at all it is fitted on the validation rows."""
    with seeded(train_cfg.seed):  # the initial weights: the same in every process (reproducible runs)
        model = MaskedImputer(ImputerConfig(
            model_cfg.dense(train_x.shape[1]),
            members=members, passes=passes, head=0 < head_alpha and train_x.shape[1] <= HEAD_MAX_FEATURES,
        ))
    loss = partial(imputer_loss, hide=mask_fraction)
    result = train_model(model, train_x, val_x, train_cfg, run=run, loss_fn=loss, label="impute autoencoder",
                         show_progress=show_progress)
    if model.config.head:
        model.eval()
        from tasks.train import run_logger

        rows = train_x if len(train_x) else val_x
        run_logger().info("impute: fitting the per-column linear head on %s training rows (the ensemble imputes "
                          "each column hidden in turn)", f"{len(rows):,}")
        model.fit_head(rows, head_alpha, head_columns, seed=train_cfg.seed)
    return model, result


def reconstruct(model: torch.nn.Module, x: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    model.eval()
    return predict(lambda b: model(b).x_hat, x, device=torch.device(device))


def fill(x: np.ndarray, x_hat: np.ndarray, groups: list[Group]) -> np.ndarray:
    """Missing cells from ``x_hat``; categorical groups as a one-hot of their largest output."""
    out = np.where(np.isnan(x), x_hat, x).astype("float64")
    for g in groups:
        if g.spec.kind == "categorical" and len(g.cols) > 0:
            cols = list(g.cols)
            missing = np.isnan(x[:, cols[0]])
            if missing.any():
                onehot = np.zeros((int(missing.sum()), len(cols)))
                onehot[np.arange(len(onehot)), np.argmax(x_hat[missing][:, cols], axis=1)] = 1.0
                out[np.ix_(missing, cols)] = onehot
    return out


def hide_cells(x: np.ndarray, groups: list[Group], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hide ``fraction`` of the observed feature cells (MCAR, seeded). Returns (x with NaN, hidden[n, features])."""
    rng = np.random.default_rng(seed)
    observed = np.column_stack([~np.isnan(x[:, g.cols[0]]) for g in groups]) if groups else np.zeros((len(x), 0), bool)
    hidden = (rng.random(observed.shape) < fraction) & observed
    out = x.copy()
    for j, g in enumerate(groups):
        out[np.ix_(hidden[:, j], list(g.cols))] = np.nan
    return out, hidden


BASELINE_WORKING_MEMORY_MB = 64  # sklearn's chunk size for the baselines' pairwise distances


def baseline_imputations(
    fit_x: np.ndarray | None, x: np.ndarray, groups: list[Group], *, k: int = 5, seed: int = 0,
    extra_trees: bool = False, extra_trees_max_rows: int | None = None, seconds: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Mean/mode, KNNImputer and IterativeImputer (BayesianRidge) fitted on ``fit_x`` (None: on ``x``
    itself), and with ``extra_trees`` IterativeImputer over ExtraTreesRegressor (10 trees, 10 rounds:
    MissForest-style), fitted on at most ``extra_trees_max_rows`` of those rows (a seeded sample).
    ``seconds``, when given, receives each baseline's fit + imputation time."""
    import sklearn
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer

    imputers = {
        "mean_mode": SimpleImputer(strategy="mean", keep_empty_features=True),
        "knn": KNNImputer(n_neighbors=k, keep_empty_features=True),
        "iterative": IterativeImputer(random_state=seed, max_iter=10, keep_empty_features=True),
    }
    if extra_trees:
        from sklearn.ensemble import ExtraTreesRegressor

        imputers["iterative_extratrees"] = IterativeImputer(
            estimator=ExtraTreesRegressor(n_estimators=10, random_state=seed), random_state=seed, max_iter=10,
            keep_empty_features=True,
        )
    from tasks.train import run_logger

    # float64: on float32 rows (the prepared partitions' dtype) IterativeImputer's BayesianRidge overflowed on a
    # 20,000-row sample of a 36-numeric + 2-categorical table ("Input X contains infinity") and failed the run.
    rows = (fit_x if fit_x is not None else x).astype("float64")
    x64 = x.astype("float64")
    out = {}
    for name, imp in imputers.items():
        fit_rows = rows
        if name == "iterative_extratrees" and extra_trees_max_rows is not None and len(rows) > extra_trees_max_rows:
            fit_rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), extra_trees_max_rows, replace=False))]
        t0 = time.perf_counter()
        try:
            # KNNImputer's distances come in chunks of sklearn's working_memory (1 GiB by default): 2.5 GB peak
            # for 20,000 x 20,000 rows; at 64 MiB 0.46 GB, and faster (40 s vs 62 s here), same imputations.
            with warnings.catch_warnings(), sklearn.config_context(working_memory=BASELINE_WORKING_MEMORY_MB):
                warnings.simplefilter("ignore")  # IterativeImputer's "did not converge" is its normal state here
                x_hat = imp.fit(fit_rows).transform(x64)
        except Exception as e:  # noqa: BLE001 - a baseline must never fail the run it is compared in (detect's rule too)
            run_logger().warning("impute: %s baseline skipped: %s: %s", name, type(e).__name__, str(e).splitlines()[0])
            continue
        took = time.perf_counter() - t0
        if seconds is not None:
            seconds[name] = took
        # each said as it ends: the baselines took minutes together (KNN, ExtraTrees) after one line
        run_logger().info("impute evaluation: %s baseline fitted on %s rows, imputed %s in %.1f s", name,
                          f"{len(fit_rows):,}", f"{len(x64):,}", took)
        # A one-hot group's mean is a distribution over categories: its argmax is the mode.
        out[name] = fill(x, x_hat, groups)
    return out


def imputation_errors(
    truth: np.ndarray, imputed: np.ndarray, hidden: np.ndarray, groups: list[Group], lo: np.ndarray, hi: np.ndarray
) -> dict[str, float | int | None]:
    """RMSE over hidden numeric cells on min-max scaled values (``lo``/``hi`` in the same units
    as ``truth``), and accuracy over hidden categorical cells."""
    sq, n_num, right, n_cat = 0.0, 0, 0, 0
    for j, g in enumerate(groups):
        rows = hidden[:, j]
        if not rows.any():
            continue
        if g.spec.kind == "numeric":
            c = g.cols[0]
            span = hi[c] - lo[c] if hi[c] - lo[c] > 1e-12 else 1.0
            sq += float(np.sum(((imputed[rows, c] - truth[rows, c]) / span) ** 2))
            n_num += int(rows.sum())
        else:
            cols = list(g.cols)
            right += int(np.sum(np.argmax(imputed[rows][:, cols], 1) == np.argmax(truth[rows][:, cols], 1)))
            n_cat += int(rows.sum())
    return {
        "rmse": float(np.sqrt(sq / n_num)) if n_num else None,
        "accuracy": right / n_cat if n_cat else None,
        "hidden_numeric_cells": n_num,
        "hidden_categorical_cells": n_cat,
    }


def _filled_decimals(col: np.ndarray, typ: pa.DataType, missing: np.ndarray, imputed: np.ndarray) -> pd.Series:
    """A decimal column with its missing cells filled, rounded to its scale, in its own Arrow type (every
    part of imputed.parquet alike); a filled value too wide for its precision widens it to 38 digits."""
    step = decimal.Decimal(1).scaleb(-typ.scale)
    col = col.copy()
    col[missing] = [decimal.Decimal(repr(float(v))).quantize(step) for v in imputed[missing]]
    try:
        arr = pa.array(col, type=typ)
    except (pa.ArrowInvalid, decimal.InvalidOperation):
        typ = pa.decimal128(38, typ.scale)
        arr = pa.array(col, type=typ)
    return pd.Series(arr, dtype=pd.ArrowDtype(typ))


def _restore_dtype(values: pd.Series, dtype: str | None) -> pd.Series:
    if not dtype:
        return values
    try:
        if dtype in ("bool", "boolean"):  # numpy's and pandas' nullable booleans
            return (values.astype("float64") > 0.5).astype(dtype)
        if dtype.lower().startswith(("int", "uint")) and pd.api.types.is_float_dtype(values):
            return values.round().astype(dtype)
        return values.astype(dtype)
    except (TypeError, ValueError):  # e.g. nulls left in a label column read as int: keep what we have
        return values


# ---------------------------------------------------------------------------------------
# The application


@register
class Impute(TableApp):
    name = "impute"
    Config = Config
    RunConfig = ImputeRunConfig
    allow_nulls = True
    model_kind = "masked_imputer"
    output = "imputed"
    carries_id = False  # the input's own columns, the id among them
    headlines = (("rmse", False), ("accuracy", True))
    fit_only = FIT_ONLY + ("app.mask_fraction", "app.members", "app.passes", "app.head_alpha")  # the model's own
    cli_options = (
        ("--mask-fraction", "app.mask_fraction", float, "Share of observed cells hidden in each training batch."),
        ("--eval-fraction", "app.eval_fraction", float, "Share of observed cells hidden for the evaluation (MCAR)."),
        ("--eval-seed", "app.eval_seed", int, "Seed of the evaluation's hidden cells."),
        ("--latent-dim", "model.latent_dim", int, "Width of the autoencoder's code."),
    )

    def check_data(self, ctx: TableContext) -> None:
        """Also say which columns ``imputed.parquet`` gives back as float64 rather than in the integer or boolean
        dtype they were read with at fit time: they hold values that dtype cannot (observed values stay as read)."""
        super().check_data(ctx)
        from tasks.train import run_logger

        dtypes = ctx.schema.extra.get("dtypes", {})
        for name, value in ctx.target.misfit.items():
            w = (f"{ctx.target.source_uri}: column {name!r} was read as {dtypes.get(name)} at fit time but holds "
                 f"{value:g}: imputed.parquet gives it as float64, so that no observed value is rounded")
            run_logger().warning("%s", w)
            ctx.notes.append(f"warning: {w}")

    def fit(self, ctx: TableContext) -> Fitted:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        prep = ctx.train
        for g in feature_groups(ctx.schema):
            if prep.nonnull and all(prep.nonnull[c] == 0 for c in g.cols):
                raise InputError(
                    f"{prep.source_uri}: column {g.spec.name!r} is entirely null: there is no observed value to learn "
                    f"it from; --exclude it"
                )
        train_x, val_x = self.training_rows(ctx)
        numeric = [g.cols[0] for g in feature_groups(ctx.schema) if g.spec.kind == "numeric"]
        model, result = fit_imputer(train_x, val_x, ctx.config.model, ctx.config.train, mask_fraction=cfg.mask_fraction,
                                    members=cfg.members, passes=cfg.passes, head_alpha=cfg.head_alpha,
                                    head_columns=numeric, run=ctx.run, show_progress=True)
        return Fitted(model=model, schema=ctx.schema, stats=prep.stats, train=result)

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        """The partition's raw rows (as read) with their missing feature cells filled."""
        schema, source = fitted.schema, ctx.source
        groups = feature_groups(schema)
        dtypes = schema.extra.get("dtypes", {})
        block = source.blocks[index]
        raw = read_block(block, source.schema, source.columns).reset_index(drop=True)
        if len(raw) != len(x):
            raise RuntimeError(f"partition {block.index} of {block.uri}: {len(raw)} rows read, {len(x)} prepared")
        values = fitted.stats.inverse(fill(x, reconstruct(fitted.model, x, ctx.device), groups))
        decimals = read_decimal_columns(block, [g.spec.name for g in groups if g.spec.kind == "numeric"])
        for g in groups:
            name = g.spec.name
            missing = raw[name].isna().to_numpy()
            if name in decimals:
                # a Parquet decimal column (money, say) stays decimal: its observed values exactly as stored,
                # the filled ones rounded to the column's scale (it came back as float64, 51.483409); in every
                # part, those without a missing cell too
                raw[name] = _filled_decimals(*decimals[name], missing, values[:, g.cols[0]])
                continue
            if not missing.any():
                continue
            if g.spec.kind == "numeric":
                col = raw[name].to_numpy(dtype="float64", na_value=np.nan, copy=True)
                col[missing] = values[missing, g.cols[0]]
                raw[name] = col
            else:
                cats = np.array(g.spec.categories, dtype=object)
                col = raw[name].to_numpy(dtype=object, copy=True)
                col[missing] = cats[np.argmax(values[missing][:, list(g.cols)], axis=1)]
                raw[name] = col
        misfit = ctx.target.misfit  # fractions in a column read as integers at fit time: rounding would change them
        for name in raw.columns:
            if name not in decimals:
                raw[name] = _restore_dtype(raw[name], "float64" if name in misfit else dtypes.get(name))
        return raw

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        ev = Evaluation()
        groups = feature_groups(fitted.schema)
        # Bounded memory and time: the evaluation hides cells of at most app.eval_rows rows, the baselines are
        # fitted on at most baseline_max_rows (seeded samples; all rows, in order, when there are fewer).
        seed, cap, n_eval = cfg.eval_seed, cfg.baseline_max_rows, cfg.eval_rows
        if ctx.train is not None and ctx.target is ctx.train:
            fit_x = ctx.sample("train", "train", cap, seed)[0]
            eval_x, _, total = ctx.sample("train", "val", n_eval, seed)
            where = "held-out validation rows; baselines fitted on the training rows"
            if len(eval_x) == 0:
                (eval_x, _, total), fit_x = ctx.sample("train", "train", n_eval, seed), None
                where = "the training rows (no validation rows); baselines fitted on them"
        elif ctx.train is not None:
            fit_x = np.concatenate([ctx.sample("train", split, cap // 2, seed)[0] for split in ("train", "val")])
            eval_x, _, total = ctx.sample("target", "all", n_eval, seed)
            where = "the applied data; baselines fitted on the input"
        else:
            fit_x, (eval_x, _, total) = None, ctx.sample("target", "all", n_eval, seed)
            where = "the applied data; baselines fitted on it (the model was reused)"
        if total > len(eval_x):
            where = f"a seeded sample of {len(eval_x):,} of {total:,} rows (app.eval_rows) of " + where
        n_missing = int(sum(np.isnan(eval_x[:, g.cols[0]]).sum() for g in groups))
        ev.metrics["missing_share"] = n_missing / max(eval_x.shape[0] * len(groups), 1)
        hidden_x, hidden = hide_cells(eval_x, groups, cfg.eval_fraction, cfg.eval_seed)
        if not hidden.any():
            ev.notes.append("no observed cells to hide: imputation metrics skipped")
            return ev
        stats: ScalingStats = fitted.stats
        lo, hi = np.array(stats.min), np.array(stats.max)
        truth = stats.inverse(np.nan_to_num(eval_x))
        ours = stats.inverse(fill(hidden_x, reconstruct(fitted.model, hidden_x, ctx.device), groups))
        ev.metrics.update(imputation_errors(truth, ours, hidden, groups, lo, hi))
        from tasks.train import run_logger

        run_logger().info("impute evaluation: %s rows with %s hidden cells; baselines fitted on %s rows "
                          "(mean/mode, KNN, IterativeImputer%s)", f"{len(eval_x):,}", f"{int(hidden.sum()):,}",
                          f"{len(fit_x if fit_x is not None else eval_x):,}",
                          ", IterativeImputer over ExtraTrees" if cfg.extra_trees else "")
        for name, imp in baseline_imputations(fit_x, hidden_x, groups, k=cfg.knn_neighbors, seed=ctx.config.train.seed,
                                               extra_trees=cfg.extra_trees,
                                               extra_trees_max_rows=cfg.extra_trees_max_rows).items():
            errs = imputation_errors(truth, stats.inverse(imp), hidden, groups, lo, hi)
            ev.baselines[name] = {k: errs[k] for k in ("rmse", "accuracy")}
        skipped = [b for b in ("mean_mode", "knn", "iterative") + (("iterative_extratrees",) if cfg.extra_trees else ())
                   if b not in ev.baselines]
        if skipped:
            ev.notes.append(f"baseline(s) {', '.join(skipped)} failed and are left out (the run's log says why)")
        ev.notes.append(
            f"{cfg.eval_fraction:.0%} of observed cells hidden (MCAR, seed {cfg.eval_seed}) in {where}; "
            "RMSE on min-max scaled values (training min/max), accuracy over categorical cells"
            + (f"; IterativeImputer(ExtraTrees) fitted on at most {cfg.extra_trees_max_rows} of the baselines' rows"
               if cfg.extra_trees else "")
        )
        return ev
