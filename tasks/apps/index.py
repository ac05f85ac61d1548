"""index: image search on autoencoder codes, with an exact or FAISS ANN index.

``aeflow run index --input image_dir`` trains a convolutional autoencoder
(or reuses ``--model``; by default one downsampling level, so the code keeps
half the resolution, trained with noise added to the code:
``app.latent_noise``), encodes every image (resized to ``--image-size``) on
the Dask workers, each shard's codes written to
``index/codes/part.NNNNN.npy``, and builds a nearest-neighbour index over
them one part at a time — exact for collections up to ``--ann-threshold``
images, FAISS HNSW above, IVF-PQ (``app.pq_bytes`` per image) above
``app.pq_threshold`` — stored as ``index/index.faiss`` with
``index/ids.parquet`` (id, path, relative path, label) and
``index/meta.json``. ``aeflow search --index RUN --query image.png``
returns the k nearest images with their squared L2 distances.

With class folders, precision@10 and mAP by label are reported for the AE
codes, raw pixels and PCA codes of the same size (within a seeded sample of
``app.eval_max`` images of a larger collection), plus recall@10 of the index
against exact search and queries per second (exact search, part by part, as
the baseline). Training holds its images in memory up to half of
``train.memory_mb``, a seeded sample of them beyond.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from models.conv import latent_noise_loss
from models.dense import seeded
from models.training import predict
from tasks.apps.base import FIT_ONLY, ApplyProgress, Evaluation, Fitted, on_worker, register
from tasks.apps.images_base import ConvModelConfig, ImageApp, ImageRunConfig
from tasks.apps.kinds import ImageContext
from tasks.config import AppConfig, PreprocessConfig, TrainConfig
from tasks.errors import ConfigError, ModelMismatchError
from tasks.images import (
    ImageLoadConfig,
    Mode,
    image_shape,
    images_of,
    shard_images,
    stack_images,
)
from tasks.train import train_model

INDEX_DIR = "index"


class Config(AppConfig):
    """Settings of the index application."""

    name = "index"
    index: Literal["auto", "exact", "hnsw", "ivf", "ivfpq"] = Field(
        "auto", description="auto: exact up to ann_threshold images, HNSW up to pq_threshold, IVF-PQ above; or force "
        "exact, hnsw, ivf or ivfpq.",
    )
    ann_threshold: int = Field(50_000, ge=0, description="Collections larger than this get an ANN index (auto).")
    pq_threshold: int = Field(
        1_000_000, ge=0,
        description="Collections larger than this get IVF-PQ (auto): pq_bytes per image in the index instead of the "
        "float code (8 kB at 32 px), so a collection of many millions fits in memory.",
    )
    pq_bytes: int = Field(64, ge=1, le=1024, description="IVF-PQ: bytes per image (sub-quantizers of 8 bits; at most "
                          "the largest divisor of the code size not above it).")
    ivf_train_max: int = Field(
        100_000, ge=1000, description="IVF and IVF-PQ are trained on a seeded sample of at most this many codes.",
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW graph degree.")
    ef_construction: int = Field(200, ge=8, description="HNSW build-time beam width.")
    ef_search: int = Field(128, ge=1, description="HNSW search-time beam width (the start of the calibration).")
    target_recall: float = Field(
        0.95, ge=0.0, le=1.0,
        description="HNSW (ef_search) and IVF-PQ (nprobe): after the build, the search setting is doubled until "
        "recall@k on a sample of the collection (against exact search) reaches this, or its bound; 0 keeps it as given.",
    )
    max_ef_search: int = Field(4096, ge=1, description="Upper bound of the ef_search calibration.")
    ivf_nlist: int | None = Field(None, ge=1, description="IVF cells (None: 4 * sqrt(n)).")
    ivf_nprobe: int = Field(16, ge=1, description="IVF cells visited per query (IVF-PQ: the start of the calibration).")
    k: int = Field(10, ge=1, le=1000, description="Neighbours for precision@k and recall@k.")
    eval_queries: int = Field(1000, ge=1, description="Queries sampled from the collection for the metrics.")
    eval_max: int = Field(
        20_000, ge=2,
        description="precision@k and mAP (AE codes, raw pixels, PCA) are measured within a seeded sample of at most this "
        "many images of the collection (all of it when smaller; said in the notes when sampled); recall@k and QPS "
        "query the whole index.",
    )
    map_max: int = Field(20_000, ge=1, description="mAP ranks the whole measured collection; skipped above this size.")
    contact_queries: int = Field(4, ge=0, le=32, description="Queries shown in report/contact_sheet.png.")
    latent_noise: float = Field(
        0.25, ge=0.0,
        description="Training: Gaussian noise of this many standard deviations of the code is added to the code "
        "before decoding, so that nearby codes decode to similar images (0: plain reconstruction).",
    )


# index's --image-size and --mode when it trains a model and none is given (with --model: the model's)
DEFAULT_IMAGE_SIZE, DEFAULT_MODE = 32, "gray"


class IndexLoadConfig(ImageLoadConfig):
    """Image loading for index: one size for every image; unset size and mode are the reused model's
    (its codes are meant for images like those it learnt on), or the defaults when training."""

    mode: Mode | None = Field(  # type: ignore[assignment]
        None, description=f"gray, rgb or keep (default: {DEFAULT_MODE} when training; with --model, the mode it learnt on).")
    size: int | None = Field(
        None, ge=1, le=8192,
        description=f"Resize every image to size x size (default: {DEFAULT_IMAGE_SIZE} when training; with --model, "
        "the size it learnt on).")


class IndexRunConfig(ImageRunConfig):
    """A run of index: the flow's parameter."""

    app: Config = Config()
    load: IndexLoadConfig = IndexLoadConfig()  # type: ignore[assignment]
    # Two levels: the code is at half the image resolution (8 x (size/2)^2 values). Measured on digits
    # (benchmarks/RESULTS.md, index): more compressed codes (three levels) rank neighbours worse than raw pixels.
    model: ConvModelConfig = ConvModelConfig(channels=(16, 32), latent_channels=8)
    preprocess: PreprocessConfig = PreprocessConfig(val_fraction=0.1)
    train: TrainConfig = TrainConfig(epochs=40, default_batch_size=64, lr=2e-3, patience=5)


