"""benchmarks/train_codec.py at toy scale: the GPU recipe's command on CPU, resuming, lineage, imports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.codec_data import (
    TrainingImage,
    load_images_file,
    pixel_hash,
    save_images,
)
from tests.models.codec_helpers import save_model_folder

pytestmark = [pytest.mark.tasks]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Run as the GPU machine would: a fresh interpreter, then report what it imported.
RUNNER = """
import runpy, sys
sys.argv = ["train_codec", *sys.argv[1:]]
runpy.run_module("benchmarks.train_codec", run_name="__main__")
heavy = [m for m in ("prefect", "dask", "pandas", "constriction", "sklearn", "matplotlib", "skimage", "scipy", "PIL")
         if m in sys.modules]
print("IMPORTED", ",".join(heavy) or "-")
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("imgs") / "train.npz")
    ims = [TrainingImage("noise_rgb", "synthetic", rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
           TrainingImage("ramp_gray", "synthetic", np.tile(np.arange(48, dtype=np.uint8) * 5, (36, 1)))]
    save_images(path, ims)
    return path


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED -" in out.stdout, out.stdout  # only torch, numpy, safetensors: what the GPU machine has
    return out.stdout


def test_images_file_round_trip_and_lineage(images, tmp_path):
    back = load_images_file(images)
    assert [t.name for t in back] == ["noise_rgb", "ramp_gray"]
    assert back[1].pixels.shape == (36, 48) and back[0].lineage()["sha256"] == pixel_hash(back[0].pixels)
    # The earlier format (PNG bytes) still reads; a pixel that does not match its hash is refused.
    import io

    from PIL import Image

    with np.load(images) as z:
        old = {k: z[k] for k in ("names", "sources", "hashes")}
        for i, t in enumerate(back):
            buf = io.BytesIO()
            Image.fromarray(t.pixels).save(buf, format="PNG")
            old[f"png{i:02d}"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **old)
    assert [t.pixels.tobytes() for t in load_images_file(str(tmp_path / "old.npz"))] == [t.pixels.tobytes() for t in back]
    with np.load(images) as z:
        bad = {k: z[k] for k in z.files}
    bad["img01"] = bad["img01"].copy()
    bad["img01"][0, 0] ^= 1
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="ramp_gray does not match its recorded hash"):
        load_images_file(str(tmp_path / "bad.npz"))


def test_scale_pyramid_resamples_like_pillow_without_it():
    """The pyramid (torch's antialiased bicubic) keeps the image's content: within a few grey levels of
    Pillow's Lanczos on a photograph, sizes rounded, too-small scales left out."""
    import skimage.data
    from PIL import Image

    from benchmarks.codec_data import pyramid

    im = skimage.data.astronaut()
    out = pyramid([im], (1.0, 0.7, 0.1), min_side=64)
    assert len(out) == 2 and out[0] is im and out[1].shape == (358, 358, 3) and out[1].dtype == np.uint8
    ref = np.asarray(Image.fromarray(im).resize((358, 358), Image.Resampling.LANCZOS)).astype(float)
    err = out[1].astype(float) - ref
    assert np.abs(err).mean() < 1.0 and 10 * np.log10(255**2 / (err**2).mean()) > 42  # measured 0.61, 46.5 dB
    gray = pyramid([im[..., 0]], (0.5,), min_side=8)[0]
    assert gray.shape == (256, 256) and abs(float(gray.mean()) - float(im[..., 0].mean())) < 1.0


