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


PCA_FIT_ROWS = 100_000  # training rows (sampled) the PCA baseline is fitted on


@register
class Reduce(TableApp):
    name = "reduce"
    Config = Config
    RunConfig = ReduceRunConfig
    output = "embeddings"
    headlines = (("recon_mse", False), ("trustworthiness", True))
    cli_options = (("--latent-dim", "model.latent_dim", int, "Dimensions of the embedding."),)

    def output_columns(self, latent_dim: int) -> list[str]:
        return self.code_columns(latent_dim, "z_")

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        return self.code_frame(self.encode(fitted, x, ctx.device), "z_")

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        """Reconstruction MSE over every held-out row (one partition at a time), trustworthiness on a
        seeded sample of ``trust_sample`` of them, PCA fitted on at most ``PCA_FIT_ROWS`` training rows."""
        from sklearn.decomposition import PCA
        from sklearn.manifold import trustworthiness

        cfg: Config = ctx.config.app  # type: ignore[assignment]
        k, seed = fitted.model.config.latent_dim, ctx.config.train.seed
        ev = Evaluation()
        # Applying a saved model: score it on the data it is applied to.
        which, split, where = ("train", "val", "held-out validation rows") if ctx.train is not None else (
            "target", "all", "the applied data")
        n = ctx.count(which, split)
        if n == 0:
            ev.notes.append("no held-out rows (val_fraction = 0): metrics skipped")
            return ev
        pca = None
        if ctx.train is not None:
            fit_x, _, n_train = ctx.sample("train", "train", PCA_FIT_ROWS, seed)
            if k <= min(fit_x.shape):
                pca = PCA(n_components=k, random_state=seed).fit(fit_x)
                if n_train > len(fit_x):
                    ev.notes.append(f"PCA fitted on a seeded sample of {len(fit_x):,} of {n_train:,} training rows")
            else:
                ev.notes.append(f"PCA baseline skipped: {k} components exceed the data's rank bound {min(fit_x.shape)}")
        sq, sq_pca, cells = 0.0, 0.0, 0
        for x, _side in ctx.parts(which, split):
            cells += x.size
            sq += float(np.sum((self.reconstruct(fitted, x, ctx.device).astype("float64") - x) ** 2))
            if pca is not None:
                sq_pca += float(np.sum((pca.inverse_transform(pca.transform(x)) - x) ** 2))
        ev.metrics["recon_mse"] = sq / cells
        x_t, _, _ = ctx.sample(which, split, cfg.trust_sample, seed)
        nn_k = min(cfg.trust_neighbors, max(1, len(x_t) // 2 - 1))
        trust = nn_k < len(x_t) / 2  # sklearn's bound; not met by 1 to 3 rows
        if trust:
            ev.metrics["trustworthiness"] = float(trustworthiness(x_t, self.encode(fitted, x_t, ctx.device), n_neighbors=nn_k))
        else:
            ev.notes.append(f"trustworthiness not evaluated: {len(x_t)} row(s) (it needs at least 3)")
        ev.metrics["n_eval_rows"] = n
        if pca is not None:
            ev.baselines["pca"] = {"recon_mse": sq_pca / cells}
            if trust:
                ev.baselines["pca"]["trustworthiness"] = float(trustworthiness(x_t, pca.transform(x_t), n_neighbors=nn_k))
        trust_on = f"; trustworthiness on a seeded sample of {len(x_t):,} rows" if n > len(x_t) else ""
        ev.notes.append(f"metrics on {where}; reconstruction MSE in scaled units{trust_on}")
        return ev

    def report(self, ctx: TableContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        out = super().report(ctx, fitted, evaluation)
        x, side, _ = ctx.sample("target", "all", cfg.plot_points, 0)
        z = self.encode(fitted, x, ctx.device)
        title, axes = "Embedding (z_0, z_1)", ("z_0", "z_1")
        if z.shape[1] == 1:
            z = np.column_stack([z[:, 0], np.zeros(len(z))])
            title, axes = "Embedding (z_0)", ("z_0", "")
        elif z.shape[1] > 2:
            from sklearn.decomposition import PCA

            z = PCA(n_components=2, random_state=0).fit_transform(z)
            title = f"Embedding ({fitted.model.config.latent_dim}-D, projected to 2-D by PCA)"
            axes = ("PC 1 of the code", "PC 2 of the code")
        label = ctx.schema.label
        labels = side[label].to_numpy() if label and label in side.columns else None
        out["embedding_plot"] = scatter_2d(ctx.run, z, labels, "report/embedding.png", title, axis_labels=axes,
                                           label_name=label if labels is not None else None)
        return out
