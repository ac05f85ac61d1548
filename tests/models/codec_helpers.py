"""Tiny codecs for the tests: synthetic images and a hyperprior whose entropy side is fitted in seconds."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig

TINY_HYPER = HyperpriorConfig(channels=8, latent_channels=8, hyper_channels=8, lambdas=(0.002, 0.01, 0.05, 0.2),
                              scale_levels=64)
GAINS = (4.0, 12.0, 36.0, 108.0)


def tiny_image(h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """A smooth synthetic image with some texture, (1, 3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2]) * 0.6 + 0.2
    return (base + 0.05 * torch.randn(3, h, w, generator=g)).clamp(0, 1).unsqueeze(0)


def fitted_hyperprior(steps: int = 150, seed: int = 0) -> HyperpriorCodec:
    """A tiny hyperprior whose hyper networks and ``z`` priors are fitted to the rate of a few images.

    The transforms stay as built; the gains are spread apart first (finer steps at higher
    levels), which is what training does, without its minutes. One torch thread: a tiny
    model on a shared CPU is several times slower with more.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(steps: int, seed: int) -> HyperpriorCodec:
    torch.manual_seed(seed)
    model = HyperpriorCodec(TINY_HYPER)
    with torch.no_grad():
        log_g = torch.tensor(GAINS).log()[:, None].expand_as(model.log_gain)
        model.log_gain.copy_(log_g)
        model.log_inv_gain.copy_(-log_g)
    x = torch.cat([tiny_image(48, 64, seed=s) for s in range(4) for _ in range(4)])  # every image at every level
    quality = torch.arange(4).repeat(4)
    params = []
    for n, p in model.named_parameters():
        fit = n.startswith(("h_a", "h_s", "z_priors", "log_hyper", "log_inv_hyper"))
        p.requires_grad_(fit)
        params += [p] if fit else []
    opt = torch.optim.Adam(params, lr=0.01)
    model.train()
    for _ in range(steps):
        out = model(x, quality)
        loss = sum(-torch.log2(lik).sum() for lik in out.likelihoods.values()) / x[:, 0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    model.update_tables()
    return model


def save_model_folder(model: torch.nn.Module, folder: str) -> str:
    """config.json + weights.safetensors, as the training script and a compress run write them."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "weights.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"kind": model.kind, "config": model.config.to_dict()}, f)
    return folder
