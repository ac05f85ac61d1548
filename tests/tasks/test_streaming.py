"""Streaming training from Parquet partitions: same model as in memory, seeded, bounded, resumable, S3."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load, save

from models.dense import DenseAEConfig, DenseAutoencoder
from models.training import TensorSource, TrainSettings, TrainState, fit
from tasks.config import TrainConfig
from tasks.errors import ConfigError, InputError
from tasks.streaming import ParquetStream, training_streams, use_streaming
from tasks.train import train_model

pytestmark = [pytest.mark.tasks]

COLS = ["a", "b", "c", "d"]
SPLIT = "is_val"


def _frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 2))
    x = z @ rng.normal(size=(2, 4)) * 3 + 10 + 0.1 * rng.normal(size=(rows, 4))
    df = pd.DataFrame(x, columns=COLS)
    df["c"] = df["c"].round().astype("int64")  # an integer column arrives as float32 too
    df[SPLIT] = rng.random(rows) < 0.25
    df["label"] = rng.integers(0, 3, rows)  # not a feature
    return df


@pytest.fixture
def parts(tmp_path):
    """Two partitions of 100 rows, written in row groups of 16 (several reads per part)."""
    frames = [_frame(100, 0), _frame(100, 1)]
    uris = []
    for i, df in enumerate(frames):
        path = tmp_path / f"part.{i:05d}.parquet"
        df.to_parquet(path, index=False, row_group_size=16)
        uris.append(str(path))
    full = pd.concat(frames, ignore_index=True)
    x = full[COLS].to_numpy("float32")
    offset, scale = x.mean(0).astype("float32"), x.std(0).astype("float32")
    return uris, full, offset, scale


def _expected(full, offset, scale, validation: bool) -> np.ndarray:
    side = full[full[SPLIT] == validation]
    return ((side[COLS].to_numpy(dtype="float32") - offset) / scale).astype("float32")


def _stream(uris, offset, scale, side="train", **kw) -> ParquetStream:
    return ParquetStream(uris, COLS, split_column=SPLIT, side=side, offset=offset, scale=scale, **kw)


def test_stream_reads_the_scaled_rows_of_one_side(parts):
    uris, full, offset, scale = parts
    for side, validation in (("train", False), ("validation", True)):
        s = _stream(uris, offset, scale, side=side)
        got = torch.cat(list(s.eval_batches(7))).numpy()
        want = _expected(full, offset, scale, validation)
        assert len(s) == len(want) and np.array_equal(got, want)
    nan_frame = _frame(10, 2)
    nan_frame.loc[3, "a"] = np.nan  # impute's tables hold NaN: it passes through
    nan_path = str(parts[0][0]).replace("part.00000", "nan")
    nan_frame.to_parquet(nan_path, index=False)
    got = torch.cat(list(ParquetStream([nan_path], COLS, side="all").eval_batches(4))).numpy()
    assert np.isnan(got[3, 0]) and np.isfinite(np.delete(got, 3, axis=0)).all()


def test_streaming_and_in_memory_training_give_the_same_model(parts):
    """Same batch order (the stored one): identical weights and losses."""
    uris, full, offset, scale = parts
    train_x, val_x = _expected(full, offset, scale, False), _expected(full, offset, scale, True)
    settings = TrainSettings(epochs=3, batch_size=16, patience=100, seed=2, device="cpu")
    torch.manual_seed(0)
    init = DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,))).state_dict()

    def model():
        m = DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,)))
        m.load_state_dict(init)
        return m

    mem, streamed = model(), model()
    r_mem = fit(mem, TensorSource(train_x, shuffle=False), val_x, settings)
    r_str = fit(streamed, _stream(uris, offset, scale, shuffle=False),
                _stream(uris, offset, scale, side="validation", shuffle=False), settings)
    assert [h.val_loss for h in r_mem.history] == [h.val_loss for h in r_str.history]
    for k, v in mem.state_dict().items():
        assert torch.equal(v, streamed.state_dict()[k]), k


def test_shuffled_epochs_are_seeded_cover_the_rows_and_stay_in_the_memory_bound(parts):
    uris, full, offset, scale = parts
    want = _expected(full, offset, scale, False)
    # ~100 rows of 4 float32 columns: a fraction of the training rows
    s = _stream(uris, offset, scale, memory_mb=100 * 16 / 2**20)

    def epoch(e: int, seed: int = 3) -> np.ndarray:
        return torch.stack(list(s.train_batches(epoch=e, batch_size=8, seed=seed))).numpy()

    first = epoch(1)
    stats = dict(s.stats)
    assert first.shape == (len(want) // 8, 8, 4)
    assert np.array_equal(first, epoch(1)), "same seed and epoch: same batches"
    assert not np.array_equal(first, epoch(2)) and not np.array_equal(first, epoch(1, seed=4))
    rows = first.reshape(-1, 4)
    assert len({r.tobytes() for r in rows}) == len(rows), "no row twice in an epoch"
    assert {r.tobytes() for r in rows} <= {r.tobytes() for r in want}
    assert not np.array_equal(rows, want[: len(rows)]), "shuffled"
    assert 0 < stats["max_buffered"] <= stats["buffer_capacity"] < stats["budget_rows"] < len(want)


def test_memory_bound_too_small_and_missing_columns_are_clear_errors(parts, tmp_path):
    uris, _, offset, scale = parts
    with pytest.raises(ConfigError, match=r"memory_mb=.* too few for batches of 64"):
        _stream(uris, offset, scale, memory_mb=100 * 16 / 2**20).train_batches(epoch=1, batch_size=64, seed=0)
    with pytest.raises(InputError, match=r"part\.0000[01]\.parquet.*no column 'e'"):
        len(ParquetStream(uris, COLS + ["e"], side="all"))
    with pytest.raises(ConfigError, match="one value per column"):
        ParquetStream(uris, COLS, side="all", offset=np.zeros(3), scale=np.ones(3))


def test_resume_mid_stream_matches_an_uninterrupted_run(parts):
    uris, _, offset, scale = parts
    settings = TrainSettings(epochs=3, batch_size=8, patience=100, seed=4, device="cpu")

    def run(resume=None, on_checkpoint=None, every=0.0):
        torch.manual_seed(0)
        m = DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,), dropout=0.1))
        fit(m, _stream(uris, offset, scale, memory_mb=200 * 16 / 2**20),
            _stream(uris, offset, scale, side="validation"), dataclasses.replace(settings, checkpoint_seconds=every),
            resume=resume, on_checkpoint=on_checkpoint)
        return m

    ref = run()
    saved = []

    class Interrupted(Exception):
        pass

    def checkpoint(state: TrainState) -> None:
        saved.append((load(save(state.to_flat()[0])), state.to_flat()[1]))
        if (state.epoch, state.step) == (1, 5):
            raise Interrupted

    with pytest.raises(Interrupted):
        run(on_checkpoint=checkpoint, every=1e-9)
    state = TrainState.from_flat(*saved[-1])
    assert (state.epoch, state.step) == (1, 5)
    resumed = run(resume=state)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_stream_reads_s3_partitions(parts, s3fs_client):
    from tests.conftest import TEST_BUCKET

    uris, full, offset, scale = parts
    s3_uris = []
    for i, uri in enumerate(uris):
        key = f"{TEST_BUCKET}/streaming/part.{i:05d}.parquet"
        s3fs_client.put(uri, key)
        s3_uris.append(f"s3://{key}")
    local = _stream(uris, offset, scale, memory_mb=0.01)
    remote = _stream(s3_uris, offset, scale, memory_mb=0.01)
    assert len(remote) == len(local)
    a = torch.stack(list(local.train_batches(epoch=1, batch_size=8, seed=0)))
    b = torch.stack(list(remote.train_batches(epoch=1, batch_size=8, seed=0)))
    assert torch.equal(a, b)


def test_train_model_takes_streams_and_auto_streams_beyond_the_bound(parts):
    uris, _, offset, scale = parts
    cfg = TrainConfig(epochs=2, batch_size=16, patience=5, device="cpu", memory_mb=1)
    train, val = training_streams(uris, COLS, split_column=SPLIT, offset=offset, scale=scale, cfg=cfg)
    result = train_model(DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,))), train, val, cfg, run=None,
                         show_progress=False)
    assert len(result.history) == 2 and result.history[0].samples == len(train) // 16 * 16
    assert np.isfinite(result.best_val_loss)
    rows_in_half_mb = 2**19 // (4 * 4)
    assert use_streaming(cfg, rows_in_half_mb + 1, 4) and not use_streaming(cfg, rows_in_half_mb, 4)
    assert use_streaming(cfg.model_copy(update={"stream": "on"}), 10, 4)
    assert not use_streaming(cfg.model_copy(update={"stream": "off"}), 10**9, 4)