# ---------------------------------------------------------------------------------------
# Pure functions: codes, indexes, metrics


def index_loss(cfg: Config):
    """The training loss of the index autoencoder: reconstruction with ``cfg.latent_noise`` on the code."""
    return latent_noise_loss(cfg.latent_noise)


def encode_images(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` images to flat float32 codes ``(N, d)``."""
    z = predict(model.encode, images, batch_size=batch_size, device=device)
    return np.ascontiguousarray(z.reshape(len(images), -1), dtype=np.float32)


CODES_DIR = f"{INDEX_DIR}/codes"
CHUNK_BYTES = 256 << 20  # codes joined into one block for adding and exact search


def code_part(i: int) -> str:
    """Where the codes of shard ``i`` go in the run: one float32 ``.npy`` per shard of images."""
    return f"{CODES_DIR}/part.{i:05d}.npy"


class Codes:
    """Codes of a collection in consecutive parts (one per shard of images), read one part at a time.

    Over an array (one part) or an index run's stored parts (``index/codes/part.NNNNN.npy``):
    building and evaluating an index hold one part of float codes, not the collection's.
    """

    def __init__(self, counts: tuple[int, ...], dim: int, read: Any) -> None:
        self.counts, self.dim, self._read = tuple(int(c) for c in counts), int(dim), read
        self.starts = np.cumsum((0, *self.counts))

    @classmethod
    def of(cls, codes: np.ndarray | Codes) -> Codes:
        if isinstance(codes, Codes):
            return codes
        arr = np.ascontiguousarray(codes, dtype=np.float32)
        return cls((len(arr),), arr.shape[1], lambda _i: arr)

    @classmethod
    def stored(cls, run: Any, counts: tuple[int, ...], dim: int) -> Codes:
        return cls(counts, dim, lambda i: np.load(io.BytesIO(run.read_bytes(code_part(i))), allow_pickle=False))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def part(self, i: int) -> np.ndarray:
        return self._read(i)

    def parts(self, max_bytes: int = CHUNK_BYTES) -> Any:
        """(first row, codes) of consecutive rows in order: parts joined up to ``max_bytes`` of codes (a
        larger part alone), so that searches and adds run on large blocks with bounded memory."""
        group: list[np.ndarray] = []
        start = size = 0
        for i, c in enumerate(self.counts):
            if not c:
                continue
            if group and size + c * self.dim * 4 > max_bytes:
                yield start, np.concatenate(group) if len(group) > 1 else group[0]
                group, size = [], 0
            if not group:
                start = int(self.starts[i])
            group.append(self.part(i))
            size += c * self.dim * 4
        if group:
            yield start, np.concatenate(group) if len(group) > 1 else group[0]

    def rows(self, idx: np.ndarray | list[int]) -> np.ndarray:
        """The codes of rows ``idx``, in that order (only the parts holding them are read)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), np.float32)
        where = np.searchsorted(self.starts, idx, side="right") - 1
        for p in np.unique(where):
            sel = where == p
            out[sel] = self.part(int(p))[idx[sel] - self.starts[p]]
        return out


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, size), replace=False))


def pq_subquantizers(dim: int, pq_bytes: int) -> int:
    """The number of 8-bit sub-quantizers: the largest divisor of ``dim`` not above ``pq_bytes``."""
    return max(m for m in range(1, min(dim, pq_bytes) + 1) if dim % m == 0)


def build_index(codes: np.ndarray | Codes, kind: str, cfg: Config, seed: int = 0) -> tuple[Any, str]:
    """A FAISS index over ``codes`` (L2; an array, or :class:`Codes` added part by part); returns
    (index, the kind built). IVF kinds train on a seeded sample of at most ``cfg.ivf_train_max`` codes."""
    import faiss

    codes = Codes.of(codes)
    n, d = len(codes), codes.dim
    if kind == "auto":
        kind = "exact" if n <= cfg.ann_threshold else ("hnsw" if n <= cfg.pq_threshold else "ivfpq")
    if kind == "exact":
        index = faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.ivf_nlist or max(1, int(4 * math.sqrt(n)))
        rng = np.random.default_rng(seed)
        sample = codes.rows(rng.choice(n, min(n, 256 * nlist, cfg.ivf_train_max), replace=False))
        nlist = max(1, min(nlist, len(sample) // 39 or 1))  # FAISS wants ~39 training points per cell
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        else:  # 8-bit codebooks want ~39 x 256 training points; fewer bits for a small collection
            nbits = int(min(8, max(1, math.floor(math.log2(max(len(sample) / 39, 2))))))
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, pq_subquantizers(d, cfg.pq_bytes), nbits)
        index.train(sample)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    for _start, part in codes.parts():
        index.add(part)
    if kind in ("hnsw", "ivfpq") and cfg.target_recall > 0:
        calibrate_search(index, kind, codes, cfg, seed)
    return index, kind


def search_param(index: Any, kind: str) -> int:
    """The search-time setting calibrated for ``kind``: HNSW's efSearch, IVF's nprobe."""
    import faiss

    if kind == "hnsw":
        return int(faiss.downcast_index(index).hnsw.efSearch)
    return int(faiss.extract_index_ivf(index).nprobe) if kind in ("ivf", "ivfpq") else 0


def set_search_param(index: Any, kind: str, value: int) -> None:
    import faiss

    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)
    elif kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(value)


def calibrate_search(index: Any, kind: str, codes: np.ndarray | Codes, cfg: Config, seed: int = 0,
                     sample: int = 200) -> float:
    """Double the search setting (HNSW ``efSearch`` from ``cfg.ef_search`` up to ``cfg.max_ef_search``; IVF-PQ
    ``nprobe`` from ``cfg.ivf_nprobe`` up to every cell) until recall@k on ``sample`` rows of the collection
    (queried for k + 1 neighbours, themselves left out) reaches ``cfg.target_recall`` or the bound. Returns the
    recall measured at the chosen setting."""
    import faiss

    codes = Codes.of(codes)
    n = len(codes)
    k = min(cfg.k, n - 1)
    if k < 1:
        return 1.0
    rows = sample_rows(n, sample, seed)
    queries = codes.rows(rows)
    _, exact = exact_neighbours(codes, queries, k + 1)

    def others(ids: np.ndarray) -> np.ndarray:  # each row's neighbours without the row itself
        return np.stack([np.concatenate([r[r != q], np.full(k + 1, -1)])[:k] for r, q in zip(ids, rows, strict=True)])

    truth = others(exact)
    if kind == "hnsw":
        value, bound = min(cfg.ef_search, cfg.max_ef_search), cfg.max_ef_search
    else:
        bound = int(faiss.extract_index_ivf(index).nlist)
        value = min(cfg.ivf_nprobe, bound)
    while True:
        set_search_param(index, kind, value)
        _, got = index.search(queries, k + 1)
        recall = recall_at_k(others(got), truth, k)
        if recall >= cfg.target_recall or value >= bound:
            return recall
        value = min(2 * value, bound)


def write_index(run: Any, rel: str, index: Any) -> None:
    """Write ``index`` to the run's file ``rel`` as FAISS streams it (no in-memory copy of a large index;
    the file appears only when complete)."""
    import faiss

    with run.open(rel, "wb") as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer  # flushes its buffer into f


def ids_frame(imset: Any) -> Any:
    """``index/ids.parquet``: id, path, relative path and label of every indexed image, in index order.

    ``path`` is each file's URI as listed at the door (absolute for local files), so that `aeflow search`
    names (and ``--sheet`` reads) the right files from any working directory and for a glob input; it was
    the input as typed joined with the relative path ('./imgs/a.png', or the glob itself for every image).
    """
    import pandas as pd

    return pd.DataFrame({
        "id": np.arange(len(imset.rel)),
        "path": [imset.path_of(k) for k in range(len(imset.rel))],
        "rel": list(imset.rel),
        "label": [lbl if lbl is not None else "" for lbl in imset.labels],
    })


def deserialize_index(data: bytes, meta: dict[str, Any]) -> Any:
    import faiss

    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if meta.get("kind") == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(meta["params"]["ef_search"])
    elif meta.get("kind") in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(meta["params"]["nprobe"])
    return index


def exact_neighbours(x: np.ndarray | Codes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 k nearest rows of ``x`` (an array, or :class:`Codes` searched part by part) for each query:
    (squared distances, row ids; -1 past the end)."""
    d, i, _ = _exact_search(Codes.of(x), queries, k)
    return d, i


def _exact_search(codes: Codes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact search part by part, the running k best merged; returns (distances, ids, seconds spent
    searching, reading the parts excluded)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    spent = 0.0
    for start, part in codes.parts():
        flat = faiss.IndexFlatL2(codes.dim)
        flat.add(np.ascontiguousarray(part, dtype=np.float32))
        d, i, part_qps = timed_search(flat, queries, min(k, len(part)))
        spent += len(queries) / part_qps
        i = np.where(i >= 0, i + start, -1)
        d, i = np.concatenate([best_d, d], axis=1), np.concatenate([best_i, i], axis=1)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_d, best_i, spent


def timed_exact_search(codes: Codes, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact search of every query over ``codes``; returns (ids, queries per second of the searching)."""
    _, i, spent = _exact_search(codes, queries, k)
    return i, len(queries) / max(spent, 1e-9)


def precision_and_map(x: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int, with_map: bool) -> tuple[float, float | None]:
    """precision@k and mAP by label for queries ``q`` (indices into ``x``), the query itself left out."""
    _, nn_idx = exact_neighbours(x, x[q], min(k + 1, len(x)))
    prec = []
    for row, qi in zip(nn_idx, q, strict=True):
        row = row[row != qi][:k] if (row == qi).any() else row[:k]
        prec.append(np.mean(labels[row] == labels[qi]))
    if not with_map:
        return float(np.mean(prec)), None
    xf = x.astype(np.float32)
    sq = (xf**2).sum(1)
    aps = []
    for start in range(0, len(q), 256):
        qb = q[start : start + 256]
        d = sq[qb, None] - 2 * xf[qb] @ xf.T + sq[None, :]
        d[np.arange(len(qb)), qb] = np.inf
        order = np.argsort(d, axis=1)[:, :-1]
        rel = labels[order] == labels[qb, None]
        hits = np.cumsum(rel, axis=1)
        ranks = np.arange(1, rel.shape[1] + 1)
        denom = np.maximum(rel.sum(1), 1)
        aps.extend(((hits / ranks) * rel).sum(1) / denom)
    return float(np.mean(prec)), float(np.mean(aps))


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact, strict=True)]))


# Queries of the untimed warm-up search. One query did not warm up what a batch uses: FAISS searches a
# batch on its OpenMP threads (and, from 20 queries, with BLAS), a single query on the calling thread, so the
# first batch searched in a process paid the thread pool's start-up (the exact baseline, searched first, was
# 1.25x to 337x slower than an exact index timing the same search).
WARMUP_QUERIES = 64


def timed_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Search all queries in one batch; returns (distances, ids, queries per second).

    An untimed search of up to :data:`WARMUP_QUERIES` of the queries first (the whole batch when smaller),
    so that the timed search runs on the code path and threads it would use in a warm process."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index.search(queries[:WARMUP_QUERIES], k)
    t0 = time.perf_counter()
    d, i = index.search(queries, k)
    dt = time.perf_counter() - t0
    return d, i, len(queries) / max(dt, 1e-9)


# ---------------------------------------------------------------------------------------
# The application


def _encode_shard(index: int, *, app: Index, ctx: ImageContext, fitted: Fitted) -> int:
    """The codes of one shard of images, on a Dask worker, written to ``index/codes/part.NNNNN.npy``;
    returns how many."""
    ctx, fitted = on_worker(app, ctx, fitted)
    imset = ctx.target if ctx.target is not None else ctx.train
    x = np.stack(shard_images(imset, index))
    want = fitted.model.config.in_channels
    if x.shape[1] != want:
        raise ModelMismatchError(
            f"the model of {fitted.source_run or ctx.run.uri} takes {want}-channel images but --mode "
            f"{ctx.config.load.mode} gives {x.shape[1]} channels"
        )
    codes = encode_images(fitted.model, x, ctx.device)
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    ctx.run.write_bytes(code_part(index), buf.getvalue())
    return len(codes)


@register
class Index(ImageApp):
    name = "index"
    Config = Config
    RunConfig = IndexRunConfig
    headlines = (("precision_at_*", True), ("recall_at_*", True))  # named after app.k
    fit_only = FIT_ONLY + ("app.latent_noise",)  # the ANN index is built in every run, the autoencoder reused
    cli_options = tuple(o for o in ImageApp.cli_options if o[0] != "--mode") + (
        ("--mode", "load.mode", str, f"gray, rgb or keep (default: {DEFAULT_MODE} when training; with --model, the "
         "mode that model learnt on)."),
        ("--image-size", "load.size", int, f"Images are resized to this square size before encoding (default: "
         f"{DEFAULT_IMAGE_SIZE} when training; with --model, the size that model learnt on)."),
        ("--index-type", "app.index", str,
         "auto (exact up to --ann-threshold, HNSW above, IVF-PQ above app.pq_threshold), exact, hnsw, ivf or ivfpq."),
        ("--ann-threshold", "app.ann_threshold", int, "Collections larger than this get an ANN index (auto)."),
        ("--latent-channels", "model.latent_channels", int,
         "Channels of the code (code size = channels x (size/2)^2 with the default one downsampling level)."),
    )

    def adopt(self, config: Any, fitted: Fitted | None) -> Any:
        """An unset --image-size or --mode: the one a reused model learnt on (its codes are meant for
        such images), else DEFAULT_IMAGE_SIZE / DEFAULT_MODE."""
        state = fitted.state if fitted is not None else {}
        update = {}
        if config.load.size is None:
            update["size"] = int(state.get("image_size") or DEFAULT_IMAGE_SIZE)
        if config.load.mode is None:
            mode = state.get("mode") or DEFAULT_MODE
            if mode == "keep" and state.get("in_channels") in (1, 3):
                # it learnt on images of one mode (keep refuses a mix): that one, so other images are converted to it
                mode = "gray" if state["in_channels"] == 1 else "rgb"
            update["mode"] = mode
        return config.model_copy(update={"load": config.load.model_copy(update=update)}) if update else config

    def check_fitted(self, config: Any, fitted: Fitted) -> None:
        """A --mode that gives other channels than the reused model takes: refused before any image is decoded
        (it was refused by the first shard encoded, after every image had been read)."""
        want, mode = fitted.model.config.in_channels, config.load.mode
        if mode in ("gray", "rgb") and (1 if mode == "gray" else 3) != want:
            raise ModelMismatchError(
                f"the model of {fitted.source_run} takes {want}-channel images but --mode {mode} gives "
                f"{1 if mode == 'gray' else 3} channels: leave --mode unset to use the mode it learnt on"
            )

    def min_side(self, config, role: str, fitted: Fitted | None = None) -> int:
        if config.load.size is None:
            raise ConfigError("index needs one image size for every image: set --image-size (load.size)")
        return self.factor(config, fitted)

    @staticmethod
    def _collection(ctx: ImageContext) -> Any:
        imset = ctx.target if ctx.target is not None else ctx.train
        assert imset is not None
        return imset

    def training_images(self, ctx: ImageContext) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) images for fit, uint8 ``(N, C, H, W)``: every image while they take at most
        half of ``train.memory_mb``, else a seeded sample of them that does (said in the run's notes;
        ``train.stream=off`` takes them all). Only the shards holding them are read."""
        cfg = ctx.config.train
        if cfg.stream == "on":
            ctx.notes.append("train.stream=on read as auto: index's fit needs its images at hand, so it does not "
                             "stream (images beyond train.memory_mb are sampled; train.stream=off takes them all)")
        tr, va = ctx.split()
        c, h, w = image_shape(ctx.train)
        cap = max(2, int(cfg.memory_mb * 2**20 / 2 / (c * h * w)))
        n = len(tr) + len(va)
        if cfg.stream != "off" and n > cap:
            rng = np.random.default_rng(cfg.seed)
            n_va = min(len(va), max(1, round(cap * len(va) / n))) if len(va) else 0
            tr = np.sort(rng.choice(tr, cap - n_va, replace=False))
            va = np.sort(rng.choice(va, n_va, replace=False))
            ctx.notes.append(f"index trained on a seeded sample of {len(tr) + len(va):,} of the {n:,} training images "
                             f"(train.memory_mb={cfg.memory_mb}; train.stream=off for all)")
        x = stack_images(ctx.train, np.concatenate([tr, va]))
        return x[: len(tr)], x[len(tr):]

    def fit(self, ctx: ImageContext) -> Fitted:
        x_tr, x_va = self.training_images(ctx)
        with seeded(ctx.config.train.seed):  # initial weights from the seed: the same in every process
            model = ctx.config.model.build(in_channels=x_tr.shape[1])  # type: ignore[attr-defined]
        result = train_model(model, x_tr, x_va, ctx.config.train, run=ctx.run,
                             loss_fn=index_loss(ctx.config.app), label="index autoencoder")  # type: ignore[arg-type]
        model.to(ctx.device).eval()
        state = {"image_size": ctx.config.load.size, "mode": ctx.config.load.mode, "in_channels": int(x_tr.shape[1])}
        return Fitted(model=model, state=state, train=result)

    def _codes(self, ctx: ImageContext, fitted: Fitted) -> Codes:
        """Every image's code, one Dask task per shard (the model shipped once per worker), each written to
        the run as a part; this process reads them back one part at a time."""
        imset = self._collection(ctx)
        ctx.run.makedirs(CODES_DIR)
        progress = ApplyProgress("index encoding", len(imset.shards), len(imset), items="shards", unit="images")
        counts = self.map_shards(ctx, fitted, _encode_shard, list(range(len(imset.shards))), on_done=progress.done)
        if sum(counts) != len(imset):
            raise RuntimeError(f"index: {sum(counts)} codes written for {len(imset)} images")
        first = next(i for i, c in enumerate(counts) if c)
        dim = int(Codes.stored(ctx.run, tuple(counts), 0).part(first).shape[1])
        return Codes.stored(ctx.run, tuple(counts), dim)

    def apply(self, ctx: ImageContext, fitted: Fitted) -> dict[str, str]:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        imset = self._collection(ctx)
        trained_at = fitted.state.get("image_size")
        if ctx.train is None and trained_at and trained_at != ctx.config.load.size:
            # a reused model: its codes are meant for images of the size it learnt on
            ctx.notes.append(f"images resized to {ctx.config.load.size}x{ctx.config.load.size}, but the model was trained "
                             f"on {trained_at}x{trained_at}: leave --image-size unset (or pass {trained_at}) to encode them "
                             "as it learnt")
        codes = self._codes(ctx, fitted)  # on the Dask workers; the index is built here, one part at a time
        index, kind = build_index(codes, cfg.index, cfg, ctx.config.train.seed)
        run = ctx.run
        write_index(run, f"{INDEX_DIR}/index.faiss", index)
        pbuf = io.BytesIO()
        ids_frame(imset).to_parquet(pbuf, index=False)
        run.write_bytes(f"{INDEX_DIR}/ids.parquet", pbuf.getvalue())
        load = ctx.config.load
        meta = {
            "kind": kind,
            "n": len(codes),
            "dim": codes.dim,
            "metric": "l2",
            "params": {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction,
                       "ef_search": search_param(index, kind) if kind == "hnsw" else cfg.ef_search,
                       "nprobe": search_param(index, kind) if kind in ("ivf", "ivfpq") else cfg.ivf_nprobe,
                       **({"pq_bytes": int(index.pq.code_size)} if kind == "ivfpq" else {})},
            "codes": {"parts": list(codes.counts)},
            "image": {"mode": load.mode, "size": load.size, "fit": load.fit},
            "model_run": fitted.source_run or run.uri,
            "model_weights": fitted.weights_hash,
        }
        run.write_json(f"{INDEX_DIR}/meta.json", meta)
        ctx.cache["codes"], ctx.cache["index"] = codes, index
        return {"index": f"{INDEX_DIR}/index.faiss", "ids": f"{INDEX_DIR}/ids.parquet", "codes": CODES_DIR}

    def evaluate(self, ctx: ImageContext, fitted: Fitted) -> Evaluation:

        cfg: Config = ctx.config.app  # type: ignore[assignment]
        ev = Evaluation()
        imset = self._collection(ctx)
        codes = ctx.cache.get("codes")
        index = ctx.cache.get("index")
        if codes is None:
            codes = self._codes(ctx, fitted)
            index, _ = build_index(codes, cfg.index, cfg)
        codes = Codes.of(codes)
        n = len(codes)
        rng = np.random.default_rng(ctx.config.train.seed)
        q = np.sort(rng.choice(n, min(n, cfg.eval_queries), replace=False))
        # The metrics are named after app.k whatever the collection's size, so that runs compare and the
        # headlines find them; a collection of at most k images is searched for all of its other images.
        k = min(cfg.k, n - 1) if n > 1 else 1
        if n == 1:  # it said "each query has 1 other to find" (and precision, which is not measured, at k=1)
            ev.notes.append(f"recall_at_{cfg.k} is measured at k=1: the collection has 1 image, so the query is that "
                            f"image and finds only itself (app.k={cfg.k})")
        elif k < cfg.k:
            also = f" and precision_at_{cfg.k}" if imset.has_labels else ""
            ev.notes.append(f"recall_at_{cfg.k}{also} {'are' if also else 'is'} measured at k={k}: the collection has "
                            f"{n} images, so each query has {k} other{'s' if k != 1 else ''} to find (app.k={cfg.k})")
        queries = codes.rows(q)
        exact_i, exact_qps = timed_exact_search(codes, queries, k)
        _, ann_i, qps = timed_search(index, queries, k)
        recall = ev.metrics[f"recall_at_{cfg.k}"] = recall_at_k(ann_i, exact_i, k)
        kind = {"HNSW": "hnsw", "IVF-PQ": "ivfpq"}.get(index_kind(index))
        if kind and 0 < recall < cfg.target_recall:
            import faiss

            setting, value = ("ef_search" if kind == "hnsw" else "nprobe"), search_param(index, kind)
            bound = cfg.max_ef_search if kind == "hnsw" else int(faiss.extract_index_ivf(index).nlist)
            why = (f"the build's calibration stopped at its bound, {setting}={value}"
                   + (" (every cell): more app.pq_bytes, or HNSW while the codes fit in memory" if kind == "ivfpq"
                      else " (app.max_ef_search)") if value >= bound
                   else f"the build's calibration sample reached it at {setting}={value}")
            ev.notes.append(f"recall@{k} {recall:.3f} is below app.target_recall={cfg.target_recall}: {why}")
        ev.metrics["qps"] = qps
        ev.metrics["code_dim"] = codes.dim
        ev.metrics["n_images"] = n
        ev.baselines["exact"] = {"qps": exact_qps}
        if imset.has_labels and n > k:
            # The collection precision is measured in: all of it, or a seeded sample of app.eval_max images
            # (raw pixels and PCA need the images themselves: only the sample's are read).
            sample = None
            if n > cfg.eval_max:
                sample = np.sort(rng.choice(n, cfg.eval_max, replace=False))
                q = np.sort(rng.choice(cfg.eval_max, min(cfg.eval_max, cfg.eval_queries), replace=False))
            ev.metrics.update(precision_metrics(codes.rows(np.arange(n) if sample is None else sample),
                                                stack_images(imset, sample),
                                                np.array(imset.labels) if sample is None else np.array(imset.labels)[sample],
                                                q, k, cfg, ev, ctx.config.train.seed, named=cfg.k))
            m = len(codes) if sample is None else len(sample)
            if sample is not None:
                ev.notes.append(f"precision@{k} and mAP (AE codes, raw pixels, PCA) within a seeded sample of {m:,} of "
                                f"the {n:,} images (app.eval_max={cfg.eval_max}); recall@{k} and QPS over the whole index")
            if m > cfg.map_max:
                ev.notes.append(f"mAP skipped: {m} images exceed map_max={cfg.map_max}")
            ev.notes.append(f"precision@{k} and mAP by label over {len(q)} queries from the collection (the query left out)")
        else:
            ev.notes.append("no class folders: precision by label skipped")
        ev.notes.append(f"recall@{k} of the {index_kind(index)} index against exact search; QPS on one batch of {min(n, cfg.eval_queries)} queries"
                        + (" (the index is exact search itself here, so its QPS and the baseline's time the same "
                           "search: a difference between them is timing noise)" if index_kind(index) == "exact" else ""))
        return ev

    def report(self, ctx: ImageContext, fitted: Fitted, evaluation: Evaluation) -> dict[str, str]:
        cfg: Config = ctx.config.app  # type: ignore[assignment]
        out = super().report(ctx, fitted, evaluation)
        codes, index = ctx.cache.get("codes"), ctx.cache.get("index")
        imset = self._collection(ctx)
        if cfg.contact_queries and codes is not None and len(codes) > 1:
            # One query per class when there are classes, else evenly spaced images.
            if imset.has_labels:
                first = {}
                for i, lbl in enumerate(imset.labels):
                    first.setdefault(lbl, i)
                q = np.array(list(first.values())[: cfg.contact_queries])
            else:
                q = np.linspace(0, len(codes) - 1, min(cfg.contact_queries, len(codes))).astype(int)
            k = min(cfg.k, len(codes))
            dist, nn_i = index.search(Codes.of(codes).rows(q), k)
            shown = sorted({int(i) for i in q} | {int(j) for j in nn_i.ravel() if j >= 0})
            x = dict(zip(shown, images_of(imset, shown), strict=True))  # only the images shown are read
            png = contact_sheet([x[i] for i in q], [[x[j] for j in row if j >= 0] for row in nn_i], dist,
                                [imset.rel[i] for i in q], [[imset.rel[j] for j in row if j >= 0] for row in nn_i])
            ctx.run.write_bytes("report/contact_sheet.png", png)
            out["contact_sheet"] = "report/contact_sheet.png"
        return out


def precision_metrics(codes: np.ndarray, images: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int, cfg: Config,
                      ev: Evaluation, seed: int, named: int | None = None) -> dict[str, float | None]:
    """precision@k and mAP by label of the AE ``codes`` (returned) and, into ``ev.baselines``, of the raw
    pixels of ``images`` and of PCA codes of the same size, for queries ``q`` within this collection; the
    precision is named ``precision_at_{named}`` (default: ``k``; the run names it after app.k when a small
    collection measures it at a smaller k)."""
    from sklearn.decomposition import PCA

    n = len(codes)
    with_map = n <= cfg.map_max
    p_name = f"precision_at_{named or k}"
    prec, mean_ap = precision_and_map(codes, labels, q, k, with_map)
    raw = images.reshape(n, -1).astype(np.float32) / 255.0
    r_prec, r_map = precision_and_map(raw, labels, q, k, with_map)
    ev.baselines["raw_pixels"] = {p_name: r_prec, "map": r_map}
    n_comp = min(codes.shape[1], n - 1, raw.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed).fit(raw)
    p_prec, p_map = precision_and_map(pca.transform(raw).astype(np.float32), labels, q, k, with_map)
    ev.baselines[f"pca_{n_comp}"] = {p_name: p_prec, "map": p_map}
    if n_comp >= min(n - 1, raw.shape[1]):
        # Every component kept: PCA is a rotation of the (centred) pixels, so its L2 ranking is the raw pixels'.
        ev.notes.append(f"pca_{n_comp} keeps every dimension the {n} images' {raw.shape[1]} pixels span (the AE code has "
                        f"{codes.shape[1]} values): a rotation of the raw pixels, so it ranks as raw_pixels does")
    return {p_name: prec, "map": mean_ap}


def index_kind(index: Any) -> str:
    name = type(index).__name__
    return {"IndexFlatL2": "exact", "IndexHNSWFlat": "HNSW", "IndexIVFFlat": "IVF", "IndexIVFPQ": "IVF-PQ"}.get(name, name)


def contact_sheet(queries: list[np.ndarray], results: list[list[np.ndarray]], distances: np.ndarray,
                  query_names: list[str], result_names: list[list[str]]) -> bytes:
    """A PNG: one row per query, the query then its results with distances."""
    from tasks.report import pyplot

    plt = pyplot()

    rows, cols = len(queries), 1 + max((len(r) for r in results), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = queries[i] if j == 0 else (results[i][j - 1] if j - 1 < len(results[i]) else None)
            if img is None:
                ax.axis("off")
                continue
            a = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            ax.imshow(a, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if j == 0:
                ax.set_title("query", fontsize=7, color="tab:blue")
                ax.set_xlabel(query_names[i][-18:], fontsize=5)
            else:
                ax.set_title(f"{distances[i][j - 1]:.3g}", fontsize=6)
                ax.set_xlabel(result_names[i][j - 1][-18:], fontsize=5)
    fig.suptitle("each row: a query, then its nearest images in the index, nearest first "
                 "(a query in the index finds itself at 0); above each: squared L2 distance between codes", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
