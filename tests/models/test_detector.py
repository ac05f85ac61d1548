"""The detector model: an autoencoder plus a code-space reference (pure torch)."""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from models import build_model
from models.dense import DenseAEConfig
from models.detector import DetectorConfig, KnnAutoencoderDetector

import pytest

pytestmark = pytest.mark.models


def _identity_detector(k=2, weight=1.0) -> KnnAutoencoderDetector:
    """A 2-D autoencoder whose encoder and decoder are the identity: reconstruction error 0,
    so the score is the code-space part alone."""
    m = KnnAutoencoderDetector(DetectorConfig(DenseAEConfig(2, 2, hidden=()), k=k, knn_weight=weight))
    with torch.no_grad():
        for lin in (m.ae.encoder[0], m.ae.decoder[0]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return m


def test_score_is_the_distance_to_the_reference_leaving_out_the_nearest():
    m = _identity_detector(k=2)
    m.set_reference(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]]))
    recon, dist = m.score_parts(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    assert torch.allclose(recon, torch.zeros(2), atol=1e-10)
    # (0,0): neighbours by distance 0 (itself, left out), 1, 1 -> mean 1
    assert dist[0].item() == pytest.approx(1.0)
    # (5,5): distances sqrt(25+16)=6.40 (twice), sqrt(50)=7.07 (twice) -> leave out one 6.40, mean of 6.40 and 7.07
    assert dist[1].item() == pytest.approx((41 ** 0.5 + 50 ** 0.5) / 2, rel=1e-5)
    # far rows score higher, and the score divides by the training medians
    m.scales = torch.tensor([1.0, 2.0])
    s = m.score(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    assert s[0].item() == pytest.approx(0.5) and s[1].item() > s[0].item()


def test_weight_zero_scores_by_reconstruction_only():
    m = _identity_detector(weight=0.0)
    m.set_reference(torch.randn(10, 2))
    with torch.no_grad():
        m.ae.decoder[0].weight.mul_(2.0)  # x_hat = 2x: error = x^2 per cell
    x = torch.tensor([[1.0, 3.0]])
    assert m.score(x).item() == pytest.approx((1 + 9) / 2)


def test_reference_and_scales_travel_with_the_weights():
    m = _identity_detector()
    m.set_reference(torch.randn(7, 2))
    m.scales = torch.tensor([0.3, 0.7])
    blob = save({k: v.contiguous() for k, v in m.state_dict().items()})
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(load(blob))
    assert again.config.n_reference == 7 and again.config.latent_dim == 2
    x = torch.randn(5, 2) * 3
    assert torch.equal(again.score(x), m.score(x))
