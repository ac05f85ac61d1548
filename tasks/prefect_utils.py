"""Shared Prefect task settings: what is retried, and what is never cached."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from tasks.errors import AeflowError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures (network, object storage outages), never a user's bad input.

    An object-store outage arrives as :class:`~tasks.errors.StorageUnavailable` (one line for
    the user, mapped in ``tasks/storage.py``), which is an :class:`AeflowError` marked
    ``transient``: retried, and if the retries fail too, that one line is the run's error.
    """
    try:
        state.result()
    except AeflowError as e:
        return e.transient
    except Exception:
        return True
    return False


# Tasks pass references and small dataclasses; nothing is worth caching by input hash
# (hashing a Dask graph or a model would be slow and meaningless), so caching is off.
IO_TASK: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_user_error,
}
COMPUTE_TASK: dict[str, Any] = {"cache_policy": NO_CACHE}
