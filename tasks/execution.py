"""Where a run executes: the platform's run-time defaults, and what the manifest records about it.

Two environment variables give a run its defaults on a shared installation
(``aeflow platform up`` sets them for its workers and prints them for clients):

- ``AEFLOW_OUTPUT``: the artifact root of a run whose config does not set ``output``
  (e.g. ``s3://aeflow/artifacts``); otherwise ``./artifacts``.
- ``AEFLOW_DASK_ADDRESS``: the Dask scheduler of a run whose config does not set
  ``dask_address`` (e.g. ``tcp://127.0.0.1:8786``); otherwise a ``LocalCluster``.

Both are read when a run starts, in the process that executes it (a worker's flow
run), never at import time: one installed package serves every environment.
"""

from __future__ import annotations

import os
import socket
from typing import Any

OUTPUT_ENV = "AEFLOW_OUTPUT"
DASK_ENV = "AEFLOW_DASK_ADDRESS"
WORKER_ENVS = ("PREFECT__WORKER_NAME", "AEFLOW_WORKER_NAME")


def default_output() -> str | None:
    """The artifact root from ``AEFLOW_OUTPUT`` (None when unset or empty)."""
    return os.environ.get(OUTPUT_ENV) or None


def default_dask_address() -> str | None:
    """The Dask scheduler from ``AEFLOW_DASK_ADDRESS`` (None when unset or empty)."""
    return os.environ.get(DASK_ENV) or None


def with_environment_defaults(config: Any) -> Any:
    """``config`` with ``output`` and ``dask_address`` filled from the environment where it leaves them unset.

    ``output`` counts as unset when the config was built without it (pydantic's
    ``model_fields_set``): a deployment or command that names ``./artifacts``
    explicitly keeps it.
    """
    update: dict[str, Any] = {}
    out = default_output()
    if out and "output" not in config.model_fields_set:
        update["output"] = out
    dask = default_dask_address()
    if dask and not config.dask_address:
        update["dask_address"] = dask
    return config.model_copy(update=update) if update else config


def dask_cluster_info(address: str | None, timeout: float = 10.0) -> dict[str, Any]:
    """The scheduler and how many workers and threads it has now (a LocalCluster when no address)."""
    if not address:
        return {"scheduler": None, "cluster": "LocalCluster in the flow run's process"}
    try:
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
        return {
            "scheduler": address,
            "workers": len(workers),
            "threads": sum(int(w.get("nthreads") or 0) for w in workers.values()),
            "worker_names": sorted(str(w.get("name")) for w in workers.values()),
        }
    except Exception as e:  # the record is metadata: never fail a finished run for it
        return {"scheduler": address, "error": f"{type(e).__name__}: {e}"}


def execution_info(config: Any, device: Any, local_cluster: str | None = None) -> dict[str, Any]:
    """Where this run executed: host and process, Prefect flow run and worker, Dask cluster, training device.

    Args:
        config: The run's config (its ``dask_address`` names the cluster).
        device: The device training ran on (``fitted.train.device``, or the chosen one).
        local_cluster: Without ``dask_address``, what the run's LocalCluster ran its tasks on
            (``"processes"`` or ``"threads"``).
    """
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device)}
    prefect: dict[str, Any] = {}
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        fr = ctx.flow_run if ctx is not None else None
        if fr is not None:
            prefect = {
                "flow_run_id": str(fr.id),
                "flow_run_name": fr.name,
                "deployment_id": str(fr.deployment_id) if fr.deployment_id else None,
                "work_pool": fr.work_pool_name,
                "work_queue": fr.work_queue_name,
            }
    except Exception:  # outside Prefect (a plain function call in a test)
        prefect = {}
    worker = next((os.environ[k] for k in WORKER_ENVS if os.environ.get(k)), None)
    prefect["worker"] = worker
    info["prefect"] = prefect
    info["dask"] = dask_cluster_info(config.dask_address)
    if not config.dask_address and local_cluster:
        info["dask"]["workers_are"] = local_cluster
    return info
