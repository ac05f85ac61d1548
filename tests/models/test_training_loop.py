"""The training loop's batch sources, mid-epoch resume, throttled callbacks, automatic batch and compile."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from models import training
from models.conv import ConvAEConfig, ConvAutoencoder, latent_noise_loss
from models.conv import reconstruction_loss as conv_loss
from models.dense import (
    DenseAEConfig,
    DenseAutoencoder,
    ImputerConfig,
    MaskedDenseAutoencoder,
    MaskedImputer,
    imputer_loss,
    masked_reconstruction_loss,
)
from models.noise import DenoisingLoss, NoiseConfig
from models.training import (
    DeviceGenerator,
    StepCost,
    TensorSource,
    TrainSettings,
    TrainState,
    auto_batch_size,
    fit,
    host_generator,
    measure_step_cost,
    reconstruction_loss,
)

pytestmark = pytest.mark.models


def _data(n=300, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.05 * rng.normal(size=(n, d))).astype("float32")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return DenseAutoencoder(DenseAEConfig(12, 3, hidden=(16,), **kw))


class Interrupted(Exception):
    pass


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_mid_epoch_resume_matches_uninterrupted_run():
    """A checkpoint taken within an epoch (shuffled, dropout) resumes to the same weights."""
    x = _data(200)
    settings = TrainSettings(epochs=2, batch_size=16, patience=100, seed=5)
    ref = _model(dropout=0.1)
    fit(ref, x[:160], x[160:], settings)

    saved: list[tuple[dict, dict]] = []

    def checkpoint(state: TrainState) -> None:
        saved.append((load(save(state.to_flat()[0])), state.to_flat()[1]))  # through safetensors bytes and JSON
        if state.epoch == 1 and state.step == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(_model(dropout=0.1), x[:160], x[160:], dataclasses.replace(settings, checkpoint_seconds=1e-9),
            on_checkpoint=checkpoint)
    state = TrainState.from_flat(*saved[-1])
    assert (state.epoch, state.step, state.batch_size) == (1, 7, 16)
    assert state.epoch_generator_state is not None

    resumed = _model(seed=99, dropout=0.1)
    r = fit(resumed, x[:160], x[160:], settings, resume=state)
    assert [h.epoch for h in r.history] == [1, 2]
    assert r.resumed and (r.resumed_from_epoch, r.resumed_from_step) == (1, 7), "the result says where it went on from"
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_checkpoint_seconds_throttles_epoch_checkpoints():
    x = _data(120)
    epochs: list[tuple[int, int, bool]] = []
    fit(_model(), x[:100], x[100:], TrainSettings(epochs=4, batch_size=20, patience=100, checkpoint_seconds=3600),
        on_checkpoint=lambda s: epochs.append((s.epoch, s.step, s.finished)))
    assert epochs == [(4, 0, True)], "only the final state within the hour"
    epochs.clear()
    fit(_model(), x[:100], x[100:], TrainSettings(epochs=4, batch_size=20, patience=100, checkpoint_seconds=0),
        on_checkpoint=lambda s: epochs.append((s.epoch, s.step, s.finished)))
    assert epochs == [(1, 0, False), (2, 0, False), (3, 0, False), (4, 0, True)]


def test_progress_callback_is_throttled(monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 3600.0)
    x = _data(200)
    calls: list[tuple[int, int]] = []
    fit(_model(), x[:160], x[160:], TrainSettings(epochs=2, batch_size=8, patience=100),
        on_batch=lambda s, n: calls.append((s, n)))
    # the very first step, then each epoch's last step: not 2 x 20 calls
    assert calls == [(1, 20), (20, 20), (20, 20)]


def test_automatic_batch_on_cpu_is_the_default_batch_with_lr_unscaled():
    x = _data(200)
    r = fit(_model(), x[:160], x[160:], TrainSettings(epochs=1, batch_size=None, default_batch_size=32, lr=2e-3))
    assert (r.batch_size, r.lr) == (32, 2e-3)
    assert r.history[0].samples == 160 // 32 * 32


def test_measure_step_cost_counts_forward_and_backward_flops():
    """Two linear layers: forward 2(ab + bc), weight gradients 2(ab + bc), the second layer's input gradient 2bc."""
    a, b, c = 20, 16, 6

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(a, b), nn.Linear(b, c)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x))).sum()

    model = MLP()
    before = _weights(model)
    cost = measure_step_cost(model, lambda m, batch, g: m(batch), torch.randn(40, a), torch.device("cpu"))
    assert cost.flops == pytest.approx(4 * (a * b + b * c) + 2 * b * c)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_measure_step_cost_leaves_batchnorm_statistics_alone():
    m = _model(batch_norm=True)
    before = _weights(m)
    cost = measure_step_cost(m, training.reconstruction_loss, torch.from_numpy(_data(64)), torch.device("cpu"))
    assert cost.flops > 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "flops,n,floor,free,want",
    [
        (1e6, 10**6, 256, 1e12, 1024),  # 1e9 FLOP per ms at 1e12 FLOP/s: 1,000 samples -> 256 * 4
        (1e9, 10**6, 256, 1e12, 256),  # a big step already at the floor
        (1e3, 10**6, 256, 1e12, 32768),  # capped by the data: >= 16 steps per epoch (10**6 / 16 = 62,500)
        (1e3, 1000, 32, 1e12, 32),  # small data: the floor
        (1e6, 10**6, 256, 3 * 512 * 1e4, 512),  # memory: 1,024 x 1e4 bytes is over half of the free bytes
    ],
)
def test_auto_batch_size_rule(flops, n, floor, free, want):
    assert auto_batch_size(StepCost(flops, 1e4), n_train=n, floor=floor, peak_flops=1e12, free_bytes=free) == want


