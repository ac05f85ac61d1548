"""The learned codec: shapes, training step, integer tables, exact round trips, rate vs quality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import build_model
from models.aec import AecFile
from models.codec import (
    CodecConfig,
    CodecOutput,
    ImageCodec,
    codec_identity,
    load_codec_state,
)
from models.codec_train import RateDistortionLoss, make_loss_fn, widen_codec
from models.entropy_models import FactorizedPrior, quantize_pmf
from models.image_ops import rgb_patches
from models.metrics import bd_rate, ms_ssim, psnr
from tests.models.codec_helpers import tiny_image

pytestmark = [pytest.mark.models]

TINY = CodecConfig(channels=8, latent_channels=8, lambdas=(0.002, 0.01, 0.05, 0.2))


def fit_priors(model: ImageCodec, images: list[torch.Tensor], steps: int = 150) -> ImageCodec:
    """Fit only the entropy models to the latents of ``images`` (cheap: the transforms stay as built).

    The gains are spread apart first, so higher levels have finer quantisation steps:
    what training does, without the minutes of training.
    """
    with torch.no_grad():
        gains = torch.tensor([4.0, 12.0, 36.0, 108.0])[:, None].expand_as(model.log_gain)
        model.log_gain.copy_(gains.log())
        model.log_inv_gain.copy_(-gains.log())
        y = torch.cat([model.g_a(torch.nn.functional.pad(x, (0, (-x.shape[-1]) % 16, 0, (-x.shape[-2]) % 16),
                                                          mode="replicate")) for x in images])
    params = [p for prior in model.priors for p in prior.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared CPU: one thread is several times faster
    for _ in range(steps):
        loss = 0.0
        for q, prior in enumerate(model.priors):
            yq = y * gains[q, 0]
            loss = loss - torch.log2(prior.likelihood(yq + torch.empty_like(yq).uniform_(-0.5, 0.5))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    model.update_tables()
    return model


@pytest.fixture(scope="module")
def codec() -> ImageCodec:
    torch.manual_seed(0)
    return fit_priors(ImageCodec(TINY), [tiny_image(seed=s) for s in range(3)])


def test_forward_contract_shapes():
    torch.manual_seed(0)
    model = ImageCodec(TINY)
    out = model(tiny_image(37, 50).repeat(2, 1, 1, 1), torch.tensor([0, 3]))
    assert isinstance(out, CodecOutput)
    assert out.x_hat.shape == (2, 3, 37, 50), "any size: padded to the stride and cropped back"
    lik = out.likelihoods["y"]
    assert lik.shape == (2, 8, 3, 4)
    assert bool(((lik > 0) & (lik <= 1)).all())
    model.eval()
    ev = model(tiny_image(), 1)
    assert torch.equal(ev.y_hat, torch.round(ev.y_hat)), "rounding at inference"
    assert 0 <= float(ev.x_hat.detach().min()) and float(ev.x_hat.detach().max()) <= 1


def test_config_round_trip_and_registry():
    cfg = CodecConfig(channels=16, latent_channels=12, lambdas=(0.01, 0.1))
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_model("codec", cfg.to_dict()), ImageCodec)
    with pytest.raises(ValueError, match="increase"):
        CodecConfig(lambdas=(0.1, 0.01))


def test_train_step_changes_weights_and_loss_is_rate_plus_distortion():
    torch.manual_seed(0)
    model = ImageCodec(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.from_numpy(rgb_patches([(tiny_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)],
                                            4, 32, seed=0))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8
    loss = make_loss_fn(model)(model, batch, torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    torch.optim.Adam(model.parameters(), lr=1e-3).zero_grad()
    loss.backward()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("g_a") for k in changed) and any(k.startswith("priors") for k in changed)
    crit = RateDistortionLoss(TINY.lambdas)
    x = batch.float() / 255
    q = torch.tensor([0, 1, 2, 3])
    crit(model(x, q), x, q)
    assert float(crit.last["bpp"]) > 0 and float(crit.last["mse"]) > 0
    assert not crit.last["bpp"].requires_grad, "kept detached, converted only when logged"


def test_widening_keeps_the_function_and_the_new_channels_train(codec):
    """widen_codec: same reconstructions, likelihoods and bytes at every level; then the new channels learn."""
    wide = widen_codec(codec, 12, seed=1).eval()
    assert wide.config.channels == 12 and wide.g_a[0].weight.shape == (12, 3, 5, 5)
    x = tiny_image(seed=5)
    with torch.no_grad():
        for q in range(TINY.levels):
            a, b = codec(x, q), wide(x, q)
            assert torch.allclose(a.x_hat, b.x_hat, atol=1e-6)
            assert torch.allclose(a.likelihoods["y"], b.likelihoods["y"], atol=1e-7)
    assert wide.compress(x, 2)["strings"] == codec.compress(x, 2)["strings"]  # tables copied too
    with pytest.raises(ValueError, match="cannot widen"):
        widen_codec(codec, 4)
    # The new channels are not stuck: the zero weights out of them get gradients at once (the
    # last layers first), and a few steps reach the first layer's new channels.
    wide.train()
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    batch = torch.from_numpy(rgb_patches([(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)], 4, 32, seed=0))
    opt = torch.optim.Adam(wide.parameters(), lr=1e-3)
    for step in range(5):
        opt.zero_grad()
        make_loss_fn(wide)(wide, batch, torch.Generator().manual_seed(step)).backward()
        if step == 0:
            assert float(wide.g_s[6].weight.grad[8:].abs().sum()) > 0  # deconv (in, out, k, k): from new inputs
            assert float(wide.g_a[6].weight.grad[:, 8:].abs().sum()) > 0  # conv (out, in, k, k): from new inputs
        opt.step()
    assert not torch.equal(wide.g_a[0].weight[8:], before["g_a.0.weight"][8:])
    assert not torch.equal(wide.g_s[0].weight[:, 8:], before["g_s.0.weight"][:, 8:])


def test_quantized_tables_are_exact_integers():
    f = quantize_pmf(np.array([0.7, 0.2, 0.1, 0.0, 1e-12]))
    assert f.dtype == np.int32 and int(f.sum()) == 1 << 16 and int(f.min()) >= 1
    assert f[0] > f[1] > f[2]


def test_round_trip_is_exact_and_deterministic(codec):
    x = tiny_image(37, 50, seed=5)
    for q in range(TINY.levels):
        enc = codec.compress(x, q)
        again = codec.compress(x, q)
        assert enc["strings"] == again["strings"] and enc["shape"] == again["shape"], "same input, same bytes"
        a = codec.decompress(enc["strings"], enc["shape"], q, (37, 50))
        b = codec.decompress(enc["strings"], enc["shape"], q, (37, 50))
        assert a.shape == (1, 3, 37, 50)
        assert torch.equal(a, b), "decoding is deterministic"
        # The entropy coder is lossless: decoding the bytes gives exactly the encoder's latent.
        assert torch.equal(a, codec.synthesise(codec.analyse(x, q), q, (37, 50)))


def test_large_images_are_coded_and_decoded_in_tiles(codec):
    """The factorized codec's float transforms over a large image in tiles: the same result up to
    float rounding (its decoder is float32 and was never exact across devices)."""
    x = tiny_image(150, 200, seed=3)
    enc = codec.compress(x, 2)
    whole = codec.decompress(enc["strings"], enc["shape"], 2, (150, 200))
    codec.synthesis_tile, codec.analysis_tile = 3, 64
    try:
        tiled = codec.decompress(enc["strings"], enc["shape"], 2, (150, 200))
        assert float((tiled - whole).abs().max()) < 1e-4
        same = float((codec.compress(x, 2)["y"] == enc["y"]).double().mean())
        assert same > 0.99, f"the tiled analysis codes nearly the same latent ({same:.4f} equal)"
    finally:
        del codec.synthesis_tile, codec.analysis_tile


def test_rate_decreases_with_quality_and_matches_estimate(codec):
    x = tiny_image(64, 96, seed=9)
    sizes, estimates = [], []
    for q in range(TINY.levels):
        sizes.append(len(codec.compress(x, q)["strings"][0]))
        estimates.append(codec.estimate_bits(codec.analyse(x, q), q) / 8)
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"bytes per level {sizes}"
    # Real bits vs the model's estimate: within a few 32-bit words of range-coder overhead.
    for s, e in zip(sizes, estimates, strict=True):
        assert abs(s - e) <= 0.05 * e + 12, (s, e)


def test_identity_covers_weights_and_tables(codec):
    ident = codec.identity()
    assert len(ident) == 8 and ident == codec_identity(codec.config.to_dict(), codec.state_dict())
    other = ImageCodec(TINY)
    load_codec_state(other, codec.state_dict())
    assert other.identity() == ident, "a reloaded codec keeps its identity"
    with torch.no_grad():
        other.g_s[0].bias.add_(1e-3)
    assert other.identity() != ident


def test_metrics_and_bd_rate():
    a = (np.arange(48 * 64 * 3).reshape(48, 64, 3) % 251).astype(np.uint8)
    assert psnr(a, a) == 100.0 and ms_ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    assert 30 < psnr(a, b) < 40 and ms_ssim(a, b) < 1.0
    rate = [0.2, 0.4, 0.8, 1.6]
    quality = [28.0, 31.0, 34.0, 37.0]
    assert bd_rate(rate, quality, [r * 0.8 for r in rate], quality) == pytest.approx(-20.0, abs=0.01)
    assert bd_rate(rate, quality, rate, [q + 50 for q in quality]) is None, "no overlap"


def test_aec_header_fields_round_trip():
    from models.aec import parse

    f = AecFile(model_id=b"12345678", quality=3, mode="L", width=7, height=9, payload=b"\x01\x02\x03\x04")
    data = f.to_bytes()
    assert data[:4] == b"\x89AEC" and len(data) == 31 + 4
    assert parse(data) == f


def test_committed_benchmark_codec_rate_falls_with_quality():
    """The codec trained on bundled photographs (benchmarks/weights/codec): fewer bytes at lower levels."""
    import json
    import os

    import skimage.data
    from safetensors.torch import load_file

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "codec")
    meta = json.load(open(os.path.join(folder, "config.json")))
    model = build_model(meta["kind"], meta["config"])
    load_codec_state(model, load_file(os.path.join(folder, "weights.safetensors")))
    model.eval()
    x = torch.from_numpy(skimage.data.chelsea()[80:208, 150:278].copy()).permute(2, 0, 1)[None].float() / 255
    sizes, quality = [], []
    for q in range(model.config.levels):
        enc = model.compress(x, q)
        sizes.append(len(enc["strings"][0]))
        quality.append(psnr(x, model.decompress(enc["strings"], enc["shape"], q, (128, 128))))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"bytes per level {sizes}"
    assert quality[-1] > quality[0], f"PSNR per level {quality}"


def test_latent_refinement_lowers_the_rate_distortion_cost():
    """Encoder-side refinement (SGA) of the committed codec: lower R + λ·D than the analysis
    transform alone at every level tried, same decoder, deterministic bytes."""
    import json
    import os

    import skimage.data
    from safetensors.torch import load_file

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "codec")
    meta = json.load(open(os.path.join(folder, "config.json")))
    model = build_model(meta["kind"], meta["config"])
    load_codec_state(model, load_file(os.path.join(folder, "weights.safetensors")))
    model.eval()
    x = torch.from_numpy(skimage.data.coffee()[150:246, 250:362].copy()).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    for q in (1, model.config.levels - 2):
        costs = {}
        for steps in (0, 40):
            enc = model.compress(x, q, refine_steps=steps)
            x_hat = model.decompress(enc["strings"], enc["shape"], q, (h, w))
            bpp = 8 * len(enc["strings"][0]) / (h * w)
            mse = float(torch.mean((x_hat - x) ** 2))
            costs[steps] = bpp + model.config.lambdas[q] * 255**2 * mse
            # The decoder reads the refined latent exactly: the format is unchanged.
            assert torch.equal(x_hat, model.synthesise(enc["y"], q, (h, w)))
        assert costs[40] < 0.97 * costs[0], f"level {q}: R + λD {costs}"
        again = model.compress(x, q, refine_steps=40)
        assert again["strings"] == enc["strings"], "refined encoding is deterministic"
    p = list(model.parameters())
    assert all(t.grad is None for t in p), "refinement leaves the model's parameters untouched"
    # The guard: however badly the optimisation goes (a wild step size), the best hard-rounded
    # latent seen is kept, the analysis transform's own included: never worse than the fast encoder.
    with torch.inference_mode():
        y0 = model.g_a(torch.nn.functional.pad(x, (0, (-w) % 16, 0, (-h) % 16), mode="replicate"))
        y0 = y0 * model._gains(torch.tensor([1]))[0]
    wild = model.refine_latent(x, y0, 1, steps=5, lr=50.0)
    assert torch.equal(torch.round(wild), torch.round(y0)), "a diverged refinement falls back to the analysis latent"


def test_level_likelihoods_gathered_per_sample_equal_each_levels_prior():
    """The training path's per-sample gather (no host synchronisation) gives each sample the
    likelihoods of its own level's prior, as ``priors[level].likelihood`` does alone, and the
    same gradients for every prior."""
    from models.codec import level_likelihoods

    torch.manual_seed(0)
    priors = torch.nn.ModuleList(FactorizedPrior(5) for _ in range(3))
    with torch.no_grad():  # distinct densities per level
        for i, p in enumerate(priors):
            for m in p.matrices:
                m.add_(0.3 * i * torch.randn_like(m))
            for b in p.biases:
                b.add_(torch.randn_like(b))
    values = 4 * torch.randn(6, 5, 3, 4)
    quality = torch.tensor([2, 0, 2, 1, 0, 2])
    got = level_likelihoods(priors, values, quality)
    want = torch.cat([priors[int(q)].likelihood(values[i : i + 1]) for i, q in enumerate(quality)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(want[0], priors[0].likelihood(values[:1])[0]), "levels differ, so a mix-up would show"

    def grads(lik):
        priors.zero_grad()
        (-torch.log2(lik)).sum().backward()
        return [p.grad.clone() for p in priors.parameters()]

    for a, b in zip(grads(level_likelihoods(priors, values, quality)),
                    grads(torch.cat([priors[int(q)].likelihood(values[i : i + 1]) for i, q in enumerate(quality)]))):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
