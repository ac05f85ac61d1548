"""Training minibatches streamed from prepared Parquet partitions, in memory bounded by a setting.

:class:`ParquetStream` is a ``models.training.BatchSource``: ``fit`` trains from it exactly
as from arrays in memory. Its inputs are plain (part URIs, feature columns, the boolean
split column and which side to keep, per-column ``offset``/``scale``), so it does not
depend on how the preprocessing describes its output.

How an epoch is read:

- the partitions are visited in a seeded random order (``seed``, ``epoch``), each read in
  chunks of rows (fsspec: local paths or ``s3://`` URIs; pyarrow decodes);
- rows go through a shuffle buffer: once it is full, every incoming row takes the place
  of a random buffered row, which goes out into the next batch; at the end the buffer is
  emptied in random order. The same seed gives the same batches; a buffer that holds a
  whole partition shuffles it completely;
- reading, decoding, scaling (``(x - offset) / scale`` in float32, NaN kept) and batching
  happen on a background thread with a small queue, so the model does not wait on I/O;
  on CUDA the batches are assembled in pinned memory and copied without a synchronisation;
- the memory bound ``memory_mb`` covers the buffer, the chunk being decoded and the
  queued batches (it says how many rows the buffer may hold; see :attr:`ParquetStream.stats`).

Resuming mid-epoch: the order is a function of (``seed``, ``epoch``), so ``skip`` batches
are re-read and dropped rather than trained on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from models.training import BatchSource
from tasks.config import TrainConfig
from tasks.errors import ConfigError, InputError
from tasks.storage import url_to_fs

Side = Literal["train", "validation", "all"]
_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Batcher:
    """Collects rows into batches of exactly ``size`` rows, each in a fresh (optionally pinned) buffer."""

    def __init__(self, size: int, width: int, pin: bool) -> None:
        self.size, self.width, self.pin = size, width, pin
        self.cur: Tensor | None = None
        self.cur_np: np.ndarray | None = None
        self.n = 0

    def add(self, rows: np.ndarray) -> Iterator[Tensor]:
        pos = 0
        while pos < len(rows):
            if self.cur is None:
                self.cur = torch.empty((self.size, self.width), dtype=torch.float32, pin_memory=self.pin)
                self.cur_np = self.cur.numpy()
                self.n = 0
            assert self.cur_np is not None
            k = min(self.size - self.n, len(rows) - pos)
            self.cur_np[self.n : self.n + k] = rows[pos : pos + k]
            self.n += k
            pos += k
            if self.n == self.size:
                out, self.cur, self.cur_np = self.cur, None, None
                yield out

    def rest(self) -> Tensor | None:
        return self.cur[: self.n] if self.cur is not None and self.n else None

    @property
    def rows(self) -> int:
        return self.n if self.cur is not None else 0


class ParquetStream(BatchSource):
    """Minibatches of ``columns`` read from Parquet ``parts``.

    Args:
        parts: Partition URIs (local paths or ``s3://...``), in their canonical order.
        columns: Feature columns, in model input order.
        split_column: Boolean column, True on validation rows (None: no split, ``side="all"``).
        side: Which rows to keep: ``"train"`` (split False), ``"validation"`` (split True) or ``"all"``.
        offset / scale: Per-column arrays; rows become ``(x - offset) / scale`` (None: as stored).
        memory_mb: Bound on the rows the stream holds at once (buffer, chunk, queued batches).
        shuffle: Shuffle training epochs (partition order + shuffle buffer); off: stored order.
        read_rows: Rows decoded per chunk (lowered to fit the memory bound).
        prefetch: Batches read ahead on the background thread.

    Raises:
        ConfigError: on inconsistent arguments (naming them).
    """

    def __init__(
        self,
        parts: Sequence[str],
        columns: Sequence[str],
        *,
        split_column: str | None = None,
        side: Side = "train",
        offset: np.ndarray | Sequence[float] | None = None,
        scale: np.ndarray | Sequence[float] | None = None,
        memory_mb: float = 512.0,
        shuffle: bool = True,
        read_rows: int = 65536,
        prefetch: int = 3,
    ) -> None:
        self.parts = [str(p) for p in parts]
        self.columns = [str(c) for c in columns]
        if not self.columns:
            raise ConfigError("a training stream needs at least one feature column")
        if side not in ("train", "validation", "all"):
            raise ConfigError(f"side must be 'train', 'validation' or 'all', got {side!r}")
        if split_column is None and side != "all":
            raise ConfigError(f"side={side!r} needs a split column (None given): keep side='all' or name it")
        if not memory_mb > 0:
            raise ConfigError(f"memory_mb must be > 0, got {memory_mb}")
        if read_rows < 1 or prefetch < 1:
            raise ConfigError(f"read_rows and prefetch must be >= 1, got {read_rows} and {prefetch}")
        self.split_column, self.side = split_column, side
        self.offset = self._per_column("offset", offset)
        self.scale = self._per_column("scale", scale)
        if (self.offset is None) != (self.scale is None):
            raise ConfigError("give both offset and scale, or neither")
        self.memory_mb, self.shuffle = float(memory_mb), shuffle
        self.read_rows, self.prefetch = int(read_rows), int(prefetch)
        self._pin = False
        self._counts: list[int] | None = None
        self.stats: dict[str, int] = {}

    def _per_column(self, name: str, value: Any) -> np.ndarray | None:
        if value is None:
            return None
        arr = np.asarray(value)
        if arr.shape != (len(self.columns),):
            raise ConfigError(f"{name} must have one value per column ({len(self.columns)}), got shape {arr.shape}")
        return arr

    # -- BatchSource ------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(self._row_counts())

    def prepare(self, device: torch.device) -> None:
        self._pin = device.type == "cuda" and torch.cuda.is_available()

    @property
    def budget_rows(self) -> int:
        """Rows of ``len(columns)`` float32 values that fit in ``memory_mb``."""
        return int(self.memory_mb * 2**20 // (4 * len(self.columns)))

    def _chunk_rows(self) -> int:
        return max(1, min(self.read_rows, self.budget_rows // 8))

    def buffer_capacity(self, batch_size: int) -> int:
        """Rows the shuffle buffer may hold for ``batch_size``: the bound less the chunk being
        decoded (counted three times: Arrow, filtered, float32) and the batches in flight."""
        capacity = self.budget_rows - 3 * self._chunk_rows() - (self.prefetch + 3) * batch_size
        if capacity < batch_size:
            raise ConfigError(
                f"train.memory_mb={self.memory_mb:g} holds {self.budget_rows:,} rows of {len(self.columns)} columns: "
                f"too few for batches of {batch_size} plus a shuffle buffer; raise memory_mb or lower the batch size"
            )
        return capacity

    def train_batches(self, *, epoch, batch_size, seed, generator=None, device_generator=None, skip=0):
        self._row_counts()  # schema errors surface here, not on the reader thread
        capacity = self.buffer_capacity(batch_size) if self.shuffle else 0
        return self._background(lambda: self._epoch(epoch, batch_size, seed, capacity, skip))

    def eval_batches(self, batch_size: int) -> Iterator[Tensor]:
        self._row_counts()
        return self._background(lambda: self._in_order(batch_size))

    def example(self, n: int) -> Tensor:
        rows: list[np.ndarray] = []
        got = 0
        chunks = self._chunks(range(len(self.parts)))
        try:
            for chunk in chunks:
                rows.append(chunk[: n - got])
                got += len(rows[-1])
                if got >= n:
                    break
        finally:
            chunks.close()
        if not rows:
            return torch.zeros((0, len(self.columns)))
        return torch.from_numpy(np.concatenate(rows))

    # -- reading ----------------------------------------------------------------------------
    def _read_columns(self) -> list[str]:
        return self.columns + ([self.split_column] if self.split_column and self.side != "all" else [])

    def _count_part(self, uri: str) -> int:
        fs, path = url_to_fs(uri)
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                missing = [c for c in self._read_columns() if c not in names]
                if missing:
                    raise InputError(f"partition {uri!r} has no column {missing[0]!r} (it has {sorted(names)[:20]})")
                if self.split_column is None or self.side == "all":
                    return pf.metadata.num_rows
                flags = pf.read(columns=[self.split_column]).column(0).to_numpy(zero_copy_only=False)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read training partition {uri!r}: {e}") from e
        val = int(np.count_nonzero(flags))
        return val if self.side == "validation" else len(flags) - val

    def _row_counts(self) -> list[int]:
        if self._counts is None:
            if len(self.parts) > 1:
                with ThreadPoolExecutor(max_workers=min(8, len(self.parts))) as pool:
                    self._counts = list(pool.map(self._count_part, self.parts))
            else:
                self._counts = [self._count_part(p) for p in self.parts]
        return self._counts

    def _chunks(self, order: Sequence[int] | range) -> Iterator[np.ndarray]:
        """Decoded, filtered, scaled float32 rows of the parts in ``order``, a chunk at a time."""
        counts = self._row_counts()
        cols = self._read_columns()
        for i in order:
            if counts[i] == 0:
                continue
            uri = self.parts[i]
            fs, path = url_to_fs(uri)
            try:
                with fs.open(path, "rb") as f:
                    for rb in pq.ParquetFile(f).iter_batches(batch_size=self._chunk_rows(), columns=cols):
                        x = self._decode(rb)
                        if len(x):
                            yield x
            except (OSError, pa.ArrowException) as e:
                raise InputError(f"cannot read training partition {uri!r}: {e}") from e

    def _decode(self, rb: pa.RecordBatch) -> np.ndarray:
        if self.split_column and self.side != "all":
            flags = rb.column(self.split_column).to_numpy(zero_copy_only=False).astype(bool)
            rb = rb.filter(pa.array(flags if self.side == "validation" else ~flags))
        x = np.empty((rb.num_rows, len(self.columns)), dtype=np.float32)
        for j, name in enumerate(self.columns):
            x[:, j] = rb.column(name).to_numpy(zero_copy_only=False)  # nulls arrive as NaN
        if self.offset is not None:
            # The same expression (and dtypes) as the preprocessing's own transform.
            x = ((x - self.offset) / self.scale).astype(np.float32, copy=False)
        return x

    def _epoch(self, epoch: int, batch_size: int, seed: int, capacity: int, skip: int) -> Iterator[Tensor]:
        rng = np.random.default_rng([seed % 2**63, epoch])
        order = rng.permutation(len(self.parts)) if self.shuffle else range(len(self.parts))
        batcher = _Batcher(batch_size, len(self.columns), self._pin)
        self.stats = {"budget_rows": self.budget_rows, "buffer_capacity": capacity, "max_buffered": 0,
                      "chunk_rows": self._chunk_rows()}
        emitted = 0

        def out(rows: np.ndarray) -> Iterator[Tensor]:
            nonlocal emitted
            for b in batcher.add(rows):
                emitted += 1
                if emitted > skip:
                    yield b

        if not self.shuffle:
            for chunk in self._chunks(order):
                yield from out(chunk)
            return
        buf = np.empty((capacity, len(self.columns)), dtype=np.float32)
        filled = 0
        for chunk in self._chunks(order):
            take = min(capacity - filled, len(chunk))
            buf[filled : filled + take] = chunk[:take]
            filled += take
            self.stats["max_buffered"] = max(self.stats["max_buffered"], filled)
            pos = take
            while pos < len(chunk):  # full: each incoming row replaces a random buffered one, which goes out
                k = min(batch_size, len(chunk) - pos)
                idx = rng.choice(capacity, k, replace=False)
                leaving = buf[idx]
                buf[idx] = chunk[pos : pos + k]
                pos += k
                yield from out(leaving)
        perm = rng.permutation(filled)
        for start in range(0, filled, batch_size):
            yield from out(buf[perm[start : start + batch_size]])
        # the ragged rest of the batcher is dropped, as fit drops the ragged last batch

    def _in_order(self, batch_size: int) -> Iterator[Tensor]:
        batcher = _Batcher(batch_size, len(self.columns), self._pin)
        for chunk in self._chunks(range(len(self.parts))):
            yield from batcher.add(chunk)
        rest = batcher.rest()
        if rest is not None:
            yield rest

    def _background(self, produce: Callable[[], Iterator[Tensor]]) -> Iterator[Tensor]:
        """Run ``produce`` on a reader thread, ``prefetch`` batches ahead; errors re-raised here."""
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in produce():
                    if not put(item):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(_Failed(e))

        thread = threading.Thread(target=work, name="aeflow-stream-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join(timeout=10)


def use_streaming(cfg: TrainConfig, rows: int, columns: int) -> bool:
    """Whether ``rows`` x ``columns`` float32 training rows should be streamed under ``cfg``.

    ``stream="on"``/``"off"`` decide; ``"auto"`` streams when the rows take more than
    half of ``memory_mb``.
    """
    if cfg.stream != "auto":
        return cfg.stream == "on"
    return rows * columns * 4 > cfg.memory_mb * 2**20 / 2


def training_streams(
    parts: Sequence[str],
    columns: Sequence[str],
    *,
    split_column: str | None,
    offset: np.ndarray | None,
    scale: np.ndarray | None,
    cfg: TrainConfig,
) -> tuple[ParquetStream, ParquetStream]:
    """The (training, validation) streams of prepared partitions under ``cfg.memory_mb``.

    Without a split column every row trains and the validation stream is empty.
    """
    common: dict[str, Any] = dict(offset=offset, scale=scale, memory_mb=cfg.memory_mb)
    if split_column is None:
        return (ParquetStream(parts, columns, side="all", **common),
                ParquetStream([], columns, side="all", shuffle=False, **common))
    return (ParquetStream(parts, columns, split_column=split_column, side="train", **common),
            ParquetStream(parts, columns, split_column=split_column, side="validation", shuffle=False, **common))