def test_hyperprior_from_a_factorized_codec_then_resumed(images, tmp_path):
    """The GPU command's options at toy scale: --init of a factorized codec, saves, lineage, then --resume."""
    import torch

    from models.codec import CodecConfig, ImageCodec

    torch.manual_seed(0)
    fact = ImageCodec(CodecConfig(channels=8, latent_channels=8, lambdas=(0.01, 0.1)))
    fact.eval()
    fact.update_tables()
    init = save_model_folder(fact, str(tmp_path / "fact"))
    out = tmp_path / "out" / "codec"
    common = ["--kind", "hyperprior", "--images", images, "--device", "cpu", "--patch", "32", "--batch", "2",
              "--lr", "1e-4", "--hyper-lr", "1e-3", "--decay-at", "0.5", "--scales", "1,0.7", "--save-every", "1",
              "--minutes", "0.04"]
    log = _run(*common, "--init", init, "--lambdas", "0.01,0.1,0.3", "--out", str(out))
    assert "hyper-synthesis started at a per-channel Gaussian" in log and "(final)" in log
    meta = json.load(open(out / "config.json"))
    assert meta["kind"] == "hyperprior" and meta["config"]["lambdas"] == [0.01, 0.1, 0.3]
    assert [i["name"] for i in meta["training_images"]] == ["noise_rgb", "ramp_gray"]
    assert meta["heldout_images"] == ["chelsea", "coffee", "rocket", "camera"]
    assert meta["weights"] == "sha256:" + hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    first = meta["steps"]
    assert first > 0 and len(meta["runs"]) == 1 and meta["init"].startswith(init)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "log.json", "state-00.safetensors", "weights.safetensors"], files
    # A second short run on another --out continues from the first one's state: the steps add up.
    out2 = tmp_path / "out2" / "codec"
    log = _run(*common, "--resume", str(out), "--out", str(out2))
    assert f"resuming a hyperprior codec at step {first}" in log
    meta2 = json.load(open(out2 / "config.json"))
    assert meta2["steps"] > first and len(meta2["runs"]) == 2 and meta2["init"] == meta["init"]
    from tasks.codec import load_codec_run

    codec = load_codec_run(str(out2))  # a complete codec with its tables: aeflow compress --model OUT works
    assert codec.model.kind == "hyperprior" and codec.model.config.levels == 3


