"""An anomaly detector: a dense autoencoder plus a k-nearest-neighbour reference in its code space.

Pure PyTorch. The score of a row has two parts, each divided by its median over
the training rows so that they are comparable and sum to ~2 for a typical row:

- the reconstruction error (mean squared, in scaled units): rows the decoder
  cannot rebuild;
- the mean distance of the row's code to its k nearest *reference* codes (the
  training rows' codes): rows in an empty region of the code space, which an
  autoencoder often reconstructs well (e.g. extreme values along the main axis of
  the data, or a small cluster of anomalies it learned during training).

The nearest reference code is always left out (neighbours 2..k+1), for every row:
a training row then never counts itself, and the score is one fixed function of
the row, so scoring the same data with a reused model gives the same result.
The reference codes and the two medians are buffers: they are saved with the
weights (safetensors) and the model is rebuilt from its JSON config alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.dense import AEOutput, DenseAEConfig, DenseAutoencoder


@dataclass(frozen=True)
class DetectorConfig:
    """Shape of a :class:`KnnAutoencoderDetector`.

    Attributes:
        ae: The autoencoder.
        n_reference: Rows of the code-space reference (fixed at fit time).
        k: Neighbours whose mean distance is the code-space part of the score.
        knn_weight: Weight of the code-space part (the reconstruction part weighs 1).
    """

    ae: DenseAEConfig
    n_reference: int = 0
    k: int = 20
    knn_weight: float = 3.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.knn_weight < 0:
            raise ValueError(f"knn_weight must be >= 0, got {self.knn_weight}")

    @property
    def latent_dim(self) -> int:
        return self.ae.latent_dim

    @property
    def in_features(self) -> int:
        return self.ae.in_features

    def to_dict(self) -> dict[str, Any]:
        return {"ae": self.ae.to_dict(), "n_reference": self.n_reference, "k": self.k, "knn_weight": self.knn_weight}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        return cls(ae=DenseAEConfig.from_dict(d["ae"]), n_reference=int(d["n_reference"]), k=int(d["k"]),
                   knn_weight=float(d["knn_weight"]))


class KnnAutoencoderDetector(nn.Module):
    """A :class:`DenseAutoencoder` (``forward`` and ``encode`` are its own, so the usual training
    loop trains it) with a code-space reference set for scoring."""

    kind = "dense_detector"

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.ae = DenseAutoencoder(config.ae)
        self.register_buffer("reference", torch.zeros(config.n_reference, config.ae.latent_dim))
        # medians over the training rows of (reconstruction error, code-space distance)
        self.register_buffer("scales", torch.ones(2))

    def encode(self, x: Tensor) -> Tensor:
        return self.ae.encode(x)

    def forward(self, x: Tensor) -> AEOutput:
        return self.ae(x)

    # -- scoring -----------------------------------------------------------------------
    def set_reference(self, codes: Tensor) -> None:
        """Replace the reference codes (the config's ``n_reference`` follows)."""
        self.reference = codes.detach().to(self.scales.device, torch.float32).contiguous()
        self.config = DetectorConfig(self.config.ae, len(codes), self.config.k, self.config.knn_weight)

    @torch.no_grad()
    def score_parts(self, x: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
        """(reconstruction MSE, mean distance to the k nearest reference codes but the nearest) per row."""
        out = self.ae(x)
        recon = ((out.x_hat.float() - x.float()) ** 2).mean(dim=1)
        ref = self.reference
        k = min(self.config.k + 1, len(ref))
        if k < 2:
            return recon, torch.zeros_like(recon)
        dists = []
        for z in out.z.float().split(chunk):
            d = torch.cdist(z, ref)
            dists.append(torch.topk(d, k, dim=1, largest=False).values[:, 1:].mean(dim=1))
        return recon, torch.cat(dists)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        recon, dist = self.score_parts(x)
        s = recon / self.scales[0].clamp(min=1e-12)
        if self.config.knn_weight > 0 and len(self.reference) > 1:
            s = s + self.config.knn_weight * dist / self.scales[1].clamp(min=1e-12)
        return s


def build_detector(config: dict[str, Any]) -> KnnAutoencoderDetector:
    return KnnAutoencoderDetector(DetectorConfig.from_dict(config))
