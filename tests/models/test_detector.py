"""The detector model: an autoencoder plus a code-space reference (pure torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from models import build_model
from models.dense import DenseAEConfig
from models.detector import DetectorConfig, KnnAutoencoderDetector

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


def _identity_detector_with_input(weight=1.0, scaling="robust") -> KnnAutoencoderDetector:
    """Identity autoencoder (reconstruction error 0) with an input-space part; code part weighs 0."""
    m = KnnAutoencoderDetector(DetectorConfig(DenseAEConfig(2, 2, hidden=()), k=2, knn_weight=0.0,
                                              input_weight=weight, scaling=scaling))
    with torch.no_grad():
        for lin in (m.ae.encoder[0], m.ae.decoder[0]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return m


def test_input_space_part_and_robust_scaling():
    m = _identity_detector_with_input(weight=2.0)
    ref = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    with pytest.raises(ValueError):
        m.set_reference(ref)  # the input-space reference rows are required
    m.set_reference(ref * 3, ref)  # codes and rows differ: the input part must use the rows
    recon, code_dist, input_dist = m.score_parts(torch.tensor([[0.0, 0.0]]))
    assert input_dist.item() == pytest.approx(1.0) and code_dist.item() == pytest.approx(3.0)
    # robust: (part - median) / IQR per part, from the training rows' parts
    parts = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0], [0.0, 0.0, 5.0]])
    m.set_scales(parts)
    assert torch.allclose(m.centers, torch.tensor([0.0, 0.0, 3.0])) and m.scales[2].item() == pytest.approx(2.0)
    assert m.scales[0].item() == pytest.approx(1.0)  # no spread, median 0: scale 1
    assert m.score(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.0 * (1.0 - 3.0) / 2.0)


def test_input_reference_and_centres_travel_with_the_weights():
    m = _identity_detector_with_input()
    m.set_reference(torch.randn(9, 2), torch.randn(9, 2))
    m.set_scales(torch.rand(20, 3))
    blob = save({k: v.contiguous() for k, v in m.state_dict().items()})
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(load(blob))
    assert again.config.n_reference == 9 and again.config.scaling == "robust" and again.config.input_weight == 1.0
    x = torch.randn(5, 2) * 3
    assert torch.equal(again.score(x), m.score(x))


def test_a_config_saved_before_the_input_part_loads_as_the_two_part_detector():
    old = {"ae": DenseAEConfig(2, 2, hidden=()).to_dict(), "n_reference": 3, "k": 2, "knn_weight": 1.0}
    m = build_model("dense_detector", old)
    assert m.config.input_weight == 0.0 and m.config.scaling == "median" and m.config.n_parts == 2
    assert set(m.state_dict()) - {k for k in m.state_dict() if k.startswith("ae.")} == {"reference", "scales"}


def _identity_detector_full(**kw) -> KnnAutoencoderDetector:
    m = KnnAutoencoderDetector(DetectorConfig(DenseAEConfig(2, 2, hidden=()), k=2, scaling="robust", **kw))
    with torch.no_grad():
        for lin in (m.ae.encoder[0], m.ae.decoder[0]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return m


def test_fractional_input_distance_centre_part_and_a_larger_input_reference():
    m = _identity_detector_full(knn_weight=1.0, input_weight=1.0, input_p=0.5, center_weight=1.0)
    assert m.config.part_names == ("recon", "code", "input", "center")
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.0, 4.0]])
    with pytest.raises(ValueError):
        m.set_reference(codes)  # rows are required for the input and centre parts
    m.set_reference(codes, rows)
    assert m.config.n_reference == 3 and m.config.n_input_reference == 5
    q = torch.tensor([[1.0, 1.0]])
    recon, code_d, input_d, centre = m.score_parts(q)
    # Minkowski p = 0.5 from (1,1): to (1,0) and (0,1) (|0|^.5 + |1|^.5)^2 = 1; to (0,0) (1 + 1)^2 = 4;
    # nearest left out: mean of 1 and 4 (k = 2)
    assert input_d.item() == pytest.approx(2.5)
    # the Euclidean code part: distances 1, 1, sqrt(2) to the 3 codes; nearest out -> mean of 1 and sqrt(2)
    assert code_d.item() == pytest.approx((1 + 2 ** 0.5) / 2)
    mean, sd = rows.mean(0), rows.std(0, unbiased=False)
    assert centre.item() == pytest.approx((((q - mean) / sd) ** 2).mean().item(), rel=1e-6)
    # a row far from every reference row scores higher than one among them
    m.set_scales(torch.stack(m.score_parts(rows), dim=1))
    assert m.score(torch.tensor([[9.0, 9.0]])).item() > m.score(torch.tensor([[0.5, 0.5]])).item()


def test_recon_weight_zero_ignores_the_decoder():
    m = _identity_detector_full(knn_weight=1.0, input_weight=1.0, recon_weight=0.0)
    m.set_reference(torch.randn(8, 2), torch.randn(12, 2))
    m.set_scales(torch.rand(30, 3))
    x = torch.randn(6, 2)
    before = m.score(x)
    with torch.no_grad():
        m.ae.decoder[0].weight.mul_(5.0)  # a much worse reconstruction
    assert torch.equal(m.score(x), before)


def test_new_parts_travel_with_the_weights_and_old_configs_stay_as_they_were():
    m = _identity_detector_full(input_weight=2.0, input_p=0.5, center_weight=3.0, recon_weight=0.0)
    m.set_reference(torch.randn(7, 2), torch.randn(11, 2) * 2 + 1)
    m.set_scales(torch.rand(20, 4))
    blob = save({k: v.contiguous() for k, v in m.state_dict().items()})
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(load(blob))
    assert again.config == m.config
    x = torch.randn(5, 2) * 3
    assert torch.equal(again.score(x), m.score(x))
    # a detector without the newer parts writes the config it always wrote
    plain = DetectorConfig(DenseAEConfig(2, 2, hidden=()), 3, k=2, input_weight=1.0, scaling="robust")
    assert set(plain.to_dict()) == {"ae", "n_reference", "k", "knn_weight", "input_weight", "scaling"}
    with pytest.raises(ValueError):
        DetectorConfig(DenseAEConfig(2, 2, hidden=()), knn_weight=0.0, recon_weight=0.0)
    with pytest.raises(ValueError):
        DetectorConfig(DenseAEConfig(2, 2, hidden=()), input_weight=1.0, input_p=0.0)


def test_fractional_distance_blocks_match_cdist(monkeypatch):
    import models.detector as det

    m = _identity_detector_full(input_weight=1.0, input_p=0.5)
    ref, q = torch.randn(50, 3), torch.randn(23, 3)
    k = m.config.k + 1
    want = torch.topk(torch.cdist(q, ref, p=0.5), k, dim=1, largest=False).values[:, 1:].mean(dim=1)
    monkeypatch.setattr(det, "_FRACTIONAL_KERNEL", False)  # the torch path (no numba, or a GPU)
    monkeypatch.setattr(det, "FRACTIONAL_BLOCK", 50 * 3 * 4)  # 4 rows per block: 6 blocks, the last one short
    assert torch.allclose(m._knn_distance(q, ref, 1024, 0.5), want, rtol=1e-5)


def test_fractional_distance_numba_kernel_matches_and_does_not_depend_on_blocks_or_threads(monkeypatch):
    import models.detector as det

    assert det.fractional_kernel() is not None, "numba is installed with the project"
    m = _identity_detector_full(input_weight=1.0, input_p=0.5)
    gen = torch.Generator().manual_seed(3)
    ref, q = torch.randn(300, 7, generator=gen), torch.randn(101, 7, generator=gen)
    k = m.config.k + 1
    want = torch.topk(torch.cdist(q, ref, p=0.5), k, dim=1, largest=False).values[:, 1:].mean(dim=1)
    one_block = m._knn_distance(q, ref, 1024, 0.5)
    assert torch.allclose(one_block, want, rtol=1e-5)
    monkeypatch.setattr(det, "FRACTIONAL_SUMS", 300 * 8)  # 8 rows per block: 13 blocks, the last one short
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(m._knn_distance(q, ref, 1024, 0.5), one_block), n
    finally:
        torch.set_num_threads(threads)
    # the plain function is what numba compiles: the same sums, uncompiled
    sums = np.empty((3, 300), np.float32)
    det.fractional_sums(q[:3].numpy(), np.ascontiguousarray(ref.numpy().T), sums)
    assert np.allclose(sums, torch.cdist(q[:3], ref, p=0.5).sqrt().numpy(), rtol=1e-5)


def _copod_reference(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """COPOD's per-row score as pyod computes it (empirical tails, skewness-chosen side), per column mean."""
    n = len(train)
    left = np.stack([(train[:, j][None, :] <= x[:, j][:, None]).mean(1) for j in range(x.shape[1])], 1)
    right = np.stack([(train[:, j][None, :] >= x[:, j][:, None]).mean(1) for j in range(x.shape[1])], 1)
    u_l, u_r = -np.log(np.maximum(left, 1 / (n + 1))), -np.log(np.maximum(right, 1 / (n + 1)))
    third = ((train - train.mean(0)) ** 3).mean(0)
    skewed = np.where(third < 0, u_l, u_r)
    return np.maximum(skewed, (u_l + u_r) / 2).mean(1)


