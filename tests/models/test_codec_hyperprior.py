"""The mean-scale hyperprior codec: shapes, training step, exact integer hyper-synthesis, tables,
exact round trips, rate vs quality, payload vs estimate, float16 weights, start from a factorized codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.codec import CodecConfig, CodecOutput, ImageCodec, load_codec_state
from models.codec_hyperprior import HyperLatents, HyperpriorCodec, HyperpriorConfig
from models.codec_layers import IntegerConvStack
from models.codec_train import (
    hyperprior_from_factorized,
    interpolate_gains,
    make_loss_fn,
    make_rate_loss_fn,
)
from models.entropy_coding import EntropyCodingError
from models.entropy_models import GaussianConditional
from models.image_ops import map_tiles, pad_to_multiple, rgb_patches
from tests.models.codec_helpers import TINY_HYPER, fitted_hyperprior, tiny_image

pytestmark = [pytest.mark.models]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def codec() -> HyperpriorCodec:
    return fitted_hyperprior()


def test_forward_contract_shapes():
    torch.manual_seed(0)
    model = HyperpriorCodec(TINY_HYPER)
    out = model(tiny_image(37, 50).repeat(2, 1, 1, 1), torch.tensor([0, 3]))
    assert isinstance(out, CodecOutput)
    assert out.x_hat.shape == (2, 3, 37, 50), "any size: padded to the stride and cropped back"
    assert out.likelihoods["y"].shape == (2, 8, 3, 4)
    assert out.likelihoods["z"].shape == (2, 8, 1, 1), "z at 1/4 of y, rounded up"
    for lik in out.likelihoods.values():
        assert bool(((lik > 0) & (lik <= 1)).all())
    model.eval()
    ev = model(tiny_image(), 1)
    assert 0 <= float(ev.x_hat.detach().min()) and float(ev.x_hat.detach().max()) <= 1


def test_config_round_trip_and_registry():
    cfg = HyperpriorConfig(channels=16, latent_channels=12, lambdas=(0.01, 0.1))
    assert cfg.hyper_channels == 16, "z's width defaults to the transforms'"
    assert HyperpriorConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_model("hyperprior", cfg.to_dict()), HyperpriorCodec)
    with pytest.raises(ValueError, match="increase"):
        HyperpriorConfig(lambdas=(0.1, 0.01))
    with pytest.raises(ValueError, match="scale_min"):
        GaussianConditional(scale_min=1.0, scale_max=0.5)


def test_train_step_changes_every_part():
    torch.manual_seed(0)
    model = HyperpriorCodec(TINY_HYPER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.from_numpy(rgb_patches([(tiny_image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)],
                                         4, 32, seed=0))
    loss = make_loss_fn(model)(model, batch, torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"g_a", "g_s", "h_a", "h_s", "z_priors", "log_gain", "log_hyper_gain"} <= changed, changed


def test_the_entropy_side_learns_from_the_rate_alone():
    """What ``train_codec --entropy-only`` relies on: the distortion gives h_a, h_s and the z priors no
    gradient, and the rate loss on latents computed once equals the rate part of the full loss."""
    torch.manual_seed(0)
    model = HyperpriorCodec(TINY_HYPER)
    x = tiny_image(32, 48).repeat(3, 1, 1, 1)
    q = torch.tensor([0, 1, 2])
    F.mse_loss(model(x, q).x_hat, x).backward()
    for name, p in model.named_parameters():
        hyper = name.startswith(("h_a.", "h_s.", "z_priors.", "log_hyper_gain", "log_inv_hyper_gain"))
        if hyper:
            assert p.grad is None or not bool(p.grad.any()), f"{name} got a gradient from the distortion"
        elif name.startswith(("g_a.", "g_s.")):
            assert p.grad is not None and bool(p.grad.any()), name
    model.zero_grad(set_to_none=True)
    # Same noise draws: the rate of the full forward equals the rate loss on the latent alone.
    model.eval()  # rounding instead of noise: deterministic
    with torch.no_grad():
        y = model.g_a(x)
        full = model(x, q).likelihoods
        _, alone = model.entropy_forward(y, q)
    for k in ("y", "z"):
        assert torch.equal(full[k], alone[k]), k
    model.train()
    loss = make_rate_loss_fn(model)(model, y, torch.Generator().manual_seed(0))
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
    assert {"h_a", "h_s", "z_priors", "log_hyper_gain"} <= grads and not grads & {"g_a", "g_s"}, grads


def _ref_conv_int64(a: torch.Tensor, w: torch.Tensor, transposed: bool, kernel: int, stride: int) -> torch.Tensor:
    """An independent int64 (transposed) convolution: unfold (an exact copy) and an integer matmul."""
    p = kernel // 2
    if transposed:  # = a convolution of the zero-dilated input with the flipped, swapped kernel
        n, c, h, wd = a.shape
        dil = torch.zeros(n, c, (h - 1) * stride + 1, (wd - 1) * stride + 1, dtype=a.dtype)
        dil[..., ::stride, ::stride] = a
        lo, hi = kernel - 1 - p, kernel - 1 - p + stride - 1
        a = F.pad(dil, (lo, hi, lo, hi))
        w = w.flip(-1, -2).transpose(0, 1)
        stride, p = 1, 0
    cols = F.unfold(a.double(), kernel, padding=p, stride=stride).to(torch.int64)  # (N, C*k*k, L)
    out = w.reshape(w.shape[0], -1).to(torch.int64) @ cols[0]
    oh = (a.shape[-2] + 2 * p - kernel) // stride + 1
    return out.view(1, w.shape[0], oh, -1)


def _exact_on_any_thread_count(stack: IntegerConvStack, a0: torch.Tensor) -> torch.Tensor:
    """``stack(a0)``, checked to be the same on 1 and 2 threads and equal, bit for bit, to an int64
    recomputation (with Python's integer square root for inverse GDNs)."""
    one = stack(a0)
    torch.set_num_threads(2)
    try:
        two = stack(a0)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)
    a, last = a0.to(torch.int64), len(stack.specs) - 1
    for i, (transposed, _, _, k, s) in enumerate(stack.specs):
        acc = _ref_conv_int64(a, getattr(stack, f"weight{i}"), transposed, k, s) + getattr(stack, f"bias{i}").view(1, -1, 1, 1)
        a = torch.div(acc, (2 ** getattr(stack, f"shift{i}").to(torch.int64)).view(1, -1, 1, 1), rounding_mode="floor")
        if i == last or stack.nonlinearity == "igdn":
            a = a.clamp(-(2**22), 2**22)
            a = _ref_inverse_gdn_int64(a, stack, i) if i < last else a
        else:
            a = a.clamp(0, 2**22)
    assert torch.equal(one, a.double()), "exact integers: no rounding anywhere"
    return one


