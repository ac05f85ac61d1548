"""Dense autoencoder and the training loop: pure torch, no Prefect, no storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from models import build_model
from models.dense import AEOutput, DenseAEConfig, DenseAutoencoder, count_parameters
from models.training import TrainSettings, TrainState, fit, predict, select_device

pytestmark = pytest.mark.models


def _data(n=256, d=12, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    return (z @ rng.normal(size=(3, d)) + 0.05 * rng.normal(size=(n, d))).astype("float32")


@pytest.mark.parametrize("hidden,bn,dropout", [((32, 16), False, 0.0), ((8,), True, 0.1), ((), False, 0.0)])
def test_shapes(hidden, bn, dropout):
    m = DenseAutoencoder(DenseAEConfig(12, 3, hidden=hidden, batch_norm=bn, dropout=dropout))
    x = torch.randn(5, 12)
    out = m(x)
    assert isinstance(out, AEOutput)
    assert out.x_hat.shape == (5, 12)
    assert out.z.shape == (5, 3)
    assert m.encode(x).shape == (5, 3)
    assert m.decode(torch.randn(7, 3)).shape == (7, 12)


def test_seed_example_widths():
    """The seed's 3000 -> 1500 -> 200 network and back."""
    m = DenseAutoencoder(DenseAEConfig(3000, 200, hidden=(1500,)))
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(3000, 1500), (1500, 200), (200, 1500), (1500, 3000)]
    assert count_parameters(m) == 3000 * 1500 + 1500 + 1500 * 200 + 200 + 200 * 1500 + 1500 + 1500 * 3000 + 3000


@pytest.mark.parametrize(
    "kwargs,match",
    [({"latent_dim": 0}, "latent_dim"), ({"hidden": (0,)}, "hidden"), ({"activation": "nope"}, "activation"), ({"dropout": 1.0}, "dropout")],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseAEConfig(**({"in_features": 4, "latent_dim": 2} | kwargs))


def test_save_load_round_trip_without_pickle():
    cfg = DenseAEConfig(12, 3, hidden=(16,), batch_norm=True)
    m = DenseAutoencoder(cfg).eval()
    blob = save({k: v.contiguous() for k, v in m.state_dict().items()})
    m2 = build_model("dense", cfg.to_dict())
    m2.load_state_dict(load(blob))
    m2.eval()
    x = torch.randn(9, 12)
    assert torch.equal(m(x).x_hat, m2(x).x_hat)
    assert DenseAEConfig.from_dict(cfg.to_dict()) == cfg


def test_one_step_changes_weights():
    m = DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = _data(64)
    fit(m, x, x[:0], TrainSettings(epochs=1, batch_size=64, seed=0))
    changed = [k for k in before if not torch.equal(before[k], m.state_dict()[k])]
    assert changed, "no parameter changed after a training step"


def test_overfits_tiny_batch():
    x = _data(16, d=8)
    m = DenseAutoencoder(DenseAEConfig(8, 4, hidden=(32,)))
    r = fit(m, x, x, TrainSettings(epochs=400, batch_size=16, lr=3e-3, patience=400, seed=0))
    mse = float(np.mean((predict(lambda b: m(b).x_hat, x) - x) ** 2))
    assert mse < 0.01 * float(np.var(x)), mse
    assert r.history[-1].train_loss < r.history[0].train_loss


def test_early_stopping_restores_best():
    x = _data(200)
    m = DenseAutoencoder(DenseAEConfig(12, 2, hidden=(16,)))
    r = fit(m, x[:150], x[150:], TrainSettings(epochs=300, patience=3, seed=0, lr=1e-2))
    assert r.epochs_run < 300 and r.stopped_early
    best = min(h.val_loss for h in r.history)
    # Improvements smaller than min_delta (relative) do not count as a new best.
    assert best <= r.best_val_loss <= best * (1 + 2e-4)
    assert r.history[r.best_epoch - 1].val_loss == r.best_val_loss
    from models.training import evaluate_loss, reconstruction_loss

    now = evaluate_loss(m, torch.from_numpy(x[150:]), reconstruction_loss, torch.device("cpu"), 4096, 0)
    assert now == pytest.approx(r.best_val_loss, rel=1e-5)


def test_resume_after_interruption_matches_uninterrupted_run():
    """Interrupt at epoch 3, resume from the checkpoint: same weights as 6 epochs straight."""
    x = _data(300)
    settings = TrainSettings(epochs=6, batch_size=32, patience=100, seed=3)
    ref = DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,)))
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,))).state_dict().items()}
    ref.load_state_dict(init)
    fit(ref, x[:240], x[240:], settings)

    saved: list[tuple[dict, dict]] = []

    class Interrupted(Exception):
        pass

    def checkpoint(state: TrainState) -> None:
        tensors, meta = state.to_flat()
        saved.append((load(save(tensors)), meta))  # through real safetensors bytes
        if state.epoch == 3:
            raise Interrupted

    m1 = DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,)))
    m1.load_state_dict(init)
    with pytest.raises(Interrupted):
        fit(m1, x[:240], x[240:], settings, on_checkpoint=checkpoint)
    state = TrainState.from_flat(*saved[-1])
    assert state.epoch == 3

    m2 = DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,)))
    r = fit(m2, x[:240], x[240:], settings, resume=state)
    assert r.resumed_from_epoch == 3
    assert [h.epoch for h in r.history] == [1, 2, 3, 4, 5, 6]
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, m2.state_dict()[k], atol=1e-6), k


def test_predict_batches_and_empty():
    m = DenseAutoencoder(DenseAEConfig(12, 3)).eval()
    x = _data(10)
    z = predict(m.encode, x, batch_size=3)
    assert z.shape == (10, 3)
    assert np.allclose(z, m.encode(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
    assert predict(m.encode, x[:0]).shape == (0, 3)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
