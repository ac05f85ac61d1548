"""Where a training run's minibatches come from, and the random generators they are drawn with.

:class:`BatchSource` is the one interface :func:`models.training.fit` draws from: tensors in
memory (:class:`TensorSource`: a seeded permutation, on the device when the rows fit there) or
a stream read in the background (``tasks/streaming.py: ParquetStream``). Pure PyTorch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


class DeviceGenerator(torch.Generator):
    """A generator on the training device that carries the host generator as ``.host``.

    Build with ``DeviceGenerator(device=...)`` then set ``.host``; see :data:`LossFn`.
    """

    host: torch.Generator


def host_generator(generator: torch.Generator) -> torch.Generator:
    """The CPU generator for small host-side random choices: ``generator.host`` or itself."""
    return getattr(generator, "host", generator)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without synchronising (pinned, non-blocking) on CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_tensor(data: Tensor | np.ndarray) -> Tensor:
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if data.dtype == torch.float64:
        data = data.float()
    return data


def _place(data: Tensor, device: torch.device) -> Tensor:
    """Keep the dataset on the device when it comfortably fits; else gather batches on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if data.element_size() * data.nelement() < free // 4:
            return data.to(device)
    return data


# ---------------------------------------------------------------------------------------
# Where batches come from


class BatchSource(ABC):
    """Where :func:`fit` and :func:`evaluate_loss` get their samples.

    Implementations: :class:`TensorSource` (in memory) and ``tasks.streaming.ParquetStream``
    (minibatches read from Parquet partitions in the background). Batches may be on the host
    (the loop copies them, non-blocking from pinned memory) or already on the device.
    """

    @abstractmethod
    def __len__(self) -> int:
        """Samples in one pass."""

    def prepare(self, device: torch.device) -> None:
        """Called once by :func:`fit` before any batch: place or pin data for ``device``."""

    @abstractmethod
    def train_batches(
        self,
        *,
        epoch: int,
        batch_size: int,
        seed: int,
        generator: torch.Generator,
        device_generator: torch.Generator | None = None,
        skip: int = 0,
    ) -> Iterator[Tensor]:
        """Epoch ``epoch``'s ``len(self) // batch_size`` full, shuffled batches, from batch ``skip`` on.

        The order must be a function of (``seed``, ``epoch``) or of the generators' states at
        the call, which must draw whatever they draw before returning (so the caller can
        reset them for the loss). The ragged last batch is dropped.
        """

    @abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        """Every sample once, in a fixed order, in batches of at most ``batch_size``."""

    @abstractmethod
    def example(self, n: int) -> Tensor:
        """Up to ``n`` samples (to probe the model's cost per sample)."""


class TensorSource(BatchSource):
    """Samples held in one tensor (or numpy array), the first dimension being the sample axis.

    Args:
        data: The samples.
        shuffle: Draw a new permutation each epoch (off: the stored order, for tests that
            compare against a stream read in order).
    """

    def __init__(self, data: Tensor | np.ndarray, *, shuffle: bool = True) -> None:
        self.data = _to_tensor(data)
        self.shuffle = shuffle
        self._pin = False

    def __len__(self) -> int:
        return len(self.data)

    def prepare(self, device: torch.device) -> None:
        self.data = _place(self.data, device)
        self._pin = device.type == "cuda" and self.data.device.type == "cpu"

    def train_batches(self, *, epoch, batch_size, seed, generator, device_generator=None, skip=0):
        n = len(self.data)
        perm: Tensor | None = None
        if self.shuffle:
            on_device = self.data.device.type != "cpu"
            if on_device and device_generator is not None:
                perm = torch.randperm(n, generator=device_generator, device=self.data.device)
            else:
                perm = torch.randperm(n, generator=generator)
        return self._batches(perm, n // batch_size, batch_size, skip)

    def _batches(self, perm: Tensor | None, steps: int, bs: int, skip: int) -> Iterator[Tensor]:
        data = self.data
        for step in range(skip, steps):
            if perm is None:
                yield data[step * bs : (step + 1) * bs]
            elif self._pin:  # host data, CUDA training: gather into pinned memory, copied without a sync
                out = torch.empty((bs, *data.shape[1:]), dtype=data.dtype, pin_memory=True)
                torch.index_select(data, 0, perm[step * bs : (step + 1) * bs], out=out)
                yield out
            elif data.device.type == "cpu":
                yield data[perm[step * bs : (step + 1) * bs]]
            else:
                yield torch.index_select(data, 0, perm[step * bs : (step + 1) * bs])

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        for start in range(0, len(self.data), batch_size):
            yield self.data[start : start + batch_size]

    def example(self, n: int) -> Tensor:
        return self.data[:n]


def as_source(data: Tensor | np.ndarray | BatchSource) -> BatchSource:
    """``data`` itself when it is a :class:`BatchSource`, else a :class:`TensorSource` over it."""
    return data if isinstance(data, BatchSource) else TensorSource(data)


# ---------------------------------------------------------------------------------------
# Sizing the batch for the device