def test_integer_hyper_synthesis_is_exact_integer_arithmetic(codec):
    """The float64 path equals an int64 recomputation bit for bit, whatever the thread count,
    and stays within fixed-point rounding of the float network it was built from."""
    stack = codec.h_s_int
    z = torch.randint(-6, 7, (1, 8, 3, 4), generator=torch.Generator().manual_seed(1)).double()
    a0 = torch.round(z * 2.0**stack.act_bits * 0.37)
    one = _exact_on_any_thread_count(stack, a0)
    with torch.no_grad():
        ref = codec.h_s(a0.float() / 2.0**stack.act_bits)
    err = (one / 2.0**stack.act_bits - ref).abs().max()
    assert float(err) < 0.02 * float(ref.abs().max()) + 0.01, float(err)
    with pytest.raises(ValueError, match="exact float64 range"):
        IntegerConvStack([(False, 20000, 4, 5, 1)])


def _ref_inverse_gdn_int64(a: torch.Tensor, stack: IntegerConvStack, i: int) -> torch.Tensor:
    """The integer inverse GDN recomputed in int64 and Python's exact ``math.isqrt``."""
    bits, sqrt_bits = stack.act_bits, stack.SQRT_BITS
    sq = torch.div(a * a, 2**bits, rounding_mode="floor")
    gamma = getattr(stack, f"gamma{i}").to(torch.int64)
    norm = torch.einsum("oc,nchw->nohw", gamma, sq) + getattr(stack, f"beta{i}").view(1, -1, 1, 1)
    norm = norm.clamp(0, 2**45)
    v = torch.empty_like(norm)
    for c, sg in enumerate(getattr(stack, f"gamma_shift{i}").tolist()):
        e = 2 * sqrt_bits - bits - sg
        v[:, c] = norm[:, c] * 2**e if e >= 0 else torch.div(norm[:, c], 2**-e, rounding_mode="floor")
    v = v.clamp(0, 2**52)
    r = torch.tensor([math.isqrt(int(t)) for t in v.reshape(-1).tolist()], dtype=torch.int64).view_as(v)
    return torch.div(a * r, 2**sqrt_bits, rounding_mode="floor").clamp(-(2**22), 2**22)


