"""index_scale: what an index run holds as its collection grows — exact vs IVF-PQ, side by side.

`aeflow run index` end to end (the real CLI in a subprocess, 1 epoch) on ``--images``
generated 32x32 grayscale PNGs in 150 class folders, once with ``--index-type exact`` and
once with ``--index-type ivfpq``: peak resident memory of the CLI process (where the index is
built and evaluated) and of the whole process tree (with the Dask LocalCluster workers that
encode the shards), wall time and stages, recall@10 of the index against exact search, QPS.
The codes (2,048 float32 values per image at 32 px) reach the client one stored part at a
time; the client holds the index itself.

    python -m benchmarks.index_scale [--images 150000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks._common import machine, md_table, update_section

WORK = Path(__file__).with_name("_work") / "index_scale"
BIN = Path(sys.executable).parent


def _write_folder(folder: int, per_folder: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(folder)
    yy, xx = np.mgrid[0:32, 0:32]
    out = WORK / f"images-{per_folder}" / f"{folder:03d}"
    out.mkdir(parents=True, exist_ok=True)
    for j in range(per_folder):
        f1, f2 = rng.uniform(2, 8, 2)
        img = 128 + 80 * np.sin(xx / f1 + j) * np.cos(yy / f2) + rng.normal(0, 10, (32, 32))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out / f"i{j:05d}.png")


def generate_images(count: int, folders: int = 150) -> Path:
    """``count`` smooth 32x32 images with grain (sinusoids of random frequencies) in ``folders`` folders."""
    per = count // folders
    root = WORK / f"images-{per}"
    if not (root / "_done").exists():
        with ProcessPoolExecutor(2) as ex:
            list(ex.map(_write_folder, range(folders), [per] * folders))
        (root / "_done").write_text("ok")
    return root


def run_measured(args: list[str], env: dict[str, str]) -> tuple[dict, float, int, int]:
    """``aeflow ARGS --json``: (result, wall s, peak RSS of the CLI process, peak RSS of its process tree)."""
    import json

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "aeflow"), *args, "--json", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak_cli = peak_tree = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    rss.append(0)
            peak_cli, peak_tree = max(peak_cli, rss[0]), max(peak_tree, sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"aeflow {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - t0, peak_cli, peak_tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=150_000, help="collection size (32x32 PNGs)")
    ap.add_argument("--quick", action="store_true", help="3,000 images; nothing written to RESULTS.md")
    args = ap.parse_args()
    n = 3_000 if args.quick else args.images
    data = generate_images(n)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        for kind in ("exact", "ivfpq"):
            result, wall, cli, tree = run_measured(["run", "index", "--input", str(data), "--index-type", kind,
                                                    "--epochs", "1", "--output", tmp,
                                                    "--set", "local_cluster=processes"], env)  # as measured before auto
            m, t = result["metrics"], result["timings"]
            base = (result.get("baselines") or {}).get("exact", {})
            rows.append([kind, f"{m['n_images']:,}", f"{cli / 2**30:.2f}", f"{tree / 2**30:.2f}", f"{wall:.0f}",
                         f"{m['recall_at_10']:.3f}", f"{m['qps']:,.0f}", f"{base.get('qps', float('nan')):,.0f}",
                         ", ".join(f"{k} {v:.0f}" for k, v in t.items())])
            print(rows[-1], flush=True)
    md = md_table(["index", "images", "peak RSS GiB, CLI process", "peak RSS GiB, process tree", "wall s",
                   "recall@10", "QPS", "exact QPS (parts in turn)", "stages (s)"], rows)
    print(md)
    if not args.quick:
        update_section("index at scale (index_scale.py)",
                       f"Machine: {machine()}. `aeflow run index` end to end (CLI subprocess, 1 epoch, default model: "
                       f"2,048-value codes at 32 px) on {n:,} generated 32x32 PNGs in 150 class folders, "
                       "`--index-type exact` and `--index-type ivfpq` in turn; peak RSS of the CLI process (which "
                       "builds and evaluates the index) and of the process tree (with the two LocalCluster "
                       "workers).\n\n" + md)


if __name__ == "__main__":
    WORK.mkdir(parents=True, exist_ok=True)
    main()
