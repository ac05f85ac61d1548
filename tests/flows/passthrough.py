"""An eighth application in one module, as the README's development section describes: each row
through the dense autoencoder (its reconstruction, in the input's units). The contract tests
register it and get its CLI command, its flow and the whole contract suite for free."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.apps.base import Evaluation, Fitted
from tasks.apps.kinds import TableContext
from tasks.apps.tabular import TableApp
from tasks.config import AppConfig, RunConfig


class Config(AppConfig):
    """Settings of the passthrough application (none of its own)."""

    name = "passthrough"


class PassthroughRunConfig(RunConfig):
    app: Config = Config()


class Passthrough(TableApp):
    """Every row through the autoencoder: ``passthrough.parquet`` holds its reconstruction."""

    name = "passthrough"
    Config = Config
    RunConfig = PassthroughRunConfig
    output = "passthrough"
    headlines = (("recon_mse", False),)

    def apply_part(self, ctx: TableContext, fitted: Fitted, index: int, x: np.ndarray, side: pd.DataFrame) -> pd.DataFrame:
        x_hat = fitted.stats.inverse(self.reconstruct(fitted, x, ctx.device))
        return pd.DataFrame(x_hat, columns=list(ctx.target.columns))

    def evaluate(self, ctx: TableContext, fitted: Fitted) -> Evaluation:
        x, _ = ctx.target_arrays
        return Evaluation(metrics={"recon_mse": float(np.mean((self.reconstruct(fitted, x, ctx.device) - x) ** 2))})
