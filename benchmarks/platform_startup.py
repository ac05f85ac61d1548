"""platform_startup: how long `aeflow platform up` takes, and a trivial deployment run on it vs the same run by hand.

On a new platform directory (under /tmp: PostgreSQL's user must reach it):

1. ``aeflow platform up`` (``python -m flows.platform up``, the same sub-app) with the
   repository's ``prefect.yaml``: wall time of the command and each component's time to
   healthy;
2. a trivial run of the ``reduce`` deployment (400 rows of digits on the platform's S3,
   3 epochs, one thread) from the API call (the UI's Run button) to COMPLETED, executed
   by a Prefect worker on the platform's Dask cluster;
3. side by side, the same run by hand: ``aeflow run reduce`` in a subprocess with the
   platform's environment (same server, Dask scheduler and S3), from the command to its
   exit; the ratio is deployment / by hand;
4. ``aeflow platform down``.

    python -m benchmarks.platform_startup
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import machine, md_table, update_section

REPO = Path(__file__).resolve().parents[1]


def _platform(*args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "flows.platform", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"platform {args[0]} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return time.perf_counter() - t0, res


def main() -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from flows.platform.components import s3_filesystem
    from flows.platform.core import load
    from tasks.sample_data import sample_frame

    directory = Path(tempfile.mkdtemp(prefix="aeflow-platform-bench-", dir="/tmp"))
    directory.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"PREFECT_LOGGING_LEVEL": "INFO", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    try:
        t_up, res = _platform("up", "--dir", str(directory), "--json", "--poll-seconds", "2", env=env)
        info = json.loads(res.stdout)
        fs = s3_filesystem(load(directory))
        uri = f"s3://{info['bucket']}/bench/digits.csv"
        fs.pipe_file(uri, sample_frame("digits").iloc[:400].to_csv(index=False).encode())
        config = {"load": {"input": uri, "label_column": "target", "id_column": "id"}, "model": {"latent_dim": 2},
                  "train": {"epochs": 3, "patience": 3, "batch_size": 64, "threads": 1}}
        with SyncPrefectClient(info["prefect_api_url"]) as c:
            dep = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["reduce"])))[0]
            t0 = time.perf_counter()
            fr = c.create_flow_run_from_deployment(dep.id, parameters={"config": config})
            while not (fr.state and fr.state.is_final()):
                time.sleep(0.5)
                fr = c.read_flow_run(fr.id)
            t_run = time.perf_counter() - t0
        assert fr.state.is_completed(), fr.state
        flow_s = (fr.end_time - fr.start_time).total_seconds()

        by_hand_env = {**env, **info["env"]}
        aeflow = str(Path(sys.executable).parent / "aeflow")
        t0 = time.perf_counter()
        hand = subprocess.run([aeflow, "run", "reduce", "-i", uri, "--label-column", "target", "--id-column", "id",
                               "--latent-dim", "2", "--epochs", "3", "--patience", "3", "--batch-size", "64",
                               "--set", "train.threads=1", "--json", "--quiet"], cwd=REPO, env=by_hand_env,
                              capture_output=True, text=True, timeout=900)
        t_hand = time.perf_counter() - t0
        if hand.returncode != 0:
            raise SystemExit(f"aeflow run failed:\n{hand.stderr[-3000:]}")
        t_down, _ = _platform("down", "--dir", str(directory), env=env)
    finally:
        subprocess.run([sys.executable, "-m", "flows.platform", "down", "--dir", str(directory)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    comps = info["timings"]
    rows = [
        ["`aeflow platform up` (new DIR, 2 workers, 2 Dask workers, prefect.yaml deployed)", f"{t_up:.1f}", "",
         ", ".join(f"{k} {v:.1f}" for k, v in comps.items() if k != "up")],
        ["trivial `reduce` deployment run: API call -> COMPLETED (worker, Dask, S3)", f"{t_run:.1f}",
         f"{t_run / t_hand:.2f}", f"flow run itself {flow_s:.1f} s; the rest is the worker's poll and the flow-run process start"],
        ["the same run by hand: `aeflow run reduce` against the platform (baseline)", f"{t_hand:.1f}", "1.00", ""],
        ["`aeflow platform down`", f"{t_down:.1f}", "", ""],
    ]
    body = (f"Machine: {machine()}. `python -m benchmarks.platform_startup`.\n\n"
            + md_table(["step", "wall s", "ratio to by hand", "detail (s)"], rows))
    update_section("Shared installation start-up (platform_startup.py)", body)
    print(body)
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
