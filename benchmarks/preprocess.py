"""preprocess: aeflow's Dask preprocessing vs single-threaded pandas, and its peak memory.

Both sides do the same work on the same Parquet folder (125k-row files): read, validate
every row with the same pandera schema, flag a seeded 20% validation split,
encode to float32, compute the training rows' scaling statistics, and write
Parquet. aeflow runs ``tasks.preprocess.prepare`` on a 2-worker LocalCluster;
the baseline runs the same per-file functions in a plain loop with pyarrow
threads off. Also reported: peak resident memory (client + workers) of the
aeflow side for 1M and 4M rows — it should not grow with the input.

    python -m benchmarks.preprocess [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._common import PeakRSS, machine, md_table, update_section

ROWS_PER_FILE = 125_000  # a typical daily-partition file; the number of files grows with the input


def make_data(folder: str, rows: int, cols: int = 64) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    per = ROWS_PER_FILE
    for i in range(rows // per):
        x = rng.normal(size=(per, cols)) * rng.uniform(0.5, 3, cols) + rng.uniform(-5, 5, cols)
        df = pd.DataFrame(x, columns=[f"f{j}" for j in range(cols)])
        df.insert(0, "id", np.arange(i * per, (i + 1) * per))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f"{folder}/part{i:02d}.parquet", row_group_size=per)


def baseline(folder: str, out: str) -> float:
    """Single-threaded pandas doing the same steps, file by file then one concat for the statistics."""
    from tasks.config import LoadConfig, PreprocessConfig
    from tasks.load import inspect_table, read_block
    from tasks.preprocess import encode_partition, encoded_columns, split_partition
    from tasks.scaling import ScalingStats, merge_moments, partition_moments

    pa.set_cpu_count(1)
    t0 = time.perf_counter()
    src = inspect_table(folder, LoadConfig(id_column="id"))
    cols = encoded_columns(src.schema)
    moments = []
    os.makedirs(out, exist_ok=True)
    for b in src.blocks:
        df = split_partition(read_block(b, src.schema, src.columns), 0.2, 0, b.index)
        enc = encode_partition(df, src.schema)
        moments.append(partition_moments(enc, cols))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(enc, preserve_index=False), buf)
        with open(f"{out}/part.{b.index:05d}.parquet", "wb") as f:
            f.write(buf.getvalue())
    ScalingStats.from_moments(cols, merge_moments(moments), PreprocessConfig().scaler, [False] * len(cols))
    seconds = time.perf_counter() - t0
    pa.set_cpu_count(os.cpu_count() or 1)
    return seconds


def ours(folder: str, root: str, address: str) -> tuple[float, int]:
    from distributed import Client

    from tasks.config import LoadConfig, PreprocessConfig
    from tasks.load import inspect_table
    from tasks.preprocess import prepare
    from tasks.storage import ArtifactStore

    with Client(address):
        run = ArtifactStore(root).start_run("bench", "0" * 64, {})
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            src = inspect_table(folder, LoadConfig(id_column="id"))
            prepare(src, PreprocessConfig(), run=run)
            seconds = time.perf_counter() - t0
        run.discard()
    return seconds, mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k rows only (smoke run)")
    args = ap.parse_args()
    from distributed import LocalCluster

    sizes = [200_000] if args.quick else [1_000_000, 2_000_000, 4_000_000]
    results = {}
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for rows in sizes:
            folder = f"{tmp}/in-{rows}"
            make_data(folder, rows)
            ours(folder, f"{tmp}/warm", cluster.scheduler_address)  # warm the workers' imports
            o, peak = ours(folder, f"{tmp}/art-{rows}", cluster.scheduler_address)
            b = baseline(folder, f"{tmp}/base-{rows}") if rows == 2_000_000 or args.quick else None
            results[rows] = (o, b, peak)
            print(f"{rows:,} rows: aeflow {o:.1f}s" + (f", pandas {b:.1f}s, speed-up {b / o:.2f}x" if b else "") + f", peak RSS {peak / 2**20:,.0f} MiB", flush=True)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    rows_out = []
    for rows, (o, b, peak) in results.items():
        rows_out.append([f"{rows:,} x 64", f"{o:.1f}", f"{b:.1f}" if b else "", f"{b / o:.2f}x" if b else "", f"{peak / 2**20:,.0f}"])
    table = md_table(["rows", "aeflow (2 Dask workers) s", "single-threaded pandas s", "speed-up", "aeflow peak RSS MiB"], rows_out)
    if not args.quick:
        s2 = results[2_000_000]
        m1, m4 = results[1_000_000][2], results[4_000_000][2]
        verdict = (
            f"Speed-up at 2M rows: {s2[1] / s2[0]:.2f}x (target >= 1.6: {'met' if s2[1] / s2[0] >= 1.6 else 'missed'}). "
            f"Peak memory 4M vs 1M rows: {m4 / m1:.2f}x (it should stay ~1x: {'met' if m4 / m1 < 1.3 else 'missed'})."
        )
        update_section("Dask preprocessing (preprocess.py)", f"Machine: {machine()}.\n\n{table}\n\n{verdict}")
    print(table)


if __name__ == "__main__":
    main()
