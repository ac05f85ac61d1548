"""An anomaly detector: a dense autoencoder plus k-nearest-neighbour references in its code space
and, optionally, in its input space.

Pure PyTorch. The score of a row is a weighted sum of up to three parts, each put
on a common scale with statistics of the training rows:

- the reconstruction error (mean squared, in scaled units), weight 1: rows the
  decoder cannot rebuild;
- the mean distance of the row's code to its k nearest *reference* codes (the
  training rows' codes), weight ``knn_weight``: rows in an empty region of the
  code space, which an autoencoder often reconstructs well (e.g. extreme values
  along the main axis of the data, or a small cluster of anomalies it learned
  during training);
- with ``input_weight > 0``, the mean distance of the (scaled) row itself to its k
  nearest reference rows (the same training rows, kept as ``input_reference``),
  weight ``input_weight``: what the code keeps of a row is lossy, and rows that are
  far from every training row in the input space are anomalies the code can miss.

``scaling`` puts the parts on one scale: ``"median"`` divides each part by its
median over the training rows (a typical row then scores ~1 per part);
``"robust"`` subtracts that median and divides by the interquartile range (a
typical row then scores ~0), so that a part with a heavy upper tail does not
drown the others.

The nearest reference is always left out (neighbours 2..k+1), for every row, in
both spaces: a training row then never counts itself, and the score is one fixed
function of the row, so scoring the same data with a reused model gives the same
result. The references, the centres and the scales are buffers: they are saved
with the weights (safetensors) and the model is rebuilt from its JSON config
alone. A config without the newer fields (``input_weight``, ``scaling``) is the
original two-part, median-scaled detector, with the same buffers as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.dense import AEOutput, DenseAEConfig, DenseAutoencoder

SCALINGS = ("median", "robust")


@dataclass(frozen=True)
class DetectorConfig:
    """Shape of a :class:`KnnAutoencoderDetector`.

    Attributes:
        ae: The autoencoder.
        n_reference: Rows of the reference (fixed at fit time; the same rows in both spaces).
        k: Neighbours whose mean distance is a kNN part of the score (both spaces).
        knn_weight: Weight of the code-space part (the reconstruction part weighs 1).
        input_weight: Weight of the input-space part (0: no input-space reference is kept).
        scaling: ``"median"`` (each part over its training median) or ``"robust"``
            ((part - training median) / training interquartile range).
    """

    ae: DenseAEConfig
    n_reference: int = 0
    k: int = 20
    knn_weight: float = 3.0
    input_weight: float = 0.0
    scaling: str = "median"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.knn_weight < 0:
            raise ValueError(f"knn_weight must be >= 0, got {self.knn_weight}")
        if self.input_weight < 0:
            raise ValueError(f"input_weight must be >= 0, got {self.input_weight}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")

    @property
    def latent_dim(self) -> int:
        return self.ae.latent_dim

    @property
    def in_features(self) -> int:
        return self.ae.in_features

    @property
    def n_parts(self) -> int:
        """Parts of the score: reconstruction, code space and, with ``input_weight > 0``, input space."""
        return 3 if self.input_weight > 0 else 2

    def to_dict(self) -> dict[str, Any]:
        return {"ae": self.ae.to_dict(), "n_reference": self.n_reference, "k": self.k, "knn_weight": self.knn_weight,
                "input_weight": self.input_weight, "scaling": self.scaling}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        # input_weight / scaling absent: a model saved before they existed (two parts, median scaling)
        return cls(ae=DenseAEConfig.from_dict(d["ae"]), n_reference=int(d["n_reference"]), k=int(d["k"]),
                   knn_weight=float(d["knn_weight"]), input_weight=float(d.get("input_weight", 0.0)),
                   scaling=str(d.get("scaling", "median")))


class KnnAutoencoderDetector(nn.Module):
    """A :class:`DenseAutoencoder` (``forward`` and ``encode`` are its own, so the usual training
    loop trains it) with reference sets in its code space (and input space) for scoring."""

    kind = "dense_detector"

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.ae = DenseAutoencoder(config.ae)
        self.register_buffer("reference", torch.zeros(config.n_reference, config.ae.latent_dim))
        if config.input_weight > 0:
            self.register_buffer("input_reference", torch.zeros(config.n_reference, config.ae.in_features))
        # per part, over the training rows: medians ("median" scaling) or interquartile ranges ("robust")
        self.register_buffer("scales", torch.ones(config.n_parts))
        if config.scaling == "robust":
            self.register_buffer("centers", torch.zeros(config.n_parts))  # per part: training medians

    def encode(self, x: Tensor) -> Tensor:
        return self.ae.encode(x)

    def forward(self, x: Tensor) -> AEOutput:
        return self.ae(x)

    # -- scoring -----------------------------------------------------------------------
    def set_reference(self, codes: Tensor, rows: Tensor | None = None) -> None:
        """Replace the reference codes and, with ``input_weight > 0``, the reference rows (the
        same rows, in the input space; required then). The config's ``n_reference`` follows."""
        device = self.scales.device
        if self.config.input_weight > 0:
            if rows is None or len(rows) != len(codes):
                raise ValueError("input_weight > 0: set_reference needs the reference rows, one per code")
            self.input_reference = rows.detach().to(device, torch.float32).contiguous()
        self.reference = codes.detach().to(device, torch.float32).contiguous()
        c = self.config
        self.config = DetectorConfig(c.ae, len(codes), c.k, c.knn_weight, c.input_weight, c.scaling)

    def _knn_distance(self, q: Tensor, ref: Tensor, chunk: int) -> Tensor:
        """Mean distance of each row of ``q`` to its k nearest rows of ``ref``, the nearest left out."""
        k = min(self.config.k + 1, len(ref))
        if k < 2:
            return torch.zeros(len(q), device=q.device)
        out = []
        for part in q.float().split(chunk):
            d = torch.cdist(part, ref)
            out.append(torch.topk(d, k, dim=1, largest=False).values[:, 1:].mean(dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def score_parts(self, x: Tensor, chunk: int = 1024) -> tuple[Tensor, ...]:
        """Per row: (reconstruction MSE, code-space kNN distance[, input-space kNN distance]),
        each kNN distance the mean over the k nearest references but the nearest."""
        out = self.ae(x)
        recon = ((out.x_hat.float() - x.float()) ** 2).mean(dim=1)
        parts = (recon, self._knn_distance(out.z, self.reference, chunk))
        if self.config.input_weight > 0:
            parts += (self._knn_distance(x, self.input_reference, chunk),)
        return parts

    def set_scales(self, parts: Tensor | np.ndarray) -> None:
        """Fix the centres and scales from the training rows' parts (rows x parts)."""
        p = np.asarray(parts.cpu() if isinstance(parts, Tensor) else parts, dtype=np.float64)
        if len(p):
            q25, med, q75 = np.percentile(p, [25, 50, 75], axis=0)
        else:
            q25, med, q75 = np.zeros(self.config.n_parts), np.ones(self.config.n_parts), np.ones(self.config.n_parts)
        device = self.scales.device
        if self.config.scaling == "robust":
            # a part constant over half the rows has no spread: its median (or 1) as the scale instead
            fallback = np.where(np.abs(med) > 1e-12, np.abs(med), 1.0)
            self.centers = torch.tensor(med, dtype=torch.float32, device=device)
            self.scales = torch.tensor(np.where(q75 - q25 > 1e-12, q75 - q25, fallback), dtype=torch.float32, device=device)
        else:
            self.scales = torch.tensor(med, dtype=torch.float32, device=device)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        parts = self.score_parts(x)
        weights = (1.0, self.config.knn_weight, self.config.input_weight)
        centers = self.centers if self.config.scaling == "robust" else torch.zeros_like(self.scales)
        s = (parts[0] - centers[0]) / self.scales[0].clamp(min=1e-12)
        if len(self.reference) > 1:
            for i in range(1, len(parts)):
                if weights[i] > 0:
                    s = s + weights[i] * (parts[i] - centers[i]) / self.scales[i].clamp(min=1e-12)
        return s


def build_detector(config: dict[str, Any]) -> KnnAutoencoderDetector:
    return KnnAutoencoderDetector(DetectorConfig.from_dict(config))