def _device_rng_losses():
    with torch.random.fork_rng():  # collection must not move the global RNG for other tests
        torch.manual_seed(0)
        return _device_rng_cases()


def _device_rng_cases():
    noise = NoiseConfig(kinds=("gaussian", "salt_pepper", "mask"), sigma=10, sigma_max=40)
    tab = _data(16)
    tab_nan = tab.copy()
    tab_nan[::3, 2] = np.nan
    img = (np.random.default_rng(0).random((6, 1, 16, 16)) * 255).astype("uint8")
    # A fixed init: with some inits the decoder barely depends on the code, and the latent noise's
    # effect on the loss fell below float32 resolution (seen once in a full run).
    conv = ConvAutoencoder(ConvAEConfig(1, (4, 8), 4, activation="elu"))  # no dead ReLUs hiding the noise
    return [
        ("dense", _model(), training.reconstruction_loss, tab),
        ("masked", MaskedDenseAutoencoder(DenseAEConfig(12, 3, hidden=(8,))), masked_reconstruction_loss, tab_nan),
        ("imputer", MaskedImputer(ImputerConfig(DenseAEConfig(12, 3, hidden=(8,)), members=2)), imputer_loss, tab_nan),
        ("conv", conv, conv_loss, img),
        ("latent_noise", conv, latent_noise_loss(1.0), img),
        ("denoise", ConvAutoencoder(ConvAEConfig(1, (4, 8), 4, skip=True, residual=True)), DenoisingLoss(noise), img),
    ]


@pytest.mark.parametrize("name,model,loss_fn,data", _device_rng_losses(), ids=lambda v: v if isinstance(v, str) else "")
def test_device_rng_losses_draw_noise_from_the_device_generator(name, model, loss_fn, data):
    """Losses marked device_rng draw host-side choices from .host and tensors from the generator's device.

    Here both are CPU generators, so a loss that drew its noise from the host generator would
    not change when only the device generator's seed changes.
    """
    assert getattr(loss_fn, "device_rng", False)
    batch = torch.from_numpy(data)

    def run(device_seed: int) -> float:
        g = DeviceGenerator(device="cpu")
        g.manual_seed(device_seed)
        g.host = torch.Generator().manual_seed(1)
        assert host_generator(g) is g.host
        torch.manual_seed(0)
        return float(loss_fn(model, batch, g).detach())

    a, b = run(0), run(0)
    assert np.isfinite(a) and a == b
    if name not in ("dense", "conv"):  # those two draw no noise
        assert run(1) != a, "the noise did not come from the device generator"


