"""An anomaly detector: a dense autoencoder plus k-nearest-neighbour references in its code space
and, optionally, in its input space, and a distance to the training centre.

Pure PyTorch. The score of a row is a weighted sum of up to four parts, each put
on a common scale with statistics of the training rows:

- the reconstruction error (mean squared, in scaled units), weight ``recon_weight``
  (1 unless set): rows the decoder cannot rebuild;
- the mean distance of the row's code to its k nearest *reference* codes (the
  training rows' codes), weight ``knn_weight``: rows in an empty region of the
  code space, which an autoencoder often reconstructs well (e.g. extreme values
  along the main axis of the data, or a small cluster of anomalies it learned
  during training);
- with ``input_weight > 0``, the mean Minkowski distance (exponent ``input_p``; 2 is
  Euclidean, below 1 a "fractional" distance, which separates near and far rows
  better when there are many columns) of the row itself to its k nearest rows of
  ``input_reference``, weight ``input_weight``: what the code keeps of a row is
  lossy, and rows that are far from every training row in the input space are
  anomalies the code can miss;
- with ``center_weight > 0``, the mean squared distance of the row to the training
  rows' column means, in training standard deviations, weight ``center_weight``: a
  global part beside the local kNN ones (rows extreme in many columns at once).

- with ``tail_weight > 0``, a tail probability part in the manner of COPOD (Li et al. 2020,
  as pyod computes it): per column, the empirical left and right tail probabilities of the
  row's value among the training rows' values; the part is the mean over columns of
  ``max(-log(tail on the column's skewed side), (-log(left) - log(right)) / 2)``: rows in the
  far tails of many columns at once (global extremes), whatever each column's distribution.
  ``tail_weight`` is the weight in use, fixed at fit time (``tasks/apps/detect.py`` sets it
  from how well this part agrees with the input-space part on the training rows).

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
alone. A config without the newer fields is the detector of its time, with the
same buffers as before: without ``input_weight`` / ``scaling`` the original
two-part, median-scaled one; without ``recon_weight`` / ``input_p`` /
``center_weight`` reconstruction weight 1, Euclidean input distances, no centre
part, and the same rows in both references.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.dense import AEOutput, DenseAEConfig, DenseAutoencoder

SCALINGS = ("median", "robust")
FRACTIONAL_BLOCK = 1 << 22  # differences (16 MB of float32) of one block of rows (torch path)
FRACTIONAL_SUMS = 1 << 22  # sums (16 MB of float32) of one block of rows x references (numba path)
_FRACTIONAL_KERNEL: Any = None  # numba's compiled fractional_sums; False: numba is not installed


def fractional_sums(q: np.ndarray, ref_t: np.ndarray, out: np.ndarray) -> None:
    """``out[i, j] = sum_c sqrt|q[i, c] - ref_t[c, j]|`` (``ref_t``: the reference rows transposed).

    Plain loops for numba (:func:`fractional_kernel`): the inner loop runs along a reference
    column, contiguous, so it vectorises; one row of sums (a few tens of kB) stays in cache while
    every column adds to it. Each sum adds its columns in order, so a row's sums do not depend
    on the block or thread it is computed in."""
    n, d = q.shape
    m = ref_t.shape[1]
    for i in range(n):
        row = out[i]
        for j in range(m):
            row[j] = 0.0
        for c in range(d):
            qc = q[i, c]
            rc = ref_t[c]
            for j in range(m):
                row[j] += np.sqrt(np.abs(qc - rc[j]))


def fractional_kernel():
    """:func:`fractional_sums` compiled by numba (once per process, ~0.5 s; releases the GIL), or
    None without numba (``models/`` needs only torch: the torch path then)."""
    global _FRACTIONAL_KERNEL
    if _FRACTIONAL_KERNEL is None:
        try:
            import numba
        except ImportError:
            _FRACTIONAL_KERNEL = False
        else:
            _FRACTIONAL_KERNEL = numba.njit(nogil=True, cache=False)(fractional_sums)
    return _FRACTIONAL_KERNEL or None


def _fractional_knn_numba(kernel, q: Tensor, ref: Tensor, k: int) -> Tensor:
    """Mean squared fractional (p = 0.5) sum over each row's k - 1 nearest references after the
    nearest: blocks of rows through ``kernel``, on ``torch.get_num_threads()`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    qn = np.ascontiguousarray(q.detach().float().numpy())
    ref_t = np.ascontiguousarray(ref.detach().float().numpy().T)
    rows = max(1, min(len(qn), FRACTIONAL_SUMS // max(1, len(ref))))
    starts = range(0, len(qn), rows)

    def block(start: int) -> Tensor:
        part = qn[start:start + rows]
        sums = np.empty((len(part), ref_t.shape[1]), np.float32)
        kernel(part, ref_t, sums)
        return torch.topk(torch.from_numpy(sums), k, dim=1, largest=False).values[:, 1:].square().mean(dim=1)

    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        return torch.cat([block(s) for s in starts])
    with ThreadPoolExecutor(threads) as pool:
        return torch.cat(list(pool.map(block, starts)))


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
        recon_weight: Weight of the reconstruction part.
        input_p: Exponent of the Minkowski distance in the input space (2: Euclidean).
        center_weight: Weight of the distance to the training centre (0: no such part).
        n_input_reference: Rows of the input-space reference (None: ``n_reference``, the
            same rows as the code-space reference).
        tail_weight: Weight of the tail probability part (0: no such part).
        n_tail_reference: Training rows whose per-column values define the tail probabilities.
    """

    ae: DenseAEConfig
    n_reference: int = 0
    k: int = 20
    knn_weight: float = 3.0
    input_weight: float = 0.0
    scaling: str = "median"
    recon_weight: float = 1.0
    input_p: float = 2.0
    center_weight: float = 0.0
    n_input_reference: int | None = None
    tail_weight: float = 0.0
    n_tail_reference: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.knn_weight < 0:
            raise ValueError(f"knn_weight must be >= 0, got {self.knn_weight}")
        if self.input_weight < 0:
            raise ValueError(f"input_weight must be >= 0, got {self.input_weight}")
        if self.recon_weight < 0:
            raise ValueError(f"recon_weight must be >= 0, got {self.recon_weight}")
        if self.center_weight < 0:
            raise ValueError(f"center_weight must be >= 0, got {self.center_weight}")
        if self.tail_weight < 0:
            raise ValueError(f"tail_weight must be >= 0, got {self.tail_weight}")
        if not self.input_p > 0:
            raise ValueError(f"input_p must be > 0, got {self.input_p}")
        if self.recon_weight + self.knn_weight + self.input_weight + self.center_weight + self.tail_weight <= 0:
            raise ValueError("at least one part of the score needs a weight > 0")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")

    @property
    def latent_dim(self) -> int:
        return self.ae.latent_dim

    @property
    def in_features(self) -> int:
        return self.ae.in_features

    @property
    def part_names(self) -> tuple[str, ...]:
        """Parts of the score, in order: reconstruction, code space and, when weighted, input space,
        centre distance and tail probabilities."""
        return (("recon", "code") + (("input",) if self.input_weight > 0 else ())
                + (("center",) if self.center_weight > 0 else ()) + (("tail",) if self.tail_weight > 0 else ()))

    @property
    def part_weights(self) -> tuple[float, ...]:
        w = {"recon": self.recon_weight, "code": self.knn_weight, "input": self.input_weight, "center": self.center_weight,
             "tail": self.tail_weight}
        return tuple(w[name] for name in self.part_names)

    @property
    def n_parts(self) -> int:
        return len(self.part_names)

    @property
    def input_reference_rows(self) -> int:
        return self.n_reference if self.n_input_reference is None else self.n_input_reference

    def to_dict(self) -> dict[str, Any]:
        d = {"ae": self.ae.to_dict(), "n_reference": self.n_reference, "k": self.k, "knn_weight": self.knn_weight,
             "input_weight": self.input_weight, "scaling": self.scaling}
        # the newer fields only when they differ from the detector before them: old configs stay byte-identical
        if (self.recon_weight, self.input_p, self.center_weight, self.n_input_reference) != (1.0, 2.0, 0.0, None):
            d.update(recon_weight=self.recon_weight, input_p=self.input_p, center_weight=self.center_weight,
                     n_input_reference=self.n_input_reference)
        if self.tail_weight > 0:  # likewise: configs without a tail part stay as they were
            d.update(tail_weight=self.tail_weight, n_tail_reference=self.n_tail_reference)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        # input_weight / scaling absent: a model saved before they existed (two parts, median scaling)
        return cls(ae=DenseAEConfig.from_dict(d["ae"]), n_reference=int(d["n_reference"]), k=int(d["k"]),
                   knn_weight=float(d["knn_weight"]), input_weight=float(d.get("input_weight", 0.0)),
                   scaling=str(d.get("scaling", "median")), recon_weight=float(d.get("recon_weight", 1.0)),
                   input_p=float(d.get("input_p", 2.0)), center_weight=float(d.get("center_weight", 0.0)),
                   n_input_reference=None if d.get("n_input_reference") is None else int(d["n_input_reference"]),
                   tail_weight=float(d.get("tail_weight", 0.0)), n_tail_reference=int(d.get("n_tail_reference", 0)))


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
            self.register_buffer("input_reference", torch.zeros(config.input_reference_rows, config.ae.in_features))
        if config.center_weight > 0:  # per column: the training rows' mean and standard deviation
            self.register_buffer("center_mean", torch.zeros(config.ae.in_features))
            self.register_buffer("center_scale", torch.ones(config.ae.in_features))
        if config.tail_weight > 0:  # per column (rows of tail_sorted): the training values, sorted; skewness signs
            self.register_buffer("tail_sorted", torch.zeros(config.ae.in_features, config.n_tail_reference))
            self.register_buffer("tail_skew", torch.ones(config.ae.in_features))
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
        """Replace the reference codes and, with ``input_weight > 0``, the input-space reference
        rows (required then; any number of rows: the same rows as the codes, or more). With
        ``center_weight > 0`` the rows (required then) also fix the centre: their column means and
        standard deviations; with ``tail_weight > 0`` the tail probabilities: their values per column
        and each column's skewness. The config's reference sizes follow."""
        device = self.scales.device
        c = self.config
        if (c.input_weight > 0 or c.center_weight > 0 or c.tail_weight > 0) and (rows is None or len(rows) == 0):
            raise ValueError("input_weight, center_weight or tail_weight > 0: set_reference needs the reference rows")
        n_input = None
        if c.input_weight > 0:
            self.input_reference = rows.detach().to(device, torch.float32).contiguous()
            n_input = None if len(rows) == len(codes) else len(rows)
        if c.center_weight > 0:
            r = rows.detach().to(device, torch.float64)
            sd = r.std(dim=0, unbiased=False) if len(r) > 1 else torch.ones(r.shape[1], dtype=torch.float64, device=device)
            self.center_mean = r.mean(dim=0).float()
            self.center_scale = torch.where(sd > 1e-12, sd, torch.ones_like(sd)).float()
        n_tail = 0
        if c.tail_weight > 0:
            r = rows.detach().to(device, torch.float64)
            dev = r - r.mean(dim=0)
            third = (dev**3).mean(dim=0)  # the sign of the skewness (the third central moment's)
            self.tail_sorted = torch.sort(r.T.float(), dim=1).values.contiguous()
            self.tail_skew = torch.where(third < 0, -1.0, 1.0).float()
            n_tail = len(r)
        self.reference = codes.detach().to(device, torch.float32).contiguous()
        self.config = DetectorConfig(c.ae, len(codes), c.k, c.knn_weight, c.input_weight, c.scaling, c.recon_weight,
                                     c.input_p, c.center_weight, n_input, c.tail_weight, n_tail)

    def set_tail_weight(self, weight: float) -> None:
        """Fix the tail part's weight in the score (at fit time, after :meth:`set_reference`, before
        :meth:`set_scales`). 0 removes the part and its buffers: the detector is then the one without it."""
        if weight < 0:
            raise ValueError(f"tail weight must be >= 0, got {weight}")
        c = self.config
        if c.tail_weight <= 0:
            raise ValueError("this detector has no tail part (tail_weight = 0)")
        if weight == 0:
            del self.tail_sorted, self.tail_skew
            self.config = dataclasses.replace(c, tail_weight=0.0, n_tail_reference=0)
        else:
            self.config = dataclasses.replace(c, tail_weight=float(weight))

    def _knn_distance(self, q: Tensor, ref: Tensor, chunk: int, p: float = 2.0) -> Tensor:
        """Mean (Minkowski-``p``) distance of each row of ``q`` to its k nearest rows of ``ref``, the
        nearest left out."""
        k = min(self.config.k + 1, len(ref))
        if k < 2:
            return torch.zeros(len(q), device=q.device)
        out = []
        if p == 0.5:
            # sum_j sqrt|q_j - r_j|, squared (ranked before squaring: monotone). On the CPU with numba
            # (a dependency of pyod) one compiled loop per block, ~4x faster than the torch path.
            kernel = fractional_kernel() if q.device.type == "cpu" else None
            if kernel is not None:
                return _fractional_knn_numba(kernel, q, ref, k)
            # torch: ~7x faster than cdist's generic pow path (itself ~30x slower than its Euclidean
            # one). Small blocks of rows (about FRACTIONAL_BLOCK differences) through one reused
            # buffer: a fresh 100 MB tensor per block spends more time faulting in pages than computing.
            rows = max(1, min(len(q), FRACTIONAL_BLOCK // max(1, len(ref) * ref.shape[1])))
            buf = torch.empty(rows, len(ref), ref.shape[1], device=q.device)
            for part in q.float().split(rows):
                diff = torch.sub(part[:, None, :], ref[None, :, :], out=buf[: len(part)])
                s = diff.abs_().sqrt_().sum(dim=2)
                out.append(torch.topk(s, k, dim=1, largest=False).values[:, 1:].square().mean(dim=1))
            return torch.cat(out)
        for part in q.float().split(chunk):
            d = torch.cdist(part, ref, p=p)
            out.append(torch.topk(d, k, dim=1, largest=False).values[:, 1:].mean(dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def score_parts(self, x: Tensor, chunk: int = 1024) -> tuple[Tensor, ...]:
        """Per row, the parts of ``config.part_names``: (reconstruction MSE, code-space kNN distance[,
        input-space kNN distance][, centre distance][, tail probability part]), each kNN distance the
        mean over the k nearest references but the nearest."""
        out = self.ae(x)
        recon = ((out.x_hat.float() - x.float()) ** 2).mean(dim=1)
        parts = (recon, self._knn_distance(out.z, self.reference, chunk))
        if self.config.input_weight > 0:
            parts += (self._knn_distance(x, self.input_reference, chunk, self.config.input_p),)
        if self.config.center_weight > 0:
            parts += ((((x.float() - self.center_mean) / self.center_scale) ** 2).mean(dim=1),)
        if self.config.tail_weight > 0:
            parts += (self._tail_part(x),)
        return parts

    def _tail_part(self, x: Tensor) -> Tensor:
        """COPOD's per-row score (as pyod computes it), averaged over columns instead of summed."""
        ref = self.tail_sorted  # columns x training rows, sorted
        n = ref.shape[1]
        if n == 0:
            return torch.zeros(len(x), device=x.device)
        q = x.float().T.contiguous()  # columns x rows
        floor = 1.0 / (n + 1)
        left = (torch.searchsorted(ref, q, right=True).float() / n).clamp(min=floor)  # share of training values <= x
        right = ((n - torch.searchsorted(ref, q, right=False)).float() / n).clamp(min=floor)  # share >= x
        u_l, u_r = -torch.log(left), -torch.log(right)
        skewed = torch.where(self.tail_skew[:, None] < 0, u_l, u_r)
        return torch.maximum(skewed, (u_l + u_r) / 2).mean(dim=0)

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
        centers = self.centers if self.config.scaling == "robust" else torch.zeros_like(self.scales)
        s = torch.zeros(len(x), device=x.device)
        for i, (name, w) in enumerate(zip(self.config.part_names, self.config.part_weights)):
            if w == 0 or (name in ("code", "input") and len(self.reference) < 2):
                continue  # kNN parts need two references (the nearest is left out)
            s = s + w * (parts[i] - centers[i]) / self.scales[i].clamp(min=1e-12)
        return s


def build_detector(config: dict[str, Any]) -> KnnAutoencoderDetector:
    return KnnAutoencoderDetector(DetectorConfig.from_dict(config))
