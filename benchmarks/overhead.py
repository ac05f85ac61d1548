"""overhead: `aeflow run reduce` on 200k x 64 rows, wall time vs the sum of its stages' compute.

Runs the real CLI in a subprocess (as a user would), reads the stage timings from
the run's manifest, and reports orchestration overhead = (wall - sum of stages) /
wall; target <= 15%. Two settings: Prefect's ephemeral mode (the CLI starts a
temporary API server itself) and against an already running Prefect server
(PREFECT_API_URL set, as in a deployment).

    python -m benchmarks.overhead [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pandas as pd

from benchmarks._common import machine, md_table, update_section


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(data: str, out: str, epochs: int, env: dict[str, str], extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    aeflow = os.path.join(os.path.dirname(sys.executable), "aeflow")
    cmd = [aeflow, "run", "reduce", "--input", data, "--id-column", "id", "--latent-dim", "8",
           "--epochs", str(epochs), "--patience", str(epochs), "--output", out, "--json", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k rows, 3 epochs (smoke run)")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    rows, epochs = (20_000, 3) if args.quick else (200_000, args.epochs)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        df = pd.DataFrame(rng.normal(size=(rows, 64)).astype("float32"), columns=[f"f{i}" for i in range(64)])
        df.insert(0, "id", np.arange(rows))
        data = f"{tmp}/data.parquet"
        df.to_parquet(data, index=False)
        size_mb = os.path.getsize(data) / 2**20

        settings = [("ephemeral Prefect (CLI starts its own API)", dict(env), ())]
        port = _free_port()
        server_env = {**env, "PREFECT_HOME": f"{tmp}/prefect-home", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        server = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
                    break
                except Exception:
                    time.sleep(1)
            settings.append(("running Prefect server (PREFECT_API_URL)", server_env, ()))
            # the same, with the LocalCluster's workers as processes (what every run had before local_cluster=auto)
            settings.append(("running Prefect server, `--set local_cluster=processes`", server_env,
                             ("--set", "local_cluster=processes")))
            for label, e, extra in settings:
                wall, result = run_cli(data, f"{tmp}/out", epochs, e, extra)
                stages = sum(result["timings"].values())
                overhead = (wall - stages) / wall
                print(f"{label}: wall {wall:.1f}s, stages {stages:.1f}s, overhead {overhead:.1%}", flush=True)
                detail = ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items())
                table.append([label, f"{wall:.1f}", f"{stages:.1f}", f"{overhead:.1%}", "yes" if overhead <= 0.15 else f"**no** (+{overhead - 0.15:.1%})", detail])
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    md = md_table(["setting", "wall s", "sum of stages s", "overhead", "meets <= 15%", "stages (s)"], table)
    if not args.quick:
        update_section(
            "Orchestration overhead (overhead.py)",
            f"Machine: {machine()}. `aeflow run reduce` on {rows:,} x 64 rows (Parquet), latent 8, {epochs} epochs, "
            "CLI in a subprocess; overhead = wall time not spent in a stage (interpreter start and imports, Prefect API "
            "start or connection, Dask LocalCluster start and stop, task bookkeeping, manifest). The input is "
            f"{size_mb:.0f} MB: `local_cluster=auto` gives the run's LocalCluster worker threads "
            "(up to 256 MB); the last row forces worker processes, which import torch and pandas at every run.\n\n" + md,
        )
    print(md)


if __name__ == "__main__":
    main()
