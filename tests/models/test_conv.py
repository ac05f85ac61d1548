"""The convolutional autoencoder and its blocks: shapes on any size, round trip, training, tiling."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.conv import (
    ConvAEConfig,
    ConvAutoencoder,
    latent_noise_loss,
    reconstruction_loss,
)
from models.image_ops import tiled_apply
from models.noise import DenoisingLoss, NoiseConfig, corrupt
from models.training import TrainSettings, fit

pytestmark = [pytest.mark.models]
TINY = ConvAEConfig(in_channels=1, channels=(8, 16, 16), latent_channels=4)


@pytest.mark.parametrize("size", [(16, 16), (17, 31), (5, 9), (64, 40)])
@pytest.mark.parametrize("skip", [False, True])
def test_any_size_in_same_size_out(size, skip):
    model = ConvAutoencoder(ConvAEConfig(in_channels=3, channels=(8, 16, 16), latent_channels=4, skip=skip))
    x = torch.rand(2, 3, *size)
    out = model(x)
    assert out.x_hat.shape == x.shape
    assert out.z.shape == (2, 4, *model.config.code_shape(*size)[1:])
    assert model.encode(x).shape == out.z.shape


def test_uint8_input_is_scaled_to_unit_range():
    model = ConvAutoencoder(ConvAEConfig(1, (8, 16), 4, residual=True))
    x = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8)
    # A fresh residual model is the identity, so the output is the input in [0, 1].
    torch.testing.assert_close(model(x).x_hat, x.float() / 255)


def test_config_round_trip_and_rebuild():
    cfg = ConvAEConfig(1, (8, 16), 4, blocks=2, skip=True, residual=True)
    model = ConvAutoencoder(cfg)
    rebuilt = build_model("conv", cfg.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 20, 20)
    torch.testing.assert_close(rebuilt(x).x_hat, model(x).x_hat)
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        ConvAEConfig(in_channels=2)


def test_train_step_changes_weights_and_overfits_tiny_batch():
    torch.manual_seed(0)
    model = ConvAutoencoder(TINY)
    x = (torch.rand(8, 1, 16, 16) * 255).to(torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fit(model, x, x[:2], TrainSettings(epochs=25, batch_size=8, lr=1e-2, patience=100, device="cpu"),
              loss_fn=reconstruction_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res.history[-1].train_loss < 0.5 * res.history[0].train_loss


def test_tiled_inference_has_no_seams():
    torch.manual_seed(0)
    model = ConvAutoencoder(ConvAEConfig(1, (8, 16), 4, skip=True, residual=True)).eval()
    for p in model.head.parameters():  # make the correction non-trivial
        torch.nn.init.normal_(p, std=0.1)
    x = torch.rand(1, 1, 150, 96)  # even: the whole-image pass needs no padding either
    with torch.inference_mode():
        whole = model(x).x_hat
        tiled = tiled_apply(lambda t: model(t).x_hat, x, tile=64, overlap=32)
    assert tiled.shape == whole.shape
    # Each tile sees its context, and blending over the overlap leaves no seam: the result
    # stays close to one pass over the whole image (padding differs only at image borders).
    diff = (tiled - whole).abs()
    assert diff.mean() < 0.01 * whole.std()
    assert diff.max() < 0.25 * whole.std()
    # The identity through tiles is exact: the weights sum to one everywhere.
    torch.testing.assert_close(tiled_apply(lambda t: t * 1.0, x, tile=64, overlap=24), x)


def test_corruption_is_seeded_and_denoising_loss_trains():
    x = torch.rand(6, 1, 16, 16)
    cfg = NoiseConfig(kinds=("gaussian", "salt_pepper", "mask"))
    a = corrupt(x, cfg, torch.Generator().manual_seed(1))
    b = corrupt(x, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, x)
    loss = DenoisingLoss(NoiseConfig())(ConvAutoencoder(TINY), x, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.item() > 0
    with pytest.raises(ValueError, match="noise kinds"):
        NoiseConfig(kinds=("blur",))


def test_latent_noise_loss_is_seeded_and_zero_noise_is_plain_reconstruction():
    torch.manual_seed(0)
    model = ConvAutoencoder(ConvAEConfig(1, (4, 8), 2))
    x = torch.randint(0, 256, (4, 1, 10, 10), dtype=torch.uint8)  # padded to 10 -> crop back
    assert latent_noise_loss(0.0) is reconstruction_loss
    noisy = latent_noise_loss(0.5)
    a = noisy(model, x, torch.Generator().manual_seed(1))
    b = noisy(model, x, torch.Generator().manual_seed(1))
    plain = reconstruction_loss(model, x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, plain)
    a.backward()
    assert model.stem[0].weight.grad is not None
    with pytest.raises(ValueError):
        latent_noise_loss(0.5)(ConvAutoencoder(ConvAEConfig(1, (4, 8), 2, skip=True)), x, torch.Generator())
    with pytest.raises(ValueError):
        latent_noise_loss(-1.0)