def test_entropy_only_moves_the_entropy_side_and_nothing_else(images, tmp_path, capsys):
    """--entropy-only from a hyperprior: h_a/h_s/z priors/hyper gains train on latents computed once, the
    transforms and gains are bit for bit the starting ones, and the rate of the same crops falls."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.codec_data import load_images_file
    from benchmarks.train_codec import LatentCrops, load_codec, main
    from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig
    from models.codec_train import make_rate_loss_fn

    torch.manual_seed(0)
    start = HyperpriorCodec(HyperpriorConfig(channels=8, latent_channels=8, lambdas=(0.01, 0.1)))
    start.eval()
    start.update_tables()
    init = save_model_folder(start, str(tmp_path / "start"))
    with open(os.path.join(init, "config.json")) as f:  # as if this script had trained it: lineage to carry on
        prior = json.load(f)
    earlier = [{"device": "cuda", "steps": 7, "seconds": 1.0, "batch": 2, "patch": 32, "lr": 1e-4}]
    prior.update(steps=7, train_seconds=1.0, runs=earlier, init="somewhere (codec, N=8, M=8)")
    with open(os.path.join(init, "config.json"), "w") as f:
        json.dump(prior, f)
    out = tmp_path / "entropy"
    threads = torch.get_num_threads()
    try:  # in this process (the script's imports are checked above): a second interpreter costs seconds
        main(["--kind", "hyperprior", "--init", init, "--entropy-only", "--images", images, "--patch", "32",
              "--batch", "4", "--hyper-lr", "3e-3", "--save-every", "100", "--minutes", "0.03", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert "latents of 2 images and their mirror images" in log and "(final)" in log, log
    meta = json.load(open(out / "config.json"))
    assert meta["runs"][-1]["entropy_only"] is True and meta["steps"] > 7
    assert meta["runs"][0] == earlier[0] and len(meta["runs"]) == 2, "the starting model's runs carry on"
    assert meta["init"] == prior["init"] and meta["continued_from"] == init
    assert meta["runs"][-1]["start_step"] == 7 and meta["steps"] == 7 + meta["runs"][-1]["steps"]
    before = load_file(os.path.join(init, "weights.safetensors"))
    after = load_file(str(out / "weights.safetensors"))
    fixed = [k for k in before if k.startswith(("g_a.", "g_s.", "log_gain", "log_inv_gain"))]
    trained = [k for k in before if k.startswith(("h_a.", "h_s.", "z_priors.", "log_hyper_gain"))]
    assert fixed and all(torch.equal(before[k], after[k]) for k in fixed), "transforms and gains unchanged"
    assert any(not torch.equal(before[k], after[k]) for k in trained), "the entropy side trained"

    ims = [t.pixels for t in load_images_file(images)]
    crops = LatentCrops(start, ims, batch=16, patch=32, seed=5, start=0, device=torch.device("cpu")).next()
    rates = []
    for model in (start, load_codec(str(out))):
        model.eval()
        with torch.no_grad():  # eval mode: rounded latents, the rate the coder sees
            rates.append(float(make_rate_loss_fn(model)(model, crops, torch.Generator().manual_seed(0))))
    assert rates[1] < rates[0], rates


def test_speed_options_train_and_save_a_normal_model(images, tmp_path, capsys):
    """--channels-last --bf16-transforms (the GPU speed options) at toy scale on the CPU: the run records
    them, and what it saves is an ordinary float32 model that loads and codes (weights contiguous)."""
    import torch

    from benchmarks.train_codec import main
    from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig

    torch.manual_seed(0)
    start = HyperpriorCodec(HyperpriorConfig(channels=8, latent_channels=8, lambdas=(0.01, 0.1)))
    start.eval()
    start.update_tables()
    init = save_model_folder(start, str(tmp_path / "start"))
    out = tmp_path / "fast"
    threads = torch.get_num_threads()
    try:
        main(["--kind", "hyperprior", "--init", init, "--images", images, "--patch", "32", "--batch", "2",
              "--lr", "1e-4", "--save-every", "100", "--minutes", "0.03", "--channels-last", "--bf16-transforms",
              "--colour-aug", "0.5", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert "(final)" in capsys.readouterr().out
    run = json.loads((out / "config.json").read_text())["runs"][-1]
    assert run["channels_last"] is True and run["bf16_transforms"] is True and run["steps"] > 0
    assert run["colour_aug"] == 0.5, "the colour augmentation is part of the model's recorded lineage"
    from tasks.codec import load_codec_run

    codec = load_codec_run(str(out))
    x = torch.rand(1, 3, 32, 32)
    assert codec.model.kind == "hyperprior" and codec.model(x, 1).x_hat.dtype == torch.float32


def test_transforms_in_bf16_changes_only_the_transforms_precision():
    import torch

    from models.codec_hyperprior import HyperpriorCodec, HyperpriorConfig
    from models.codec_train import make_loss_fn, transforms_in_bf16

    torch.manual_seed(0)
    model = HyperpriorCodec(HyperpriorConfig(channels=8, latent_channels=8, lambdas=(0.01, 0.1))).eval()
    x = torch.rand(2, 3, 32, 32)
    keys = list(model.state_dict())
    with torch.no_grad():
        y32 = model.g_a(x)
        transforms_in_bf16(model, "cpu")
        y16 = model.g_a(x)
    assert y16.dtype == torch.float32 and not torch.equal(y16, y32)
    assert torch.allclose(y16, y32, rtol=0.05, atol=0.05 * float(y32.abs().max()))
    assert list(model.state_dict()) == keys and all(p.dtype == torch.float32 for p in model.parameters())
    model.train()
    loss = make_loss_fn(model)(model, (x * 255).to(torch.uint8), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_colour_augmentation_saturates_and_permutes_a_share_of_the_crops():
    """--colour-aug: the committed codecs, trained on 18 photographs, brought pure green back as (41, 156, 38)."""
    import numpy as np

    from benchmarks.codec_data import colour_augment

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(64, 3, 8, 8)).astype(np.uint8)
    base[:, 1] = np.clip(base[:, 1].astype(int) + 40, 0, 255)  # greenish crops
    base[0] = 128  # a grey crop stays grey
    assert colour_augment(base, 0.0, seed=1) is base
    a, b = colour_augment(base, 0.5, seed=1), colour_augment(base, 0.5, seed=1)
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == base.shape, "deterministic in the seed"
    changed = [i for i in range(len(base)) if not np.array_equal(a[i], base[i])]
    assert 16 <= len(changed) <= 48, len(changed)
    assert np.array_equal(a[0], base[0])
    spread = lambda x: float((x.max(axis=1).astype(int) - x.min(axis=1)).mean())  # noqa: E731
    assert all(spread(a[i]) >= spread(base[i]) for i in changed), "saturation only rises"
    assert not np.array_equal(colour_augment(base, 0.5, seed=2), a)
    # every crop at p = 1, channel orders other than the original among them
    full = colour_augment(base, 1.0, seed=3)
    greenest = [int(np.argmax(full[i].reshape(3, -1).mean(axis=1))) for i in range(1, len(base))]
    assert set(greenest) == {0, 1, 2}
