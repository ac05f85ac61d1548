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
