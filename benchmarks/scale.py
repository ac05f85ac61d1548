"""scale: the cost of a run as its data grows — memory flat, time linear, apply spread over the cluster.

`aeflow run reduce` end to end (the real CLI in a subprocess: preprocessing, 1 epoch of
training, apply, evaluation, manifest) on generated tables of 32 float32 columns:

- at each size (default 1M, 4M, 16M rows), the **streaming** path (``train.stream=auto``,
  the default) and the **in-memory** path (``train.stream=off``): peak resident memory of the
  whole process tree (the CLI, Prefect's temporary API server, the Dask LocalCluster's workers)
  and seconds per million rows;
- **apply throughput** with 1 and 2 Dask worker processes of one thread each (a real
  ``dask scheduler`` + ``dask worker`` processes; ``--dask-address``): the trained model applied
  to the largest table that has run, rows/s from the manifest's apply timing;
- one **image app**: denoise (the committed benchmark model) applied to 20,000 generated
  64x64 images with 1 and 2 workers.

    python -m benchmarks.scale [--sizes 1,4,16] [--images 20000] [--quick] [--resume]

Goals (issue): the 16M run's peak within 1.3x of the 1M run's, the 1M run <= ~1.5 GB,
seconds per million rows at 16M within 1.2x of 4M, 2 workers >= 1.7x one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, md_table, update_section

WORK = Path(__file__).with_name("_work") / "scale"
BIN = Path(sys.executable).parent
ROWS_PER_FILE = 1_000_000
COLUMNS = 32


def generate_table(rows: int) -> Path:
    """``rows`` x 32 float32 (correlated: 8 factors + noise) with an id, as Parquet files of 1M rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = WORK / f"table-{rows}"
    if (out / "_done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mix = np.random.default_rng(0).normal(size=(8, COLUMNS)).astype("float32")
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        rng = np.random.default_rng(i + 1)
        x = rng.normal(size=(n, 8)).astype("float32") @ mix + 0.1 * rng.normal(size=(n, COLUMNS)).astype("float32")
        cols = {"id": pa.array(np.arange(start, start + n, dtype="int64"))}
        cols.update({f"f{j}": pa.array(x[:, j]) for j in range(COLUMNS)})
        pq.write_table(pa.table(cols), out / f"part-{i:04d}.parquet", row_group_size=250_000)
    (out / "_done").write_text("ok")
    return out


def generate_images(count: int, size: int = 64) -> Path:
    from PIL import Image

    out = WORK / f"images-{count}"
    if (out / "_done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        folder = out / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        f1, f2 = rng.uniform(3, 12, 2)
        img = 128 + 60 * np.sin(xx / f1 + i) * np.cos(yy / f2) + rng.normal(0, 25, (size, size))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"im{i:05d}.png")
    (out / "_done").write_text("ok")
    return out


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_cli(args: list[str], env: dict[str, str]) -> tuple[dict, float, int]:
    """Run ``aeflow ARGS --json``; returns (result, wall seconds, peak RSS of the process tree in bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "aeflow"), *args, "--json", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"aeflow {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaskCluster:
    """A real ``dask scheduler`` and ``n`` ``dask worker`` processes of one thread each."""

    def __init__(self, n: int, env: dict[str, str]) -> None:
        self.n, self.env, self.procs = n, env, []

    def __enter__(self) -> str:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                            "--no-dashboard"], env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([str(BIN / "dask"), "worker", self.address, "--nthreads", "1",
                                                "--nworkers", "1", "--no-dashboard", "--memory-limit", "0"],
                                               env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        from distributed import Client

        with Client(self.address, timeout="60s") as c:
            c.wait_for_workers(self.n, timeout=120)
        return self.address

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


STATE = WORK / "state.json"
OUT = WORK / "out"


def save_state(state: dict, quick: bool) -> None:
    """What has been measured so far, for ``--resume`` (not for ``--quick`` runs)."""
    if not quick:
        WORK.mkdir(parents=True, exist_ok=True)
        STATE.write_text(json.dumps(state, indent=1))


def gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="table sizes in millions of rows")
    ap.add_argument("--in-memory-sizes", default=None, help="sizes for the in-memory path (default: the same)")
    ap.add_argument("--images", type=int, default=20_000, help="images for the image-app apply throughput")
    ap.add_argument("--quick", action="store_true", help="0.05M/0.2M rows, 500 images; nothing written to RESULTS.md")
    ap.add_argument("--resume", action="store_true",
                    help=f"keep the runs already measured (saved in {STATE.relative_to(WORK.parent.parent)} after each one) "
                         "and measure only what is missing")
    args = ap.parse_args()
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    mem_sizes = [int(float(s) * 1e6) for s in (args.in_memory_sizes or args.sizes).split(",")]
    n_images = args.images
    if args.quick:
        sizes, mem_sizes, n_images = [50_000, 200_000], [50_000], 500
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    # Dask worker processes at every size (local_cluster=auto would give the smallest sizes worker threads):
    # the table compares sizes on one execution path.
    common = ["--id-column", "id", "--latent-dim", "8", "--epochs", "1", "--patience", "1", "--set", "train.threads=1",
              "--set", "local_cluster=processes"]
    rows_out: list[list[str]] = []
    runs: dict[int, str] = {}
    peaks: dict[tuple[str, int], int] = {}
    per_m: dict[tuple[str, int], float] = {}
    state = json.loads(STATE.read_text()) if args.resume and STATE.exists() else {"rows": {}}
    kept = OUT / "streaming"  # the streaming runs' models stay for the apply measurements (and --resume)
    if not args.resume:
        shutil.rmtree(OUT, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=WORK.parent if WORK.parent.exists() else None) as tmp:
        for mode, wanted in (("streaming", sizes), ("in memory", mem_sizes)):
            for rows in wanted:
                done = state["rows"].get(f"{mode}/{rows}")
                if done:  # measured by an earlier invocation (--resume)
                    rows_out.append(done["row"])
                    peaks[(mode, rows)], per_m[(mode, rows)] = done["peak"], done["per_m"]
                    if done.get("run_uri") and os.path.exists(done["run_uri"]):
                        runs[rows] = done["run_uri"]
                    continue
                data = generate_table(rows)
                stream = "auto" if mode == "streaming" else "off"
                out_dir = str(kept) if mode == "streaming" else f"{tmp}/out"
                try:
                    result, wall, peak = run_cli(["run", "reduce", "--input", str(data), "--output", out_dir,
                                                  *common, "--set", f"train.stream={stream}"], env)
                except RuntimeError as e:
                    print(f"{mode} {rows:,}: failed: {str(e)[-300:]}", flush=True)
                    rows_out.append([mode, f"{rows / 1e6:g}M", "failed", "", "", "", str(e).splitlines()[-1][:80]])
                    continue
                t = result["timings"]
                peaks[(mode, rows)], per_m[(mode, rows)] = peak, wall / (rows / 1e6)
                if mode == "streaming":
                    runs[rows] = result["run_uri"]
                stages = ", ".join(f"{k} {v:.0f}" for k, v in t.items())
                rows_out.append([mode, f"{rows / 1e6:g}M", gib(peak), f"{wall:.0f}", f"{wall / (rows / 1e6):.1f}",
                                 f"{rows / max(t.get('apply', 1e-9), 1e-9):,.0f}", stages])
                print(rows_out[-1], flush=True)
                state["rows"][f"{mode}/{rows}"] = {"row": rows_out[-1], "peak": peak, "per_m": per_m[(mode, rows)],
                                                   "run_uri": result["run_uri"] if mode == "streaming" else None}
                save_state(state, args.quick)
                shutil.rmtree(f"{tmp}/out", ignore_errors=True) if mode == "in memory" else None

        # Apply throughput on a real cluster of 1 and 2 single-thread workers, on the largest table.
        apply_rows: list[list[str]] = []
        rows = max(sizes)
        data = generate_table(rows)
        if not runs:  # the trained models are gone (an earlier invocation's): train one on the smallest table
            result, _, _ = run_cli(["run", "reduce", "--input", str(generate_table(min(sizes))), "--output", str(kept),
                                    *common], env)
            runs[min(sizes)] = result["run_uri"]
        trained_on = max(runs)
        rates = {}
        for n in (1, 2):
            with DaskCluster(n, env) as address:
                result, wall, _ = run_cli(["run", "reduce", "--model", runs[trained_on], "--apply-to", str(data),
                                           "--output", f"{tmp}/apply", "--dask-address", address,
                                           "--id-column", "id"], env)
            rates[n] = rows / result["timings"]["apply"]
            apply_rows.append([f"reduce, {rows / 1e6:g}M rows (model trained on {trained_on / 1e6:g}M)", str(n),
                               f"{rates[n]:,.0f}", f"{result['timings']['apply']:.1f}", f"{rates[n] / rates[1]:.2f}x"])
            print(apply_rows[-1], flush=True)
        # The image app: denoise with the committed benchmark model.
        images = generate_images(n_images)
        model = Path(__file__).with_name("weights") / "denoise"
        rates = {}
        for n in (1, 2):
            with DaskCluster(n, env) as address:
                result, wall, _ = run_cli(["run", "denoise", "--model", str(model), "--apply-to", str(images),
                                           "--output", f"{tmp}/img", "--dask-address", address], env)
            rates[n] = n_images / result["timings"]["apply"]
            apply_rows.append([f"denoise, {n_images:,} images 64x64", str(n), f"{rates[n]:,.1f}",
                               f"{result['timings']['apply']:.1f}", f"{rates[n] / rates[1]:.2f}x"])
            print(apply_rows[-1], flush=True)

    goals = []
    small, big = min(sizes), max(sizes)
    if ("streaming", small) in peaks and ("streaming", big) in peaks:
        ratio = peaks[("streaming", big)] / peaks[("streaming", small)]
        goals.append(f"peak memory {big / 1e6:g}M / {small / 1e6:g}M: {ratio:.2f}x (goal <= 1.3x); "
                     f"{small / 1e6:g}M run {gib(peaks[('streaming', small)])} GiB (goal <= ~1.5 GB)")
    mids = sorted(r for (m, r) in per_m if m == "streaming")
    if len(mids) >= 2:
        a, b = mids[-2], mids[-1]
        goals.append(f"seconds per million rows {b / 1e6:g}M / {a / 1e6:g}M: "
                     f"{per_m[('streaming', b)] / per_m[('streaming', a)]:.2f}x (goal <= 1.2x)")
    md = (md_table(["training path", "rows", "peak RSS GiB (process tree)", "wall s", "s per M rows", "apply rows/s",
                    "stages (s)"], rows_out)
          + "\n\nApply on a real Dask cluster (`dask scheduler` + N `dask worker --nthreads 1`), the model trained above:\n\n"
          + md_table(["apply", "workers", "rows (images) / s", "apply s", "vs 1 worker"], apply_rows)
          + "\n\n" + "\n".join(f"- {g}" for g in goals))
    print(md)
    if not args.quick:
        update_section("Scale: data larger than memory (scale.py)",
                       f"Machine: {machine()}. `aeflow run reduce` end to end (CLI subprocess, 1 epoch, latent 8, "
                       f"32 float32 columns, Parquet files of 1M rows); peak RSS summed over the CLI and all its "
                       f"children (Prefect's temporary API server, Dask LocalCluster workers).\n\n" + md)


if __name__ == "__main__":
    main()