def _recording_compile(monkeypatch) -> list[tuple[nn.Module, str]]:
    """training._compile through the cheap aot_eager backend, recording what it was given."""
    calls: list[tuple[nn.Module, str]] = []

    def fake_compile(module, mode):
        calls.append((module, mode))
        return torch.compile(module, backend="aot_eager", dynamic=False)

    monkeypatch.setattr(training, "_compile", fake_compile)
    return calls


def test_compile_on_trains_through_the_compiled_model(monkeypatch):
    calls = _recording_compile(monkeypatch)
    x = _data(200)
    eager = _model()
    r0 = fit(eager, x[:160], x[160:], TrainSettings(epochs=2, batch_size=32, compile="off"))
    compiled = _model()
    r1 = fit(compiled, x[:160], x[160:], TrainSettings(epochs=2, batch_size=32, compile="on"))
    assert [mode for _, mode in calls] == ["default"] and (r0.compiled, r1.compiled) == ("off", "default")
    assert r1.history[-1].train_loss == pytest.approx(r0.history[-1].train_loss, rel=1e-4)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())


def test_compile_takes_the_loss_into_the_graph_only_when_it_draws_nothing(monkeypatch):
    """reconstruction_loss (compile_with_model) is compiled with the model, as one module returning the
    loss; a loss that draws from its generator keeps it outside, the model compiled alone."""
    calls = _recording_compile(monkeypatch)
    x = _data(200)
    model = _model()
    r = fit(model, x[:160], x[160:], TrainSettings(epochs=2, batch_size=32, compile="on"))
    [(whole, _)] = calls
    assert getattr(whole, "model", None) is model and np.isfinite(r.best_val_loss)
    batch = torch.from_numpy(x[:8])
    assert torch.allclose(whole(batch), reconstruction_loss(model, batch, None))

    def noisy_loss(m, batch, generator):
        noise = torch.randn(batch.shape, generator=generator)
        return F.mse_loss(m(batch + 0.1 * noise).x_hat, batch)

    calls.clear()
    model = _model()
    fit(model, x[:160], x[160:], TrainSettings(epochs=1, batch_size=32, compile="on"), loss_fn=noisy_loss)
    assert [m for m, _ in calls] == [model]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("backend exploded")

    monkeypatch.setattr(training, "_compile", lambda model, mode: Broken())
    x = _data(100)
    r = fit(_model(), x[:80], x[80:], TrainSettings(epochs=2, batch_size=16, compile="on"))
    assert r.compiled == "failed (RuntimeError)"
    assert len(r.history) == 2 and np.isfinite(r.best_val_loss)


def test_unshuffled_source_trains_in_stored_order():
    """The test-only order that streaming tests compare against: batches are consecutive rows."""
    x = torch.from_numpy(_data(40))
    src = TensorSource(x, shuffle=False)
    got = list(src.train_batches(epoch=1, batch_size=16, seed=0, generator=torch.Generator(), skip=1))
    assert len(got) == 1 and torch.equal(got[0], x[16:32])


def _automatic_batch_lrs(monkeypatch, factor: int) -> list[float]:
    """Force the automatic batch to ``factor`` x the default (what CUDA picks) and record every step's lr."""
    monkeypatch.setattr(training, "_default_batch", lambda model, loss_fn, source, device, floor: factor * floor)
    lrs: list[float] = []
    step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    return lrs


