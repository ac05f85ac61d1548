"""Image benchmarks: denoise quality/speed, index quality/ANN, Dask image loading.

    python -m benchmarks.images loader ann denoise index   # any subset, in that order

Each part prints a table and merges its numbers into benchmarks/images_results.json.
Fixed seeds; held-out photographs (camera, astronaut, coffee) are never trained on.
Budgets are small on purpose (a shared 2-core CPU): see RESULTS.md for the settings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "images_results.json")


def _save(part: str, data: dict) -> None:
    allr = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    allr[part] = data
    with open(RESULTS, "w") as f:
        json.dump(allr, f, indent=2)
    print(json.dumps({part: data}, indent=2))


def _write_images(d: str, n: int, size: tuple[int, int], fmt: str) -> None:
    """``n`` generated images in 10 class folders: smooth random colour fields plus grain
    (photo-like, so JPEG sizes are realistic); PNG of pure noise for the tiny case."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(n):
        os.makedirs(f"{d}/c{i % 10}", exist_ok=True)
        if fmt == "png":
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            f = rng.uniform(1, 6, (3, 2))
            p = rng.uniform(0, 6.3, (3,))
            chans = [127 + 100 * np.sin(f[c, 0] * 6.3 * xx + f[c, 1] * 6.3 * yy + p[c]) for c in range(3)]
            arr = np.clip(np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(f"{d}/c{i % 10}/{i:05d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))


def _loader_case(n: int, size: tuple[int, int], fmt: str, out_size: int) -> dict:
    from tasks.dask_client import dask_client
    from tasks.images import ImageLoadConfig, decode_image, inspect_images, load_images

    with tempfile.TemporaryDirectory() as d:
        _write_images(d, n, size, fmt)
        src = inspect_images(d)
        cfg = ImageLoadConfig(mode="gray", size=out_size)
        t0 = time.perf_counter()
        for f in src.files:
            with open(f.path, "rb") as fh:
                decode_image(fh.read(), "gray", out_size)
        loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        with dask_client(None, n_workers=2):
            t1 = time.perf_counter()
            imset = load_images(src, cfg, run=None, prefix="x")  # cold: workers import the decoder
            cold_s = time.perf_counter() - t1
            t1 = time.perf_counter()
            imset = load_images(src, cfg, run=None, prefix="x")  # warm workers
            dask_s = time.perf_counter() - t1
        cluster_s = time.perf_counter() - t0 - cold_s - dask_s
        assert len(imset) == n
    return {"images": n, "size": f"{size[0]}x{size[1]} RGB {fmt.upper()} -> {out_size}x{out_size} gray",
            "loop_images_per_s": n / loop, "dask_images_per_s": n / dask_s, "ratio": loop / dask_s,
            "dask_cold_images_per_s": n / cold_s, "cold_ratio": loop / cold_s, "cluster_start_stop_s": cluster_s,
            "workers": 2}


def bench_loader(n: int = 2000) -> None:
    """Dask loader vs a single-threaded loop, 2,000 generated images: photo-sized JPEGs (the
    common case) and tiny PNGs (where per-task overhead dominates)."""
    cases = {"photo": _loader_case(n, (640, 480), "jpg", 64), "tiny": _loader_case(n, (64, 64), "png", 32)}
    _save("loader", {"os_load_average": os.getloadavg()[0], "cases": cases})


def bench_ann(n: int = 100_000, d: int = 128, nq: int = 1000) -> None:
    import faiss

    from tasks.apps.index import Config, build_index, recall_at_k, timed_search

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    out = {}
    # Codes of images live near a low-dimensional manifold: clusters in a 16-D subspace, embedded in d dims.
    centers = rng.normal(size=(200, 16))
    basis = rng.normal(size=(16, d)) / 4
    lab = rng.integers(0, 200, n + nq)
    clustered = ((centers[lab] + 0.5 * rng.normal(size=(n + nq, 16))) @ basis + 0.05 * rng.normal(size=(n + nq, d))).astype(np.float32)
    gaussian = rng.normal(size=(n + nq, d)).astype(np.float32)
    cfg = Config()
    for name, data in (("clustered (16-D manifold)", clustered), ("iid Gaussian (hard case)", gaussian)):
        base, queries = data[:n], data[n:]
        t0 = time.perf_counter()
        hnsw, _ = build_index(base, "hnsw", cfg)
        build = time.perf_counter() - t0
        exact, _ = build_index(base, "exact", cfg)
        _, ei, eqps = timed_search(exact, queries, 10)
        _, ai, aqps = timed_search(hnsw, queries, 10)
        t0 = time.perf_counter()
        ivf, _ = build_index(base, "ivf", cfg)
        ivf_build = time.perf_counter() - t0
        _, ii, iqps = timed_search(ivf, queries, 10)
        t0 = time.perf_counter()
        pq, _ = build_index(base, "ivfpq", cfg)  # nprobe calibrated to the target recall, as HNSW's ef_search
        pq_build = time.perf_counter() - t0
        _, pi, pqps = timed_search(pq, queries, 10)
        out[name] = {"ivfpq_recall_at_10": recall_at_k(pi, ei, 10), "ivfpq_qps": pqps, "ivfpq_speedup": pqps / eqps,
                     "ivfpq_build_s": pq_build, "ivfpq_nprobe_calibrated": int(pq.nprobe),
                     "ivfpq_bytes_per_code": int(pq.pq.code_size), "float_bytes_per_code": 4 * d,
                     "ivfpq_index_mb": faiss.serialize_index(pq).nbytes / 1e6,
                     "hnsw_index_mb": faiss.serialize_index(hnsw).nbytes / 1e6,
                     "hnsw_recall_at_10": recall_at_k(ai, ei, 10), "hnsw_qps": aqps, "exact_qps": eqps,
                     "hnsw_ef_search_calibrated": int(hnsw.hnsw.efSearch),
                     "hnsw_speedup": aqps / eqps, "hnsw_build_s": build,
                     "ivf_recall_at_10": recall_at_k(ii, ei, 10), "ivf_qps": iqps, "ivf_speedup": iqps / eqps,
                     "ivf_build_s": ivf_build}
    _save("ann", {"n": n, "dim": d, "queries": nq, "threads": 2,
                  "os_load_average": os.getloadavg()[0],
                  "settings": {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search,
                               "target_recall": cfg.target_recall,
                               "ivf_nlist": "4*sqrt(n)", "ivf_nprobe": cfg.ivf_nprobe, "pq_bytes": cfg.pq_bytes},
                  "results": out})


def bench_index(size: int = 16, epochs: int | None = None) -> None:
    """precision@10 / mAP on load_digits as ``size`` x ``size`` images, with the index application's
    default model, training settings and loss (``IndexRunConfig()``); ``epochs`` overrides the budget."""
    import dataclasses

    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    from models.training import fit
    from tasks.apps.index import (
        IndexRunConfig,
        encode_images,
        index_loss,
        precision_and_map,
    )
    from tasks.train import settings_from

    dg = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray((im * 255 / 16).round().astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC))[None]
                     for im in dg.images])
    y = dg.target
    q = np.arange(len(y))
    val = np.random.default_rng(0).random(len(y)) < 0.1
    rc = IndexRunConfig()
    settings = dataclasses.replace(settings_from(rc.train), device="cpu", epochs=epochs or rc.train.epochs)
    torch.manual_seed(settings.seed)
    model = rc.model.build(in_channels=1)
    t0 = time.perf_counter()
    result = fit(model, imgs[~val], imgs[val], settings, loss_fn=index_loss(rc.app))
    train_s = time.perf_counter() - t0
    z = encode_images(model, imgs, torch.device("cpu"))
    raw = imgs.reshape(len(y), -1).astype(np.float32) / 255
    n_comp = min(z.shape[1], raw.shape[1])
    pca = PCA(n_comp, random_state=0).fit_transform(raw).astype(np.float32)
    rows = {}
    for name, x in (("ae_codes", z), ("raw_pixels", raw), (f"pca_{n_comp}", pca)):
        p, m = precision_and_map(x, y, q, 10, True)
        rows[name] = {"precision_at_10": p, "map": m, "dim": int(x.shape[1])}
    _save("index", {"images": len(y), "size": size, "model": model.config.to_dict(), "latent_noise": rc.app.latent_noise,
                    "epochs": settings.epochs, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                    "train": {"batch_size": result.batch_size, "lr": settings.lr, "patience": settings.patience,
                              "seed": settings.seed},
                    "train_s": train_s, "results": rows})