def test_integer_synthesis_is_exact_and_matches_the_float_transform(codec):
    """``g_s`` as the decoder runs it: exact integers (an int64 recomputation with Python's integer
    square root agrees bit for bit, whatever the thread count), so every machine and device decodes
    the same pixels; and within fixed-point rounding of the float transform it was built from."""
    from models.codec_hyperprior import G_S_ACT_BITS

    stack = codec.g_s_int
    assert stack.ready and stack.nonlinearity == "igdn"
    y = torch.randint(-5, 6, (1, 8, 3, 4), generator=torch.Generator().manual_seed(2)).double() * 0.6
    a0 = torch.round(y * 2.0**G_S_ACT_BITS)
    one = _exact_on_any_thread_count(stack, a0)
    with torch.no_grad():
        ref = codec.g_s(y.float())
    err = (one / 2.0**G_S_ACT_BITS - ref).abs().max()
    assert float(err) < 2e-3 * float(ref.abs().max()) + 1e-3, float(err)
    # The decoder uses it: decoded pixels are the integer transform's, within a grey level of the float one's.
    x = tiny_image(32, 48, seed=3)
    enc = codec.compress(x, 2)
    dec = codec.decompress(enc["strings"], enc["shape"], 2, (32, 48))
    with torch.no_grad():
        mean, _, _ = codec.hyper_decode(enc["latents"].z, 2, enc["shape"])
        y_hat = (enc["latents"].y.double() + mean) * codec.inv_gain_table[2].view(-1, 1, 1)
        float_dec = codec.g_s(y_hat.float().unsqueeze(0))[..., :32, :48].clamp(0, 1)
    assert float((dec * 255).round().sub((float_dec * 255).round()).abs().max()) <= 1


def test_integer_synthesis_follows_the_weights_it_is_loaded_with(codec):
    """Derived from the float weights (not saved): loading other weights rebuilds it from them, and
    the weights file and the model's identity are those of a model without it."""
    from models.codec import codec_identity

    state = codec.state_dict()
    assert not any(k.startswith("g_s_int.") for k in state), "derived on load, not stored"
    other = HyperpriorCodec(TINY_HYPER)
    load_codec_state(other, state)
    assert not other.g_s_int.ready
    x = tiny_image(32, 48, seed=4)
    enc = codec.compress(x, 1)
    assert torch.equal(other.decompress(enc["strings"], enc["shape"], 1, (32, 48)),
                       codec.decompress(enc["strings"], enc["shape"], 1, (32, 48)))
    cfg = codec.config.to_dict()
    assert codec_identity(cfg, other.state_dict()) == codec_identity(cfg, state)
    changed = {k: (v + 0.01 if k == "g_s.0.weight" else v) for k, v in state.items()}
    load_codec_state(other, changed)
    assert not other.g_s_int.ready, "new weights: the integer transform is derived again"
    assert not torch.equal(other.decompress(enc["strings"], enc["shape"], 1, (32, 48)),
                           codec.decompress(enc["strings"], enc["shape"], 1, (32, 48)))