def test_tail_part_is_copods_score_and_travels_with_the_weights():
    m = _identity_detector_full(input_weight=1.0, input_p=0.5, tail_weight=4.0)
    assert m.config.part_names == ("recon", "code", "input", "tail")
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(40, 1, generator=gen), torch.randn(40, 1, generator=gen).exp()], dim=1)  # skewed col
    m.set_reference(rows[:10].clone(), rows)
    assert m.config.n_tail_reference == 40
    x = torch.tensor([[0.0, 1.0], [3.0, 0.1], [-3.0, 9.0], [0.5, 1.5]])
    got = m.score_parts(x)[3].double().numpy()
    np.testing.assert_allclose(got, _copod_reference(rows.double().numpy(), x.double().numpy()), rtol=1e-5)
    assert got[2] > got[1] > got[0], "the farther into the tails (the skewed column's long side), the higher"
    m.set_scales(torch.rand(20, 4))
    d = m.config.to_dict()
    assert d["tail_weight"] == 4.0 and d["n_tail_reference"] == 40
    again = build_model(m.kind, d)
    again.load_state_dict(load(save({k: v.contiguous() for k, v in m.state_dict().items()})))
    assert torch.equal(again.score(x), m.score(x))


def test_tail_weight_zero_removes_the_part_and_its_buffers():
    m = _identity_detector_full(input_weight=1.0, tail_weight=4.0)
    m.set_reference(torch.randn(10, 2), torch.randn(30, 2))
    m.set_tail_weight(2.0)
    assert m.config.tail_weight == 2.0 and m.config.part_names[-1] == "tail"
    m.set_tail_weight(0.0)
    assert m.config.part_names == ("recon", "code", "input")
    assert "tail_sorted" not in m.state_dict() and "tail_weight" not in m.config.to_dict()
    m.set_scales(torch.rand(20, 3))
    again = build_model(m.kind, m.config.to_dict())
    again.load_state_dict(m.state_dict())
    x = torch.randn(4, 2)
    assert torch.equal(again.score(x), m.score(x))
    with pytest.raises(ValueError):
        m.set_tail_weight(1.0)  # no tail part any more
