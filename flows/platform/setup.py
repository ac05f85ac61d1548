"""The deploy step of a containerised installation (``infra/``): what ``aeflow platform up`` does once its servers answer.

``python -m flows.platform.setup --api-url URL [--file prefect.yaml]`` creates the
process work pool and the ``training`` tag concurrency limit, Prefect's zombie-flow
automation (containers and pods die with their flow runs; nothing on another machine
sees their processes), and runs ``prefect deploy --all``. Every step is idempotent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flows.platform.components import (
    ensure_pool_and_limit,
    ensure_zombie_automation,
    http_ok,
    run_deploy,
)
from tasks.errors import PlatformError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--api-url", required=True, help="The Prefect API, e.g. http://prefect-server:4200/api.")
    parser.add_argument("--pool", default="aeflow-process")
    parser.add_argument("--training-slots", type=int, default=1, help="Trainings at once (one per GPU).")
    parser.add_argument("--file", type=Path, default=Path("prefect.yaml"), help="The deployments (run from this directory).")
    parser.add_argument("--no-zombie-automation", action="store_true", help="Do not create the heartbeat automation.")
    parser.add_argument("--wait", type=float, default=300, help="Seconds to wait for the API to answer.")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while not http_ok(args.api_url.rstrip("/") + "/ready"):
        if time.monotonic() > deadline:
            print(f"error: the Prefect API at {args.api_url} did not answer within {args.wait:.0f}s", file=sys.stderr)
            return 6
        time.sleep(2)
    try:
        ensure_pool_and_limit(args.api_url, args.pool, args.training_slots)
        if not args.no_zombie_automation:
            ensure_zombie_automation(args.api_url)
        run_deploy(args.api_url, args.file.resolve(), Path.cwd(), Path("/dev/stdout"))
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"pool {args.pool!r}, training limit {args.training_slots}, deployments of {args.file}: ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