def test_gaussian_tables_and_index():
    g = GaussianConditional(scale_levels=32)
    g.build_tables()
    freqs, starts, lengths, offsets = g.tables()
    for t in range(32):
        f = freqs[starts[t] : starts[t] + lengths[t]]
        assert int(f.sum()) == 1 << 16 and int(f.min()) >= 1 and lengths[t] == 1 - 2 * offsets[t]
        assert f[-offsets[t]] == f.max(), "zero-mean tables peak at 0"
    assert list(lengths) == sorted(lengths), "wider tables for larger scales"
    # The nearest grid scale in log: exactly at a grid scale, and just either side of a midpoint.
    log_s = g.log_scales
    assert torch.equal(g.index(log_s), torch.arange(32))
    mid = float(g.thresholds[10])
    assert g.index(torch.tensor([mid - 1e-9, mid + 1e-9], dtype=torch.float64)).tolist() == [10, 11]
    assert g.index(torch.tensor([-50.0, 50.0], dtype=torch.float64)).tolist() == [0, 31], "out of range: the ends"


def test_round_trip_is_exact_and_deterministic(codec):
    x = tiny_image(37, 50, seed=5)
    for q in range(TINY_HYPER.levels):
        enc = codec.compress(x, q)
        assert enc["strings"] == codec.compress(x, q)["strings"], "same input, same bytes"
        assert isinstance(enc["latents"], HyperLatents) and enc["latents"].z.shape == (8, 1, 1)
        a = codec.decompress(enc["strings"], enc["shape"], q, (37, 50))
        b = codec.decompress(enc["strings"], enc["shape"], q, (37, 50))
        assert a.shape == (1, 3, 37, 50) and torch.equal(a, b), "decoding is deterministic"
        # The entropy coder is lossless: decoding gives exactly the encoder's latents.
        assert torch.equal(a, codec.synthesise(enc["latents"], q, (37, 50)))
    with pytest.raises(EntropyCodingError, match="32-bit words"):
        codec.decompress([enc["strings"][0][:-1]], enc["shape"], q, (37, 50))
    with pytest.raises(ValueError, match="refinement is not implemented"):
        codec.compress(x, 0, refine_steps=5)


def test_rate_falls_with_quality_and_payload_matches_estimate(codec):
    x = tiny_image(96, 128, seed=9)
    sizes, errors = [], []
    # The transforms are untrained (their decode of any latent is about as far from x), so the
    # distortion that quality buys is measured against the unquantised latent's decode.
    with torch.no_grad():
        xp, _ = pad_to_multiple(x, codec.stride)
        reference = codec.g_s(codec.g_a(xp))[..., :96, :128].clamp(0, 1)
    for q in range(TINY_HYPER.levels):
        enc = codec.compress(x, q)
        payload = len(enc["strings"][0])
        estimate = codec.estimate_bits(enc["latents"], q) / 8
        sizes.append(payload)
        # Real bits vs the continuous model: the scale grid, 16-bit tables and a few words of coder flush.
        assert abs(payload - estimate) <= 0.02 * estimate + 8, (q, payload, estimate)
        x_hat = codec.decompress(enc["strings"], enc["shape"], q, (96, 128))
        errors.append(float(torch.mean((x_hat - reference) ** 2)))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"bytes per level {sizes}"
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 4, errors


def test_identity_covers_integer_tables(codec):
    ident = codec.identity()
    other = HyperpriorCodec(TINY_HYPER)
    load_codec_state(other, codec.state_dict())
    assert other.identity() == ident and other.has_tables, "a reloaded codec keeps its identity and tables"
    with torch.no_grad():
        other.h_s_int.bias0[0] += 1
    assert other.identity() != ident
    fresh = HyperpriorCodec(TINY_HYPER)
    assert not fresh.has_tables
    with pytest.raises(RuntimeError, match="update_tables"):
        fresh.compress(tiny_image(), 0)


