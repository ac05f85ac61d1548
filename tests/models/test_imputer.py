"""The impute model: an ensemble of refining masked autoencoders (pure torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from models import build_model
from models.dense import DenseAEConfig, ImputerConfig, MaskedImputer, imputer_loss
from models.training import TrainSettings, fit, predict

pytestmark = pytest.mark.models


def _model(members=3, passes=2, d=6):
    torch.manual_seed(0)
    return MaskedImputer(ImputerConfig(DenseAEConfig(d, 3, hidden=(16,)), members=members, passes=passes))


def test_shapes_nan_input_and_mean_of_members():
    m = _model().eval()
    x = torch.randn(5, 6)
    x[0, 2] = float("nan")
    out = m(x)
    assert out.x_hat.shape == (5, 6) and out.z.shape == (5, 3)
    assert torch.isfinite(out.x_hat).all(), "NaN cells are inputs, never outputs"
    assert torch.allclose(out.x_hat, torch.stack([mm(x).x_hat for mm in m.members]).mean(0))


def test_each_pass_feeds_the_next():
    one, two = _model(passes=1), _model(passes=2)
    two.load_state_dict(one.state_dict())
    x = torch.randn(4, 6)
    x[:, 1] = float("nan")
    assert not torch.allclose(one(x).x_hat, two(x).x_hat), "a second pass sees the first pass's imputations"
    full = torch.randn(4, 6)
    assert torch.allclose(one(full).x_hat, two(full).x_hat), "nothing to refine when nothing is missing"


def test_loss_trains_every_member_and_round_trips():
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    g = torch.Generator().manual_seed(0)
    imputer_loss(m, torch.randn(32, 6), g).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    blob = save({k: v.contiguous() for k, v in m.state_dict().items()})
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(load(blob))
    x = torch.randn(3, 6)
    x[1, 4] = float("nan")
    assert torch.equal(again.eval()(x).x_hat, m.eval()(x).x_hat)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True)), "backward only, no step"


def test_learns_a_linear_relation_between_columns():
    """Two columns that are copies of each other: a hidden cell is recovered from its twin."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(512, 3))
    data = np.column_stack([base, base[:, 0]]).astype("float32")
    m = MaskedImputer(ImputerConfig(DenseAEConfig(4, 2, hidden=(16,)), members=2))
    fit(m, data[:448], data[448:], TrainSettings(epochs=60, batch_size=64, lr=3e-3, patience=60),
        loss_fn=imputer_loss)
    test = data[448:].copy()
    test[:, 3] = np.nan
    m.eval()
    x_hat = predict(lambda b: m(b).x_hat, test)
    rmse = float(np.sqrt(np.mean((x_hat[:, 3] - data[448:, 0]) ** 2)))
    assert rmse < 0.25, f"column 3 is column 0: RMSE {rmse:.3f} (std 1)"


def test_head_is_the_identity_until_fitted_then_learns_a_linear_column():
    """Column 3 = 2 * column 0 - column 1: a barely trained ensemble misses it, the ridge head
    recovers it; observed cells are never touched by the head."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 3))
    data = np.column_stack([base, 2 * base[:, 0] - base[:, 1]]).astype("float32")
    data[rng.random(data.shape) < 0.1] = np.nan
    m = MaskedImputer(ImputerConfig(DenseAEConfig(4, 2, hidden=(8,)), members=2))
    fit(m, data[:360], data[360:], TrainSettings(epochs=2, batch_size=64, patience=2), loss_fn=imputer_loss)
    m.eval()
    _check_head(m, data)


@torch.no_grad()
def _check_head(m, data):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(100, 3))
    test = np.column_stack([base, 2 * base[:, 0] - base[:, 1]]).astype("float32")
    hid = test.copy()
    hid[:, 3] = np.nan
    hid[:50, 2] = np.nan
    members_mean = m._ensemble(torch.from_numpy(hid)).x_hat
    assert torch.equal(m(torch.from_numpy(hid)).x_hat, members_mean), "identity before fit_head"
    before = float(np.sqrt(np.mean((members_mean[:, 3].numpy() - test[:, 3]) ** 2)))
    m.fit_head(data, alpha=1.0)
    x_hat = m(torch.from_numpy(hid)).x_hat
    after = float(np.sqrt(np.mean((x_hat[:, 3].numpy() - test[:, 3]) ** 2)))
    # (not ~0: a tenth of columns 0 and 1 is missing in the fitting rows, filled by the ensemble)
    assert after < 0.25 and before > 1.0, f"RMSE {before:.3f} -> {after:.3f} (std ~2.2)"
    assert torch.equal(x_hat[:, :2], members_mean[:, :2]), "observed cells keep the members' mean"
    assert torch.equal(x_hat[50:, 2], members_mean[50:, 2])
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(load(save({k: v.contiguous() for k, v in m.state_dict().items()})))
    assert torch.equal(again.eval()(torch.from_numpy(hid)).x_hat, x_hat), "the fitted head is saved with the weights"


def test_head_only_on_the_columns_asked_and_models_saved_without_a_head_still_load():
    m = _model(members=1)
    x = torch.randn(64, 6)
    x[:, 5] = 3 * x[:, 0]
    m.eval().fit_head(x, alpha=1.0, columns=[5])
    assert torch.equal(m.head_self[:5], torch.ones(5)) and not m.head_cross[:5].any()
    assert m.head_cross[5, 0] > 1.0
    old = {k: v for k, v in m.config.to_dict().items() if k != "head"}
    legacy = build_model(m.kind, old)
    assert not legacy.config.head
    legacy.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("head_")})
    with pytest.raises(ValueError):
        legacy.fit_head(x)