DENOISE_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "denoise")


def save_model_folder(folder: str, app: str, model, state: dict, train: dict) -> None:
    """A model folder (``config.json`` + ``weights.safetensors``, the layout of a run's ``model/``)
    that ``aeflow run APP --model FOLDER`` accepts."""
    import hashlib

    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    with open(os.path.join(folder, "weights.safetensors"), "wb") as f:
        f.write(data)
    meta = {"format_version": 1, "kind": model.kind, "config": model.config.to_dict(), "app": app,
            "weights": "sha256:" + hashlib.sha256(data).hexdigest(), "state": state, "train": train}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f, indent=2)


def bench_denoise(patches: int = 8000, epochs: int = 10, sigma: float = 25.0, save_to: str | None = DENOISE_WEIGHTS) -> None:
    import torch
    from PIL import Image

    from models.image_ops import random_patches
    from models.noise import DenoisingLoss, NoiseConfig
    from models.training import TrainSettings, fit
    from tasks.apps.base import Fitted
    from tasks.apps.denoise import _psnr_ssim, baseline_fns, denoise_array
    from tasks.apps.images_base import ConvModelConfig
    from tasks.sample_data import write_photos

    with tempfile.TemporaryDirectory() as d:
        folders = write_photos(d)

        def read(folder):
            out = {}
            for name in sorted(os.listdir(folder)):
                a = np.asarray(Image.open(os.path.join(folder, name)))
                out[name] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            return out

        train, held = read(folders["train"]), read(folders["heldout"])
    planes = [im[c : c + 1] for im in train.values() for c in range(im.shape[0])]
    tp = random_patches(planes, patches, 48, 0)
    vp = random_patches(planes, 256, 48, 1)
    torch.manual_seed(0)
    mcfg = ConvModelConfig(channels=(32, 64, 128), latent_channels=64, blocks=1, skip=True, residual=True)
    model = mcfg.build(1)
    t0 = time.perf_counter()
    res = fit(model, tp, vp, TrainSettings(epochs=epochs, batch_size=32, lr=2e-3, patience=10, device="cpu"),
              loss_fn=DenoisingLoss(NoiseConfig(sigma=sigma)))
    train_s = time.perf_counter() - t0
    fitted = Fitted(model=model.eval())
    if save_to:
        # The demo applies this model to the held-out photographs (`aeflow run denoise --model FOLDER`).
        save_model_folder(save_to, "denoise", model, {"noise": NoiseConfig(sigma=sigma).to_dict(), "patch_size": 48},
                          {"patches": patches, "epochs": epochs, "best_val_loss": res.best_val_loss,
                           "train_s": round(train_s, 1), "images": sorted(train)})
    rng = np.random.default_rng(123)
    s = sigma / 255
    fns = baseline_fns(s)
    methods = ["noisy", "aeflow", "tv", "wavelet", "nl_means", "bm3d"]
    psnr = {m: [] for m in methods}
    ssim = {m: [] for m in methods}
    secs = dict.fromkeys(methods, 0.0)
    mp = 0.0
    per_image = {}
    for name, img in held.items():
        clean = img.astype(np.float32) / 255
        noisy = (clean + rng.normal(0, s, clean.shape)).astype(np.float32)
        mp += clean.shape[1] * clean.shape[2] / 1e6
        outs = {"noisy": noisy}
        t0 = time.perf_counter()
        outs["aeflow"] = denoise_array(fitted, noisy, torch.device("cpu"), 384, 32)
        secs["aeflow"] += time.perf_counter() - t0
        for b in ("tv", "wavelet", "nl_means", "bm3d"):
            t0 = time.perf_counter()
            outs[b] = np.stack([fns[b](noisy[c].astype(np.float64)) for c in range(noisy.shape[0])])
            secs[b] += time.perf_counter() - t0
        per_image[name] = {}
        for m in methods:
            p, q = _psnr_ssim(clean, outs[m])
            psnr[m].append(p)
            ssim[m].append(q)
            per_image[name][m] = round(p, 2)
    table = {m: {"psnr": float(np.mean(psnr[m])), "ssim": float(np.mean(ssim[m])),
                 "seconds_per_mp": secs[m] / mp if m != "noisy" else 0.0} for m in methods}
    _save("denoise", {"sigma": sigma, "heldout": list(held), "train_images": list(train), "patches": patches,
                      "epochs": epochs, "train_s": train_s, "best_val_loss": res.best_val_loss,
                      "model": mcfg.model_dump(), "results": table, "per_image_psnr": per_image})


if __name__ == "__main__":
    parts = sys.argv[1:] or ["loader", "ann", "denoise", "index"]
    for part in parts:
        print(f"== {part}", flush=True)
        {"loader": bench_loader, "ann": bench_ann, "index": bench_index, "denoise": bench_denoise}[part]()