def test_float16_weights_load_into_the_float32_model(codec):
    """The training script stores weights as float16 when float32 would not fit a file: weights rounded
    first, tables built from them, so the loaded model has the same identity and codes the same bytes."""
    half = HyperpriorCodec(TINY_HYPER)
    load_codec_state(half, codec.state_dict())
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(p.half().float())
    half.eval()
    half.update_tables()
    sd = {k: (v.half() if v.dtype == torch.float32 else v) for k, v in half.state_dict().items()}
    loaded = HyperpriorCodec(TINY_HYPER).eval()
    load_codec_state(loaded, sd)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.identity() == half.identity()
    x = tiny_image(48, 64, seed=3)
    assert loaded.compress(x, 2)["strings"] == half.compress(x, 2)["strings"]


def test_start_from_a_factorized_codec():
    """Transforms and gains copied (gains interpolated in log λ for new levels); hyper parts fresh."""
    torch.manual_seed(0)
    fact = ImageCodec(CodecConfig(channels=8, latent_channels=8, lambdas=(0.002, 0.01, 0.05)))
    with torch.no_grad():
        fact.log_gain.copy_(torch.tensor([0.0, 1.0, 2.0])[:, None].expand_as(fact.log_gain))
    hyper = hyperprior_from_factorized(fact, HyperpriorConfig(channels=8, latent_channels=8,
                                                              lambdas=(0.002, 0.01, 0.05, 0.25)), seed=1)
    assert torch.equal(hyper.g_a[0].weight, fact.g_a[0].weight) and torch.equal(hyper.g_s[6].bias, fact.g_s[6].bias)
    assert torch.allclose(hyper.log_gain[:3], fact.log_gain)
    assert float(hyper.log_gain[3, 0].detach()) == pytest.approx(3.0, abs=1e-5), "extrapolated"
    x = tiny_image(32, 48)
    xp, _ = pad_to_multiple(x, 16)
    with torch.no_grad():
        assert torch.equal(hyper.g_s(hyper.g_a(xp)), fact.g_s(fact.g_a(xp))), "the same transforms"
    with pytest.raises(ValueError, match="transform shapes differ"):
        hyperprior_from_factorized(fact, HyperpriorConfig(channels=16, latent_channels=8))
    g = torch.tensor([[1.0], [3.0]])
    assert interpolate_gains(g, (0.01, 0.1), (0.01, math.sqrt(0.001), 0.1))[1, 0] == pytest.approx(2.0)


def test_values_beyond_their_table_are_escaped_not_clamped():
    from models.entropy_coding import StreamDecoder, StreamEncoder

    g = GaussianConditional(scale_levels=16)
    g.build_tables()
    tables = g.tables()
    rng = np.random.default_rng(0)
    index = rng.integers(0, 16, size=(3, 5, 7))
    values = np.round(rng.normal(0, 1, size=index.shape) * np.exp(g.log_scales.numpy()[index])).astype(np.int64)
    values.flat[[0, 5, 9, 50]] = [1000, -1000, 2**20, -(2**25)]  # far outside any table
    values.flat[7] = int(tables[3][index.flat[7]])  # exactly the lowest symbol: an end symbol with excess 0
    enc = StreamEncoder()
    enc.encode_indexed(values, index, *tables)
    dec = StreamDecoder(enc.payload())
    np.testing.assert_array_equal(dec.decode_indexed(index, *tables), values)
    with pytest.raises(ValueError, match="too far to code"):
        StreamEncoder().encode_indexed(np.array([2**40]), np.array([0]), *tables)


