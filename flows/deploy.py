"""``prefect.yaml`` -> deployments, and ``aeflow serve``: a server, the deployments and a runner.

``prefect.yaml`` is the one declarative list of deployments. ``prefect deploy --all``
reads it for an existing server and a work pool; ``aeflow serve`` reads the same
file and serves every deployment from one local process (no work pool needed):
the Prefect ``Runner`` polls the server for scheduled runs and runs each in a
subprocess, which is what a click on the UI's Run button needs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.errors import ConfigError

DEFAULT_FILE = "prefect.yaml"
_ENV_RE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments`` list (the fields aeflow serves)."""

    name: str
    entrypoint: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    tags: tuple[str, ...] = ()
    description: str | None = None
    enforce_parameter_schema: bool = True
    concurrency_limit: int | None = None

    @property
    def module_entrypoint(self) -> str:
        """``flows/orchestration.py:reduce`` -> ``flows.orchestration.reduce`` (loads from any directory)."""
        if ":" not in self.entrypoint:
            return self.entrypoint
        path, attr = self.entrypoint.rsplit(":", 1)
        module = path.removesuffix(".py").replace("/", ".").replace(os.sep, ".").strip(".")
        return f"{module}.{attr}"


def _expand_env(obj: Any) -> Any:
    """Prefect's ``{{ $VAR }}`` templating of prefect.yaml (unset variables are an error)."""
    if isinstance(obj, str):

        def sub(m: re.Match[str]) -> str:
            var = m.group(1)
            if var not in os.environ:
                raise ConfigError(f"prefect.yaml uses {{{{ ${var} }}}} but the environment variable {var} is not set")
            return os.environ[var]

        return _ENV_RE.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: _expand_env(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_env(v) for v in obj]
    return obj


def load_specs(path: str | Path = DEFAULT_FILE, names: list[str] | None = None) -> list[DeploymentSpec]:
    """Read the deployments of a ``prefect.yaml`` (optionally only ``names``)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"deployment file {str(p)!r} does not exist (pass --file)") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"deployment file {str(p)!r} is not valid YAML: {e}") from e
    specs = []
    for i, d in enumerate(doc.get("deployments") or []):
        if not isinstance(d, dict) or "name" not in d or "entrypoint" not in d:
            raise ConfigError(f"{p}: deployments[{i}] needs a name and an entrypoint")
        d = _expand_env(d)
        schedules = tuple(s for s in (d.get("schedules") or []) if isinstance(s, dict))
        specs.append(
            DeploymentSpec(
                name=d["name"],
                entrypoint=d["entrypoint"],
                parameters=d.get("parameters") or {},
                schedules=schedules,
                tags=tuple(d.get("tags") or ()),
                description=d.get("description"),
                enforce_parameter_schema=bool(d.get("enforce_parameter_schema", True)),
                concurrency_limit=d.get("concurrency_limit"),
            )
        )
    if names:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            raise ConfigError(f"no deployment named {unknown} in {p}; it has {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in names]
    return specs


def with_default_deployments(specs: list[DeploymentSpec]) -> list[DeploymentSpec]:
    """``specs`` plus an on-demand deployment for every deployable flow that ``specs`` does not name.

    A newly registered application is thus runnable from the UI as soon as it is in
    the registry; its schedules are added to ``prefect.yaml`` when it needs them.
    """
    from flows.orchestration import ENTRYPOINTS

    named = {s.module_entrypoint.rsplit(".", 1)[-1] for s in specs if s.module_entrypoint.startswith("flows.orchestration.")}
    taken = {s.name for s in specs}
    extra = []
    for attr, fl in ENTRYPOINTS.items():
        if attr in named or fl.name in taken:
            continue
        app_name = attr.removesuffix("_train_apply")
        extra.append(
            DeploymentSpec(
                name=fl.name,
                entrypoint=f"flows/orchestration.py:{attr}",
                tags=("aeflow", app_name),
                description=f"On demand (not in prefect.yaml): {fl.description}",
            )
        )
    return specs + extra


def _schedule(s: dict[str, Any]) -> Any:
    from prefect.schedules import Cron, Interval, RRule

    common = {
        "timezone": s.get("timezone"),
        "active": s.get("active", True),
        "parameters": s.get("parameters") or {},
        "slug": s.get("slug"),
    }
    if "cron" in s:
        return Cron(s["cron"], day_or=s.get("day_or", True), **common)
    if "interval" in s:
        return Interval(s["interval"], anchor_date=s.get("anchor_date"), **common)
    if "rrule" in s:
        return RRule(s["rrule"], **common)
    raise ConfigError(f"schedule {s!r} needs cron, interval or rrule")


def to_runner_deployment(spec: DeploymentSpec, *, paused: bool = False) -> Any:
    """A Prefect ``RunnerDeployment`` of one spec, loaded by module path so it runs from any directory."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.types.entrypoint import EntrypointType

    dep = RunnerDeployment.from_entrypoint(
        spec.module_entrypoint,
        name=spec.name,
        schedules=[_schedule(s) for s in spec.schedules] or None,
        parameters=spec.parameters,
        tags=list(spec.tags),
        description=spec.description,
        enforce_parameter_schema=spec.enforce_parameter_schema,
        concurrency_limit=spec.concurrency_limit,
        paused=paused,
    )
    dep._entrypoint_type = EntrypointType.MODULE_PATH
    return dep


# ------------------------------------------------------------------------------------------
# aeflow serve


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_env(api_url: str, home: str | None = None) -> dict[str, str]:
    """Environment for a local ``prefect server start`` whose UI talks to ``api_url``, offline."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_UI_API_URL": api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    if home:
        env["PREFECT_HOME"] = home
    return env


def start_server(
    host: str, port: int, env: dict[str, str], log_path: str | None = None, timeout: float = 120.0, new_session: bool = True
) -> subprocess.Popen:
    """Start ``prefect server start`` (SQLite in PREFECT_HOME) and wait until it is healthy.

    ``new_session`` puts it in its own process group (stop it with :func:`stop_process_group`),
    so a terminal's Ctrl-C reaches only the caller, which stops the server after its own cleanup.
    The server dies with the caller in any case (``flows/lifeline.py``), even when the caller is
    SIGKILLed and cannot clean up.
    """
    api_url = f"http://{host}:{port}/api"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    from flows.lifeline import command

    proc = subprocess.Popen(
        # Through the lifeline watchdog: the server goes when this process dies, even by SIGKILL.
        command(["-m", "prefect", "server", "start", "--host", host, "--port", str(port)]),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"prefect server exited with code {proc.returncode}" + (f"; see {log_path}" if log_path else ""))
        if api_healthy(api_url):
            return proc
        time.sleep(0.5)
    if new_session:
        stop_process_group(proc)
    else:
        proc.terminate()
        proc.wait(15)
    raise ConfigError(f"prefect server did not become healthy at {api_url} within {timeout:.0f}s")


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of ``proc`` (started with ``start_new_session``), then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def serve_deployments(specs: list[DeploymentSpec], limit: int | None = None) -> None:
    """Register the deployments on the server at PREFECT_API_URL and run them until interrupted."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect reads its settings once at import; the URL may have been chosen after that.
    api_url = os.environ.get("PREFECT_API_URL")
    updates = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(updates=updates):
        deployments = [to_runner_deployment(s) for s in specs]
        serve(*deployments, limit=limit, print_starting_message=True)
