"""reduce: dimensionality reduction with a dense autoencoder.

Output ``embeddings.parquet``: the id column (when given), then ``z_0..z_{k-1}``,
one row per input row in input order. Metrics on the held-out split:
reconstruction MSE (in scaled units) and trustworthiness, for the autoencoder
and for PCA with the same number of components fitted on the same training rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness

from tasks.apps.base import Evaluation, Fitted, register
from tasks.apps.kinds import TableContext
from tasks.apps.tabular import TableApp
from tasks.config import AppConfig, ModelConfig, RunConfig
from tasks.report import scatter_2d


class Config(AppConfig):
    """Settings of the reduce application."""

    name = "reduce"
    trust_sample: int = Field(1000, ge=10, description="Held-out rows used for trustworthiness (it is O(n^2)).")
    trust_neighbors: int = Field(10, ge=1, description="Neighbourhood size of trustworthiness.")
    plot_points: int = Field(5000, ge=100, description="Points drawn in the embedding plot.")


class ReduceRunConfig(RunConfig):
    """A run of reduce: the flow's parameter."""

    app: Config = Config()
    model: ModelConfig = ModelConfig(latent_dim=2)


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)) if n > k else np.arange(n)


@register
class Reduce(TableApp):
    name = "reduce"
    Config = Config
    RunConfig = ReduceRunConfig
    output = "embeddings"
    headlines = (("recon_mse", False), ("trustworthiness", True))
    cli_options = (("--latent-dim", "model.latent_dim", int, "Dimensions of the embedding."),)

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        return self.code_frame(self.encode(fitted, x, ctx.device), "z_")

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        k = fitted.model.config.latent_dim
        ev = Evaluation()
        if ctx.train is not None:
            train_x, val_x, _, _ = ctx.train_arrays
            where = "held-out validation rows"
        else:
            # Applying a saved model: score it on the data it is applied to.
            train_x, (val_x, _) = None, ctx.target_arrays
            where = "the applied data"
        if len(val_x) == 0:
            ev.notes.append("no held-out rows (val_fraction = 0): metrics skipped")
            return ev
        recon = self.reconstruct(fitted, val_x, ctx.device)
        z = self.encode(fitted, val_x, ctx.device)
        ev.metrics["recon_mse"] = float(np.mean((recon - val_x) ** 2))
        idx = _sample(len(val_x), cfg.trust_sample, ctx.config.train.seed)
        nn_k = min(cfg.trust_neighbors, max(1, len(idx) // 2 - 1))
        ev.metrics["trustworthiness"] = float(trustworthiness(val_x[idx], z[idx], n_neighbors=nn_k))
        ev.metrics["n_eval_rows"] = len(val_x)
        if train_x is not None and k <= min(train_x.shape):
            fit_rows = _sample(len(train_x), 100_000, ctx.config.train.seed)
            pca = PCA(n_components=k, random_state=ctx.config.train.seed).fit(train_x[fit_rows])
            zp = pca.transform(val_x)
            ev.baselines["pca"] = {
                "recon_mse": float(np.mean((pca.inverse_transform(zp) - val_x) ** 2)),
                "trustworthiness": float(trustworthiness(val_x[idx], zp[idx], n_neighbors=nn_k)),
            }
        elif train_x is not None:
            ev.notes.append(f"PCA baseline skipped: {k} components exceed the data's rank bound {min(train_x.shape)}")
        ev.notes.append(f"metrics on {where}; reconstruction MSE in scaled units")
        return ev

    def report(self, ctx: TableContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        out = super().report(ctx, fitted, evaluation)
        x, side = ctx.target_arrays
        idx = _sample(len(x), cfg.plot_points, 0)
        z = self.encode(fitted, x[idx], ctx.device)
        title = "Embedding (z_0, z_1)"
        if z.shape[1] == 1:
            z = np.column_stack([z[:, 0], np.zeros(len(z))])
            title = "Embedding (z_0)"
        elif z.shape[1] > 2:
            z = PCA(n_components=2, random_state=0).fit_transform(z)
            title = f"Embedding ({fitted.model.config.latent_dim}-D, projected to 2-D by PCA)"
        label = fitted.schema.label
        labels = side[label].to_numpy()[idx] if label and label in side.columns else None
        out["embedding_plot"] = scatter_2d(ctx.run, z, labels, "report/embedding.png", title)
        return out
