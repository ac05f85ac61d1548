"""Dense (fully connected) autoencoder for tabular data.

Pure PyTorch: no Prefect, no fsspec, no pandas. The model's configuration is a
small frozen dataclass that round-trips through JSON, so a model is always saved
as ``config.json`` + ``weights.safetensors`` and rebuilt without unpickling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block (e.g. building a model: its initial weights) on torch's global RNG seeded with
    ``seed``, and give the caller its own RNG state back afterwards.

    A fresh process seeds torch's global RNG from the OS, so a model built without this starts
    from different weights in every process: the same command run twice gave different models.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class DenseAEConfig:
    """Shape and regularisation of a :class:`DenseAutoencoder`.

    Attributes:
        in_features: Width of the input (and of the reconstruction).
        latent_dim: Width of the code ``z``.
        hidden: Encoder widths from input to code; the decoder mirrors them.
            The seed's example ``3000 -> 1500 -> 200`` is
            ``DenseAEConfig(3000, 200, hidden=(1500,))``.
        activation: One of :data:`ACTIVATIONS`.
        dropout: Dropout after each hidden activation (0 disables it).
        batch_norm: Batch normalisation before each hidden activation.
    """

    in_features: int
    latent_dim: int
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "gelu"
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {self.in_features}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {list(self.hidden)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseAEConfig:
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", ()))
        return cls(**d)


@dataclass
class AEOutput:
    """What :meth:`DenseAutoencoder.forward` returns.

    Attributes:
        x_hat: The reconstruction, same shape as the input.
        z: The latent code.
    """

    x_hat: Tensor
    z: Tensor


def _mlp(widths: list[int], cfg: DenseAEConfig, last_plain: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_plain and i == len(widths) - 2:
            break
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
    return nn.Sequential(*layers)


class DenseAutoencoder(nn.Module):
    """A symmetric MLP autoencoder: ``in -> hidden... -> latent -> ...hidden -> in``.

    The code and the reconstruction are linear (no activation), so the model can
    represent PCA exactly and the reconstruction is unbounded, as scaled tabular
    data is.
    """

    kind = "dense"

    def __init__(self, config: DenseAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.in_features, *config.hidden, config.latent_dim]
        self.encoder = _mlp(widths, config, last_plain=True)
        self.decoder = _mlp(widths[::-1], config, last_plain=True)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(x_hat=self.decode(z), z=z)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_dense(config: dict[str, Any]) -> DenseAutoencoder:
    return DenseAutoencoder(DenseAEConfig.from_dict(config))



class MaskedDenseAutoencoder(DenseAutoencoder):
    """A dense autoencoder for incomplete rows: missing cells are ``NaN`` in the input.

    The encoder sees the observed values (missing ones set to 0, the scaled mean)
    and the missingness mask side by side, so it can tell "missing" from "zero";
    the decoder reconstructs every cell. ``in_features`` is the width of the data,
    the encoder's input is twice as wide.
    """

    kind = "masked_dense"

    def __init__(self, config: DenseAEConfig) -> None:
        super().__init__(config)
        widths = [2 * config.in_features, *config.hidden, config.latent_dim]
        self.encoder = _mlp(widths, config, last_plain=True)

    def encode(self, x: Tensor) -> Tensor:
        missing = x.isnan()
        return self.encoder(torch.cat([x.masked_fill(missing, 0.0), missing.to(x.dtype)], dim=1))


def masked_reconstruction_loss(
    model: nn.Module, batch: Tensor, generator: torch.Generator, hide: float = 0.25, visible_weight: float = 0.25
) -> Tensor:
    """Denoising objective for imputation: hide a random share of the *observed* cells and
    reconstruct them (and, with a smaller weight, the cells left visible). Cells missing
    in the data carry no loss.
    """
    observed = ~batch.isnan()
    hidden = (torch.rand(batch.shape, generator=generator, device=generator.device).to(batch.device) < hide) & observed
    x_hat = model(batch.masked_fill(hidden, float("nan"))).x_hat.float()
    target = batch.float().nan_to_num(0.0)
    err = (x_hat - target) ** 2
    visible = observed & ~hidden
    hid_loss = (err * hidden).sum() / hidden.sum().clamp(min=1)
    vis_loss = (err * visible).sum() / visible.sum().clamp(min=1)
    return hid_loss + visible_weight * vis_loss


masked_reconstruction_loss.device_rng = True  # type: ignore[attr-defined]  # see models.training.LossFn


def build_masked_dense(config: dict[str, Any]) -> MaskedDenseAutoencoder:
    return MaskedDenseAutoencoder(DenseAEConfig.from_dict(config))


@dataclass(frozen=True)
class ImputerConfig:
    """Shape of a :class:`MaskedImputer`.

    Attributes:
        ae: Each member's autoencoder (``in_features`` = width of the data).
        members: Autoencoders trained side by side from different initialisations;
            the imputation is their mean (an ensemble: lower variance on small tables).
        passes: Refinement passes: each pass's imputations fill the missing cells for
            the next one (the mask still tells the model which cells were filled).
        head: A per-column linear head on the members' mean (see
            :meth:`MaskedImputer.fit_head`); the identity until it is fitted.
    """

    ae: DenseAEConfig
    members: int = 5
    passes: int = 2
    head: bool = True

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {self.passes}")

    @property
    def in_features(self) -> int:
        return self.ae.in_features

    @property
    def latent_dim(self) -> int:
        return self.ae.latent_dim

    def to_dict(self) -> dict[str, Any]:
        return {"ae": self.ae.to_dict(), "members": self.members, "passes": self.passes, "head": self.head}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImputerConfig:
        # Models saved before the head existed have no "head" key (and no head weights).
        return cls(ae=DenseAEConfig.from_dict(d["ae"]), members=int(d["members"]), passes=int(d["passes"]),
                   head=bool(d.get("head", False)))


class _ImputerMember(MaskedDenseAutoencoder):
    """A masked autoencoder with a linear path from (values, mask) to the output beside the
    nonlinear one (tables of strongly correlated columns are largely linear), run for
    ``passes`` refinement passes."""

    def __init__(self, config: DenseAEConfig, passes: int) -> None:
        super().__init__(config)
        self.passes = passes
        self.linear = nn.Linear(2 * config.in_features, config.in_features)

    def forward(self, x: Tensor) -> AEOutput:
        missing = x.isnan()
        mask = missing.to(x.dtype)
        filled = x.masked_fill(missing, 0.0)
        for _ in range(self.passes):
            inp = torch.cat([filled, mask], dim=1)
            z = self.encoder(inp)
            x_hat = self.decoder(z) + self.linear(inp)
            filled = torch.where(missing, x_hat.to(filled.dtype), filled)
        return AEOutput(x_hat=x_hat, z=z)


class MaskedImputer(nn.Module):
    """The impute application's model: an ensemble of refining masked autoencoders
    (missing cells are ``NaN`` in the input). ``x_hat`` is the members' mean, passed
    through a per-column linear head on the missing cells once :meth:`fit_head` has
    fitted it (the identity before); ``z`` is the first member's code. Train it with
    :func:`imputer_loss`, then call :meth:`fit_head`."""

    kind = "masked_imputer"

    def __init__(self, config: ImputerConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(_ImputerMember(config.ae, config.passes) for _ in range(config.members))
        if config.head:
            d = config.in_features
            # missing x_j = self_j * (members' mean)_j + sum_{k != j} cross_jk * filled_k + bias_j
            self.register_buffer("head_self", torch.ones(d))
            self.register_buffer("head_cross", torch.zeros(d, d))
            self.register_buffer("head_bias", torch.zeros(d))

    def encode(self, x: Tensor) -> Tensor:
        return self.members[0](x).z

    def _ensemble(self, x: Tensor) -> AEOutput:
        outs = [m(x) for m in self.members]
        return AEOutput(x_hat=torch.stack([o.x_hat for o in outs]).mean(dim=0), z=outs[0].z)

    def forward(self, x: Tensor) -> AEOutput:
        out = self._ensemble(x)
        if not self.config.head:
            return out
        x_hat, missing = out.x_hat, x.isnan()
        filled = torch.where(missing, x_hat.to(x.dtype), x).to(x_hat.dtype)
        head = (x_hat * self.head_self.to(x_hat.dtype) + filled @ self.head_cross.to(x_hat.dtype).T
                + self.head_bias.to(x_hat.dtype))
        return AEOutput(x_hat=torch.where(missing, head, x_hat), z=out.z)

    @torch.no_grad()
    def fit_head(
        self, x: Tensor | Any, alpha: float = 20.0, columns: Sequence[int] | None = None, *,
        max_rows: int = 10000, max_total_rows: int = 1_000_000, seed: int = 0, batch_size: int = 4096,
    ) -> None:
        """Fit the linear head in closed form (stacking): for each column ``j`` of
        ``columns`` (default: all), hide ``j`` in the rows of ``x`` (scaled, ``NaN`` =
        missing) where it is observed, run the ensemble, and fit a ridge regression
        (penalty ``alpha``, intercept unpenalised) of the true ``x_j`` on the ensemble's
        prediction of ``x_j`` and the row's other cells (observed, or the ensemble's
        imputations). Up to ``max_rows`` rows per column and ``max_total_rows`` over all
        columns (seeded samples): the cost stays below a few epochs of training. Columns not
        fitted keep the identity (the members' mean). Call it after training, in eval mode.
        """
        if not self.config.head:
            raise ValueError("this imputer was built without a head (ImputerConfig.head=False)")
        device = self.head_bias.device
        x = torch.as_tensor(x).float().cpu()
        d = x.shape[1]
        self.head_self.fill_(1.0)
        self.head_cross.zero_()
        self.head_bias.zero_()
        rng = np.random.default_rng(seed)
        columns = list(range(d)) if columns is None else list(columns)
        max_rows = max(min(max_rows, max_total_rows // max(len(columns), 1)), 2)

        def ensemble(rows: Tensor) -> Tensor:
            return torch.cat([self._ensemble(rows[i:i + batch_size].to(device)).x_hat.float().cpu()
                              for i in range(0, len(rows), batch_size)])

        for j in columns:
            obs = np.flatnonzero(~x[:, j].isnan().numpy())
            if len(obs) < 2:
                continue
            if len(obs) > max_rows:
                obs = np.sort(rng.choice(obs, max_rows, replace=False))
            xj = x[torch.from_numpy(obs)]
            target = xj[:, j].double()
            xj[:, j] = float("nan")
            pred = ensemble(xj)
            filled = torch.where(xj.isnan(), pred, xj).double()
            others = [k for k in range(d) if k != j]
            feats = torch.column_stack([pred[:, j].double(), filled[:, others]])
            mean_f, mean_t = feats.mean(0), target.mean()
            fc = feats - mean_f
            w = torch.linalg.solve(fc.T @ fc + alpha * torch.eye(d, dtype=fc.dtype), fc.T @ (target - mean_t))
            self.head_self[j] = float(w[0])
            self.head_cross[j, others] = w[1:].to(self.head_cross.dtype).to(device)
            self.head_bias[j] = float(mean_t - mean_f @ w)


def imputer_loss(
    model: nn.Module, batch: Tensor, generator: torch.Generator, hide: float = 0.25, visible_weight: float = 0.25
) -> Tensor:
    """:func:`masked_reconstruction_loss` of each member (each with its own hidden cells), averaged:
    the members learn independently from the same batches."""
    members = getattr(model, "members", None)
    if members is None:
        return masked_reconstruction_loss(model, batch, generator, hide, visible_weight)
    return sum(masked_reconstruction_loss(m, batch, generator, hide, visible_weight) for m in members) / len(members)


imputer_loss.device_rng = True  # type: ignore[attr-defined]


def build_masked_imputer(config: dict[str, Any]) -> MaskedImputer:
    return MaskedImputer(ImputerConfig.from_dict(config))