def test_calibration_starts_the_hyper_synthesis_at_a_per_channel_gaussian():
    from models.codec_train import calibrate_hyperprior

    torch.manual_seed(0)
    model = HyperpriorCodec(TINY_HYPER)
    with torch.no_grad():
        model.log_gain.fill_(math.log(30.0))  # latent values of a few units: rates that tell scales apart
    x = torch.cat([tiny_image(64, 64, seed=s) for s in range(3)])
    model.eval()

    def bits() -> float:
        with torch.no_grad():
            return float(-torch.log2(model(x, 0).likelihoods["y"]).sum())

    before, w = bits(), model.h_s[-1].weight.clone()
    info = calibrate_hyperprior(model, x)
    with torch.no_grad():
        y = model.g_a(pad_to_multiple(x, 16)[0])
    m = TINY_HYPER.latent_channels
    torch.testing.assert_close(model.h_s[-1].bias[:m].exp(), y.transpose(0, 1).reshape(m, -1).std(1))
    torch.testing.assert_close(model.h_s[-1].weight, 0.1 * w)
    assert info["latent_std"] > 0 and bits() < before, (before, bits())
    assert info["z_bits_per_element"] < 0.5, "z's priors fitted to the (near-zero) hyper-latents: cheap side information"


def test_committed_hyperprior_decodes_exactly_and_its_rate_rises_with_quality():
    """The hyperprior the demo and the compress deployment apply (benchmarks/weights/hyperprior):
    more bytes and higher PSNR at higher levels on a photograph it never saw, decoded through the
    integer synthesis within a grey level of its float transform."""
    import json
    import os

    import skimage.data
    from safetensors.torch import load_file

    from models.metrics import psnr

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "weights", "hyperprior")
    meta = json.load(open(os.path.join(folder, "config.json")))
    model = build_model(meta["kind"], meta["config"])
    load_codec_state(model, load_file(os.path.join(folder, "weights.safetensors")))
    model.eval()
    x = torch.from_numpy(skimage.data.chelsea()[80:144, 150:246].copy()).permute(2, 0, 1)[None].float() / 255
    sizes, quality = [], []
    for q in (0, model.config.levels // 2, model.config.levels - 1):
        enc = model.compress(x, q)
        sizes.append(len(enc["strings"][0]))
        dec = model.decompress(enc["strings"], enc["shape"], q, (64, 96))
        quality.append(psnr(x, dec))
        with torch.no_grad():
            mean, _, _ = model.hyper_decode(enc["latents"].z, q, enc["shape"])
            y_hat = (enc["latents"].y.double() + mean) * model.inv_gain_table[q].view(-1, 1, 1)
            ref = model.g_s(y_hat.float().unsqueeze(0))[..., :64, :96].clamp(0, 1)
        assert float((dec * 255).round().sub((ref * 255).round()).abs().max()) <= 1
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"bytes per level {sizes}"
    assert quality == sorted(quality) and quality[-1] > quality[0] + 3, f"PSNR per level {quality}"


def test_large_images_are_coded_in_tiles_and_decode_to_the_same_pixels(codec):
    """The transforms run over a large image tile by tile (memory of a tile): the exact synthesis
    gives bit for bit the untiled decode; the tiled analysis codes nearly the same latent."""
    x = tiny_image(150, 200, seed=3)  # latent 10 x 13; tiles of 3 latent pixels: 16 tiles, many seams
    out = codec.compress(x, 2)
    whole = codec.decompress(out["strings"], out["shape"], 2, (150, 200))
    codec.synthesis_tile, codec.analysis_tile = 3, 64
    try:
        tiled = codec.decompress(out["strings"], out["shape"], 2, (150, 200))
        assert torch.equal(tiled, whole), "tiled exact synthesis: the same pixels"
        out_t = codec.compress(x, 2)
        same = float((out_t["latents"].y == out["latents"].y).double().mean())
        assert same > 0.99, f"tiled analysis: the latent differs only by float rounding ({same:.4f} equal)"
        back = codec.decompress(out_t["strings"], out_t["shape"], 2, (150, 200))
        assert float((back - whole).abs().max()) < 0.05
        a = torch.round(torch.randn(1, codec.config.latent_channels, 10, 13, generator=torch.Generator().manual_seed(1))
                        * 4 * 2**14).double()
        seams = map_tiles(lambda t: codec.g_s_int(t), a, 3, 0, up=16)
        assert not torch.equal(seams, codec.g_s_int(a)), "the check can fail: without the halo the seams differ"
    finally:
        del codec.synthesis_tile, codec.analysis_tile
