"""train.threads: CPU threads for training only, restored afterwards, not part of the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dense import DenseAEConfig, DenseAutoencoder
from models.training import reconstruction_loss
from tasks.apps.reduce import ReduceRunConfig
from tasks.config import TrainConfig
from tasks.train import train_model

pytestmark = [pytest.mark.tasks]


def test_threads_apply_during_training_and_are_restored():
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen: list[int] = []

    def loss(model, batch, gen):
        seen.append(torch.get_num_threads())
        return reconstruction_loss(model, batch, gen)

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model = DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,)))
    train_model(model, x[:48], x[48:], TrainConfig(epochs=1, batch_size=16, threads=want), run=None, loss_fn=loss,
                show_progress=False)
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before
    # 0 (the default) leaves PyTorch's setting alone
    seen.clear()
    train_model(model, x[:48], x[48:], TrainConfig(epochs=1, batch_size=16), run=None, loss_fn=loss, show_progress=False)
    assert set(seen) == {before}


def test_threads_are_not_part_of_the_fingerprint():
    hashes = {"input": ["abc"]}
    plain = ReduceRunConfig()

    def with_train(**kw):
        return plain.model_copy(update={"train": plain.train.model_copy(update=kw)})

    assert plain.fingerprint(hashes) == with_train(threads=1).fingerprint(hashes)
    assert plain.fingerprint(hashes) != with_train(epochs=plain.train.epochs + 1).fingerprint(hashes)


def test_the_log_says_the_threads_and_hints_at_one_when_the_machine_is_busy(monkeypatch, caplog):
    """A walkthrough's big-table training ran 30-70x slower with PyTorch's default threads while another job
    shared the 2 cores, and nothing said why: the first training line names the threads and, on a busy machine,
    the setting that helps."""
    import logging

    from tasks import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (3.4, 2.0, 1.0))
    busy = train._threads_line(cpu, 2, None)
    assert busy.startswith("training on the CPU with 2 torch threads") and "load average 3.4 on 2 cores" in busy
    assert "--set train.threads=1" in busy
    assert "load average" not in train._threads_line(cpu, 2, 2), "threads the user chose: no hint"
    assert "load average" not in train._threads_line(cpu, 1, None)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (0.7, 0.5, 0.2))
    assert train._threads_line(cpu, 2, None) == "training on the CPU with 2 torch threads"
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    with caplog.at_level(logging.INFO, logger="aeflow.train"):
        train_model(DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,))), x[:48], x[48:],
                    TrainConfig(epochs=1, batch_size=16, threads=1), run=None, show_progress=False)
    assert "training: training on the CPU with 1 torch thread" in caplog.text


def test_long_epochs_log_their_step_rate_and_time_left(monkeypatch, caplog):
    """Within an epoch nothing was logged for minutes on a big table: now a line every STEP_LOG_EVERY_S."""
    import logging

    from models import training
    from tasks import train

    lines: list[str] = []
    clock = iter(range(0, 10_000, 10))  # each reading of the clock is 10 s later
    monkeypatch.setattr(train.time, "monotonic", lambda: float(next(clock)))
    meter = train._StepMeter("training", 3, 0, lambda fmt, *a: lines.append(fmt % a))  # t0 = 0
    meter.step(1, 100)  # 10 s: not yet
    meter.step(4, 100)  # 20 s
    meter.step(6, 100)  # 30 s: 6 steps in 30 s = 0.2 steps/s; 94 + 200 steps left
    assert lines == ["training epoch 1/3: step 6/100 (6%), 0.2 steps/s, about 24 min left at this rate"]
    meter.step(100, 100)  # 40 s: an epoch's last step is not logged (the epoch line follows)
    meter.epoch_done(1)
    meter.step(50, 100)  # 50 s: 20 s since the last line
    assert len(lines) == 1
    meter.step(60, 100)  # 60 s: 160 steps in 60 s; 40 + 100 steps left
    assert lines[-1] == "training epoch 2/3: step 60/100 (60%), 2.67 steps/s, about 52 s left at this rate"
    # Through train_model: the lines reach the log (the loop's own throttle and ours set to nothing).
    monkeypatch.undo()
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(train, "STEP_LOG_EVERY_S", 0.0)
    x = np.random.default_rng(0).normal(size=(96, 4)).astype("float32")
    with caplog.at_level(logging.INFO, logger="aeflow.train"):
        train_model(DenseAutoencoder(DenseAEConfig(4, 2, hidden=(8,))), x[:80], x[80:],
                    TrainConfig(epochs=2, batch_size=16, threads=1), run=None, show_progress=False)
    assert "training epoch 1/2: step 1/5 (20%)" in caplog.text and "training epoch 2/2: step 4/5 (80%)" in caplog.text