def test_automatic_batch_scales_lr_by_sqrt_and_ramps_it_over_the_first_epoch(monkeypatch):
    """What CUDA does with an automatic batch (here forced to 4x the default on CPU): the ramp over the
    first epoch, then the linear decay over the last half of the planned steps, to a tenth."""
    lrs = _automatic_batch_lrs(monkeypatch, 4)
    x = _data(300)
    r = fit(_model(), x[:256], x[256:], TrainSettings(epochs=4, batch_size=None, default_batch_size=16, lr=1e-3))
    assert r.batch_size == 64 and r.lr == pytest.approx(2e-3)
    ramp, plateau = [1.25e-3, 1.5e-3, 1.75e-3, 2e-3], [2e-3] * 4
    decay = [2e-3 * (0.1 + 0.9 * (16 - k) / 8) for k in range(9, 17)]  # steps 9..16 of 16: 1.775e-3 ... 0.2e-3
    assert lrs == pytest.approx(ramp + plateau + decay)
    assert decay[0] < 2e-3 and decay[-1] == pytest.approx(2e-4)
    lrs.clear()
    r = fit(_model(), x[:256], x[256:], TrainSettings(epochs=1, batch_size=64, default_batch_size=16, lr=1e-3))
    assert r.lr == 1e-3 and lrs == [1e-3] * 4, "an explicit batch keeps lr as given"


def test_scaled_lr_is_halved_on_plateaus_down_to_lr(monkeypatch):
    lrs = _automatic_batch_lrs(monkeypatch, 16)

    def flat_validation(m, batch, g):  # validation never improves after the first epoch
        loss = training.reconstruction_loss(m, batch, g)
        return loss if m.training else loss.detach() * 0 + 1.0

    x = _data(300)
    r = fit(_model(), x[:256], x[256:], TrainSettings(epochs=6, batch_size=None, default_batch_size=4, lr=1e-3,
                                                        patience=6), loss_fn=flat_validation)
    assert r.batch_size == 64 and r.lr == pytest.approx(4e-3) and len(r.history) == 6
    per_epoch = [lrs[i * 4 + 3] for i in range(6)]  # each epoch's last step; plateau = 6 // 3 = 2 epochs
    # halved after epochs 3 and 5 (4e-3 -> 2e-3 -> 1e-3), and from step 13 of 24 on also decayed (step 16: x0.7,
    # step 20: x0.4, step 24: x0.1)
    assert per_epoch == pytest.approx([4e-3, 4e-3, 4e-3, 2e-3 * 0.7, 2e-3 * 0.4, 1e-3 * 0.1])


def _step_reads_no_device_value_cases():
    from models.codec import CodecConfig, ImageCodec
    from models.codec_hyperprior import HyperpriorCodec
    from models.codec_train import make_loss_fn as codec_loss
    from tests.models.codec_helpers import TINY_HYPER

    cases = [(name, model, loss_fn, data) for name, model, loss_fn, data in _device_rng_losses()]
    img = (np.random.default_rng(0).random((4, 3, 32, 32)) * 255).astype("uint8")
    for model in (ImageCodec(CodecConfig(channels=8, latent_channels=8, lambdas=(0.01, 0.1, 1.0))),
                  HyperpriorCodec(TINY_HYPER)):
        cases.append((model.kind, model, codec_loss(model), img))
    return cases


@pytest.mark.parametrize("name,model,loss_fn,data", _step_reads_no_device_value_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_training_step_reads_no_value_from_the_device(name, model, loss_fn, data):
    """Every loss ``fit`` trains with runs forward and backward on the meta device, which has shapes
    but no values: an operation that needs a value on the host (``item``, ``tolist``, ``unique``,
    boolean-mask indexing), i.e. a host synchronisation per step on a GPU, raises there. (Host-to-device
    copies are not caught this way.) The codec losses did not pass before their per-level likelihoods
    were gathered per sample."""
    import copy

    model = copy.deepcopy(model).to("meta").train()
    g = DeviceGenerator(device="cpu")
    g.manual_seed(0)
    g.host = torch.Generator().manual_seed(1)
    batch = torch.from_numpy(data).to("meta")
    loss = loss_fn(model, batch, g)
    assert loss.device.type == "meta" and loss.dim() == 0
    loss.backward()
    assert any(p.grad is not None for p in model.parameters()), "the loss reaches the weights"
