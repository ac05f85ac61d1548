"""The artifact store: the one place that builds paths.

Layout under a root (``./artifacts`` by default, ``s3://bucket/prefix`` in
production; s3fs takes endpoint and keys from the environment, e.g.
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` or ``FSSPEC_S3_ENDPOINT_URL``)::

    {root}/runs/{app}/{run_id}/manifest.json        written last: the run is complete
                               _run.json            while running: fingerprint, for resume
                               checkpoint/          while running: per-epoch training state
                               model/config.json    model kind, config and fitted state
                               model/weights.safetensors
                               ...outputs, report/

                               _claims/NNNNNN.json  while running: who works on the run (pid, host, heartbeat)

A failed run leaves no manifest (readers ignore such directories) and never
touches another run. Weights and checkpoints are safetensors: loading never
unpickles.

Durability rules (what a kill, a power loss or an outage can leave behind):

- **No file appears half-written under its final name.** Local files are written to a
  temporary name in the same folder, flushed to disk, then renamed; on object stores a
  file is one PUT (or one multipart upload completed only when the writer closes without
  error), which S3 makes visible atomically. Streamed writes (:meth:`RunDir.open`) follow
  the same rule, and an error inside the ``with`` block discards the file.
- **The manifest is the only completion marker.** Anything else in a run folder without a
  manifest is ignored by readers, and removed when the run is resumed or discarded.
- **Checkpoints are verified, and replaced as a whole.** ``checkpoint/meta.json`` names the
  state file (``state-<hash>.safetensors``, written first) and records its size and SHA-256;
  writing ``meta.json`` is the commit, so a kill between the two writes leaves the previous
  checkpoint in force. A checkpoint that does not match, or does not parse, raises
  :class:`CheckpointError` and training starts over (``tasks/train.py``).
- **Saved weights are verified.** ``model/config.json`` records the SHA-256 of
  ``weights.safetensors`` (``"weights"``); loading refuses a mismatch
  (:class:`~tasks.errors.ModelMismatchError`) and warns when no hash is recorded.
- **One worker per unfinished run.** A run folder is *claimed* before it is used: an
  exclusive create of ``_claims/<generation>.json`` (locally a whole temporary file hard-linked to that name, a conditional
  ``If-None-Match: *`` PUT on S3) holding the owner's pid, host and a heartbeat refreshed
  every :data:`HEARTBEAT_S` seconds. A claim is stale when its heartbeat is older than
  :data:`STALE_AFTER_S`, or its process is gone (same host). A stale claim is taken over
  by creating the next generation, again exclusively, so two takers cannot both win. An
  identical run started while another holds the claim starts a run folder of its own.
  (A store that ignores ``If-None-Match`` overwrites instead of refusing; the claim is then
  read back to see who won, which narrows the race to a read's latency without closing it.)
- **Outages are one line.** :func:`storage_error` is the one place that turns
  botocore/aiohttp/connection failures into :class:`~tasks.errors.StorageUnavailable`
  (exit 4, naming the endpoint and the operation; Prefect task retries retry it).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import DEFAULT_OUTPUT
from tasks.errors import (
    AeflowError,
    ConfigError,
    ModelMismatchError,
    StorageError,
    StorageUnavailable,
)

MANIFEST = "manifest.json"
RUN_MARKER = "_run.json"
CHECKPOINT_DIR = "checkpoint"
CLAIMS_DIR = "_claims"
MODEL_DIR = "model"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEARTBEAT_S = 20.0
"""How often a process refreshes the heartbeat of the runs it has claimed."""
STALE_AFTER_S = 120.0
"""A claim whose heartbeat is older than this is stale (its owner died on another host)."""
_CONCURRENT_READS = 16
"""Requests in flight at once when a listing reads many runs of an object store (one request each)."""
_MTIME_SLACK = 3600.0
"""Seconds by which a run's ``created`` may follow its folder's modification time (another host's clock, an
NFS server's, a coarse file system) without :meth:`ArtifactStore.newest_run` missing it."""

log = logging.getLogger("aeflow.storage")


class FileRecord(BaseModel):
    """An input or output file with its size and content hash."""

    model_config = ConfigDict(frozen=True)
    path: str
    size: int
    hash: str


class Manifest(BaseModel):
    """What a complete run records; its presence means the run is complete."""

    model_config = ConfigDict(protected_namespaces=())

    format_version: int = 1
    app: str
    run_id: str
    run_uri: str
    created: datetime
    finished: datetime
    fingerprint: str
    inputs: dict[str, list[FileRecord]] = Field(default_factory=dict)
    model_run: str | None = None
    config: dict[str, Any]
    versions: dict[str, str] = Field(default_factory=dict)
    device: str = ""
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float | int | None] = Field(default_factory=dict)
    baselines: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    outputs: list[FileRecord] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)

    def output_uri(self, rel: str) -> str:
        return join_uri(self.run_uri, rel)


def join_uri(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.url_to_fs`` with errors that name the URI.

    A URI holding credentials (``s3://KEY:SECRET@bucket``, ``?password=...``) is refused here, the one door
    every URI goes through (also those that pass no config model: ``runs list/show``, ``search --index``,
    ``compress --model``): s3fs would take ``KEY:SECRET@bucket`` for a bucket name and botocore's error
    repeated it (:func:`~tasks.redaction.refuse_credentials`: exit 2, the secret masked).
    """
    from tasks.redaction import refuse_credentials

    refuse_credentials(str(uri), "URI")
    try:
        fs, path = fsspec.core.url_to_fs(uri, **_s3_options(uri))
    except (ValueError, ImportError) as e:
        raise StorageError(f"cannot open {uri!r}: {e}") from e
    return fs, path


# An S3 endpoint that accepts connections and never answers (a wrong port: another server, a black-holing
# proxy) kept `aeflow runs list` silent for more than 400 s: botocore's 60 s read timeout times its 5 attempts
# times s3fs' 5 retries is 25 minutes per call, before the task retries. A 10 s read timeout bounds that to
# about 4 minutes; the retry counts stay as they were, so that a store restarting (connection refused, at once)
# is still ridden out (fewer retries failed a run through a 25 s SeaweedFS restart that it had survived); a
# store that answers is not slowed, and a slow answer is retried, not failed. The user's own fsspec
# configuration (~/.config/fsspec, FSSPEC_S3='{"config_kwargs": {...}}') wins over each of them.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 10}


def _s3_options(uri: str) -> dict[str, Any]:
    """Timeouts for an ``s3://`` URI's filesystem (nothing for other protocols)."""
    if fsspec.core.split_protocol(str(uri))[0] not in ("s3", "s3a"):
        return {}
    user = fsspec.config.conf.get("s3") or {}
    # a copy: botocore may rewrite what it is given (its retries mapping, when a user's config has one)
    return {"config_kwargs": copy.deepcopy({**S3_CONFIG, **(user.get("config_kwargs") or {})})}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for ``path`` that ``url_to_fs`` maps back to the same file."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def hash_file(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------
# Outages: the one place that maps object-store failures to StorageError


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e``, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo.extend([x.__cause__, x.__context__])
        todo.extend(getattr(x, "exceptions", ()) or ())


def _endpoint_of(e: BaseException) -> str:
    """The object store's address as the failure names it (or as the environment sets it)."""
    for x in causes(e):
        url = (getattr(x, "kwargs", None) or {}).get("endpoint_url")
        if url:
            parts = urlsplit(str(url))
            return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url)
        host, port = getattr(x, "host", None), getattr(x, "port", None)
        if isinstance(host, str) and port:
            return f"{host}:{port}"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return "the default AWS S3 endpoint"


def _first_line(e: BaseException) -> str:
    """One short line of ``e``: pydantic's first error (where and what), else its message's first line."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            return f"{where}: {first['msg']}" if where else str(first["msg"])
        except Exception:  # noqa: BLE001 - any other .errors(): fall back to the message
            pass
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _short_reason(e: BaseException) -> str:
    innermost = list(causes(e))[-1]
    if isinstance(innermost, ConnectionRefusedError):
        return "connection refused"
    if isinstance(innermost, TimeoutError) or "timeout" in type(innermost).__name__.lower():
        return "timed out"
    if isinstance(innermost, socket.gaierror):
        return "host name not found"
    if isinstance(innermost, ConnectionResetError):
        return "connection reset"
    return type(innermost).__name__


_SERVER_TROUBLE = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy",
                   "ThrottlingException", "RequestTimeTooSkewed"}


def _server_trouble(x: BaseException) -> str | None:
    """The error code of an object store that answered but failed (HTTP 5xx, throttling), or None."""
    response = getattr(x, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    if code in _SERVER_TROUBLE or int(status) >= 500:
        return code or f"HTTP {status}"
    return None


_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}


def _failure_kind(x: BaseException) -> str | None:
    """'unreachable', 'unavailable', 'credentials', 'denied' or None for one exception (not its causes)."""
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover - s3fs is a dependency
        bce = None
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        aiohttp = None
    if bce is not None:
        if isinstance(x, (bce.ConnectionError, bce.HTTPClientError)):
            return "unreachable"
        if isinstance(x, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return "credentials"
        code = str((getattr(x, "response", None) or {}).get("Error", {}).get("Code", ""))
        if isinstance(x, bce.ClientError) and code in _DENIED_CODES:
            return "denied"
    if isinstance(x, PermissionError):  # s3fs's 403 (wrong keys, no access), or a local file's mode bits
        return "denied"
    if aiohttp is not None and isinstance(x, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return "unreachable"
    if isinstance(x, (ConnectionError, TimeoutError, socket.gaierror)):
        return "unreachable"
    if _server_trouble(x):
        return "unavailable"
    return None


def storage_error(e: BaseException, op: str, uri: str) -> StorageError | None:
    """What a failure of ``op`` (a verb: "read", "write", "list") on ``uri`` means for the user.

    Returns :class:`~tasks.errors.StorageUnavailable` (transient: retried) when the object
    store cannot be reached, a plain :class:`~tasks.errors.StorageError` when it has no
    credentials, and None when ``e`` is not an object-store failure (a bug, or bad data,
    which keep their own handling). The message is one line naming the endpoint and the
    operation, never a botocore traceback.
    """
    if isinstance(e, AeflowError):
        return None
    what = f"{op} {uri}" if uri else op
    for x in causes(e):
        kind = _failure_kind(x)
        if kind == "unreachable":
            return StorageUnavailable(
                f"cannot {what}: the object store at {_endpoint_of(e)} is unreachable ({_short_reason(e)}); "
                "run the same command again when it is back"
            )
        if kind == "unavailable":  # it answered, with a server error (5xx) or throttling
            return StorageUnavailable(
                f"cannot {what}: the object store at {_endpoint_of(e)} failed ({_server_trouble(x)}); "
                "run the same command again when it is back"
            )
        if kind == "credentials":
            return StorageError(
                f"cannot {what}: no credentials for the object store at {_endpoint_of(e)} "
                "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
            )
        if kind == "denied":
            if uri and "://" not in uri:  # a local path
                return StorageError(f"cannot {what}: permission denied ({_first_line(x)})")
            return StorageError(
                f"cannot {what}: the object store at {_endpoint_of(e)} refused access ({_first_line(x)}): "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile) and the bucket's permissions"
            )
    return None


@contextlib.contextmanager
def storage_op(op: str, uri: str) -> Iterator[None]:
    """Run object-store I/O; an outage becomes one :class:`StorageError` line naming ``op`` and ``uri``."""
    try:
        yield
    except Exception as e:
        mapped = storage_error(e, op, uri)
        if mapped is None:
            raise
        # Not chained (`from None`): botocore errors do not always survive pickling back from a
        # Dask worker, and the message already says everything the user needs.
        raise mapped from None


# ---------------------------------------------------------------------------------------
# Atomic writes


class _AtomicFile(io.BufferedWriter):
    """A file written under a temporary name and published on :meth:`close` (rename or upload).

    :meth:`discard` (called by ``with`` on an error, and on garbage collection of a file
    never closed) throws the data away: the final name never holds a partial file.
    """

    def __init__(self, tmp: str, publish: Any) -> None:
        # O_EXCL: never write through a link planted at the temporary name.
        super().__init__(io.FileIO(tmp, "xb"))
        self._tmp, self._publish, self._done = tmp, publish, False

    def close(self) -> None:
        if self._done or self.closed:
            return
        self._done = True
        try:
            self.flush()
            os.fsync(self.fileno())
        finally:
            super().close()
        try:
            self._publish(self._tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        if exc_type is not None:
            self.discard()
        else:
            self.close()

    def __del__(self) -> None:  # never publish what nobody closed
        self.discard()


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> _AtomicFile:
    """A binary file that appears at ``path`` only when closed without error.

    Locally: a temporary file beside ``path``, fsynced, then renamed (a rename replaces a
    symlink at ``path`` instead of writing through it). Elsewhere: a local temporary file
    uploaded on close (S3 publishes an upload atomically when it completes).
    """
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)

        def rename(tmp: str) -> None:
            os.replace(tmp, path)
            _fsync_dir(folder)

        return _AtomicFile(f"{path}.tmp-{uuid.uuid4().hex[:12]}", rename)
    fd, tmp = tempfile.mkstemp(prefix="aeflow-upload-")
    os.close(fd)
    os.unlink(tmp)

    def upload(local: str) -> None:
        with storage_op("write", to_uri(fs, path)):
            fs.put_file(local, path)

    return _AtomicFile(tmp, upload)


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file atomically (see :func:`open_atomic`); one PUT on object stores."""
    if is_local(fs):
        with open_atomic(fs, path) as f:
            f.write(data)
        return
    with storage_op("write", to_uri(fs, path)):
        fs.pipe_file(path, data)


def read_uri(uri: str) -> bytes:
    """The bytes of the file at ``uri`` (an outage is one :class:`~tasks.errors.StorageUnavailable` line)."""
    fs, path = url_to_fs(uri)
    with storage_op("read", uri):
        return fs.cat_file(path)


def cat_small(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A small file's bytes (a manifest, a marker, a config.json) in one request: s3fs asks an object's size
    first (a HEAD) to fetch a large one in parallel parts, which doubles the requests, and so the latency, of
    every small read; a listing reads one small file per run."""
    if getattr(fs, "max_concurrency", 1) > 1:  # s3fs
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def write_uri(uri: str, data: bytes) -> str:
    """:func:`write_file` at a URI (Dask workers write partitions and shards with it)."""
    fs, path = url_to_fs(uri)
    write_file(fs, path, data)
    return uri


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CheckpointError(StorageError):
    """A training checkpoint is damaged (torn, truncated, or not matching its recorded hash)."""


def bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """Whether ``bucket`` exists; an unreachable store raises (s3fs's ``exists`` would say False)."""
    call_s3 = getattr(fs, "call_s3", None)
    if call_s3 is None:
        return fs.exists(bucket)
    try:
        call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return False
    except PermissionError:  # cannot inspect it, but it is there
        return True
    return True


def refuse_empty_root(root: str, option: str = "--output") -> None:
    """An empty artifact root (``-o "$OUT"`` with OUT unset) wrote runs into the working directory."""
    if not str(root).strip():
        raise ConfigError(f"{option} is empty (an unset variable?): give a folder or s3://bucket/prefix, or leave "
                          f"it out for $AEFLOW_OUTPUT, else ./artifacts")


def shown_uri(uri: str) -> str:
    """A URI as messages show it: a local path absolute (against this process's working directory), as the
    messages about one of its files show that file; an object store's URI as given."""
    if "://" in str(uri) or os.path.isabs(str(uri)):
        return str(uri)
    return os.path.abspath(str(uri))


def relative_note(uri: str) -> str:
    """For a message about a local path given relative: where it was looked for (the process's working
    directory, on this host: on a worker that is the project directory of *its* machine, not the object store)."""
    if "://" in str(uri) or os.path.isabs(str(uri)):
        return ""
    return f" (a relative path, read from {os.getcwd()} on {socket.gethostname()})"


def nothing_at(fs: fsspec.AbstractFileSystem, path: str, uri: str, what: str) -> str:
    """Why there is nothing at ``uri`` (``what`` names it, e.g. "input"): a missing bucket, or no such path
    (a glob: no file matches it)."""
    missing = "matches no file" if any(ch in path for ch in "*?[") else "does not exist"
    if is_local(fs):
        return f"{what} {uri} {missing}{relative_note(uri)}"
    bucket = path.split("/")[0]
    try:
        bucket_ok = bucket_exists(fs, bucket)
    except Exception:  # unreachable: the listing before this would have said so
        bucket_ok = True
    if not bucket_ok:
        return f"cannot read {what} {uri}: bucket {bucket!r} does not exist"
    return f"{what} {uri} {missing}"


def _bucket_missing(e: BaseException) -> bool:
    text = str(e)
    return "NoSuchBucket" in text or "bucket does not exist" in text.lower()


def new_run_id(fingerprint: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{fingerprint[:8]}"


# The shape of the ids :func:`new_run_id` gives (``start_run`` adds ``-2``, ``-3`` ... when the second is taken).
_MADE_RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z-([0-9a-f]{8})(?:-\d+)?$")


def _made_for(run_id: str) -> str | None:
    """The fingerprint prefix in a run id of :func:`new_run_id`'s shape (None for another name: ``--run-id``)."""
    m = _MADE_RUN_ID_RE.match(run_id)
    return m[1] if m else None


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------
# Model files: one reader, verifying the recorded weights hash


def read_model_files(fs: fsspec.AbstractFileSystem, folder: str, uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.json`` and the tensors of ``weights.safetensors`` in ``folder``, verified, never unpickled.

    ``config.json: "weights"`` (written at save time) is the SHA-256 of the weights file; a
    file that no longer matches it is refused. A folder without a recorded hash (saved by
    hand or by an older version) is accepted with a warning.

    Raises:
        StorageError: a file is missing, unreadable, or config.json is not JSON.
        ModelMismatchError: the weights do not match their recorded hash, or do not parse.
    """
    from safetensors.torch import load

    with storage_op("read the model in", uri):
        try:
            raw_meta = fs.cat_file(f"{folder}/config.json")
        except FileNotFoundError as e:
            raise StorageError(f"{uri} has no saved model (config.json is missing)") from e
        try:
            data = fs.cat_file(f"{folder}/weights.safetensors")
        except FileNotFoundError as e:
            raise StorageError(f"{uri} has no weights.safetensors beside its config.json") from e
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri}/config.json is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise StorageError(f"{uri}/config.json must hold a JSON object")
    recorded, actual = meta.get("weights"), _sha256(data)
    if recorded is None:
        log.warning("%s: config.json records no SHA-256 of weights.safetensors, so the weights cannot be verified "
                    "(they were not saved by aeflow's run, or by an older version)", uri)
    elif recorded != actual:
        raise ModelMismatchError(
            f"{uri}/weights.safetensors does not match the SHA-256 recorded in config.json when it was saved "
            f"(recorded {str(recorded)[:19]}…, found {actual[:19]}…): the weights were modified or damaged; "
            "refusing to use them"
        )
    try:
        return meta, load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ModelMismatchError(f"{uri}/weights.safetensors is not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------
# Claims: one worker per unfinished run


_HOST = socket.gethostname()
_ACTIVE: dict[str, tuple[fsspec.AbstractFileSystem, str, dict[str, Any]]] = {}  # claim path -> (fs, path, record)
_ACTIVE_LOCK = threading.Lock()
# Held while a heartbeat is written: a claim given up waits for the write in flight, which otherwise landed after
# the claim was removed and brought it back (a finished run's folder got a claim again, a discarded one reappeared).
_BEAT_LOCK = threading.Lock()
_HEARTBEAT: threading.Thread | None = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def claim_is_stale(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether a claim's owner is gone: its heartbeat is too old, or (same host) its process is dead."""
    now = time.time() if now is None else now
    if now - float(record.get("heartbeat", 0)) > STALE_AFTER_S:
        return True
    if record.get("host") == _HOST:
        pid = int(record.get("pid", -1))
        if pid == os.getpid():  # this process: alive, but is the attempt that claimed it still working?
            with _ACTIVE_LOCK:
                return record.get("owner") not in {r["owner"] for _, _, r in _ACTIVE.values()}
        return not _pid_alive(pid)
    return False


def _heartbeat_loop() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _ACTIVE_LOCK:
            paths = list(_ACTIVE)
        for path in paths:
            with _BEAT_LOCK:
                with _ACTIVE_LOCK:
                    entry = _ACTIVE.get(path)
                if entry is None:  # given up meanwhile
                    continue
                fs, _, record = entry
                record["heartbeat"] = time.time()
                try:
                    with storage_op("refresh the claim", path):
                        write_file(fs, path, json.dumps(record).encode())
                except Exception as e:  # an outage: the run itself will report it
                    log.debug("heartbeat of %s failed: %s", path, e)


def _start_heartbeat() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is None or not _HEARTBEAT.is_alive():
        _HEARTBEAT = threading.Thread(target=_heartbeat_loop, name="aeflow-claims", daemon=True)
        _HEARTBEAT.start()


def _precondition_failed(e: BaseException) -> bool:
    """Whether a conditional write was refused because the key exists (HTTP 412 / PreconditionFailed)."""
    for x in causes(e):
        response = getattr(x, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412") or status in (409, 412):
            return True
        text = str(x)
        if "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text:
            return True
    return False


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` only if it does not exist; False if it does (someone else won)."""
    if is_local(fs):
        # Whole before it has its name: written under a temporary name, then hard-linked to ``path`` (which
        # fails when it exists). Created in place, a claim was empty for a moment: a process that read it then
        # took it for no claim and created the next generation, and both resumed the same run.
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links (some FUSE mounts): created in place, as before
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(folder)
        return True
    try:
        # A conditional PUT (If-None-Match: *): AWS S3, MinIO and moto refuse it when the key exists.
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as e:
        if _precondition_failed(e):
            return False
        raise
    # Fallback for stores that ignore the condition and overwrite: the record holds a unique owner,
    # so reading it back tells who won (a narrow race remains there; conditional writes close it).
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------
# Runs


@dataclass
class RunDir:
    """One run's directory. All reads and writes of a run go through here."""

    fs: fsspec.AbstractFileSystem
    path: str
    app: str
    run_id: str
    # Who works on the run through this object (set by :meth:`claim`): one attempt, one owner.
    owner: str | None = field(default=None, compare=False, repr=False)

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.path)

    def path_of(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if not is_local(self.fs) else os.path.join(self.path, rel)

    def uri_of(self, rel: str) -> str:
        return to_uri(self.fs, self.path_of(rel))

    def exists(self, rel: str = "") -> bool:
        with storage_op("read", self.uri_of(rel) if rel else self.uri):
            return self.fs.exists(self.path_of(rel) if rel else self.path)

    # -- bytes, JSON ---------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole file atomically: temp file + rename locally, one PUT on object stores."""
        path = self.path_of(rel)
        try:
            write_file(self.fs, path, data)
        except StorageError:
            raise
        except (OSError, PermissionError) as e:
            if _bucket_missing(e):
                raise StorageError(f"cannot write {self.uri_of(rel)}: the bucket does not exist") from e
            raise StorageError(f"cannot write {self.uri_of(rel)}: {e}") from e
        return self.uri_of(rel)

    def read_bytes(self, rel: str, *, small: bool = False) -> bytes:
        """The file's bytes; ``small`` (a JSON file): one request on an object store (:func:`cat_small`)."""
        try:
            with storage_op("read", self.uri_of(rel)):
                return cat_small(self.fs, self.path_of(rel)) if small else self.fs.cat_file(self.path_of(rel))
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri_of(rel)} does not exist") from e

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel, small=True))

    def open(self, rel: str, mode: str = "rb"):
        """A file of the run. Written files (``"wb"``) appear only when closed without error
        (:func:`open_atomic`): a kill or an exception never leaves a partial file under ``rel``."""
        if "w" in mode:
            if mode != "wb":
                raise ValueError(f"RunDir.open writes whole binary files ('wb'), not {mode!r}")
            return open_atomic(self.fs, self.path_of(rel))
        with storage_op("read", self.uri_of(rel)):
            return self.fs.open(self.path_of(rel), mode)

    def makedirs(self, rel: str) -> str:
        path = self.path_of(rel)
        with storage_op("create", self.uri_of(rel)):
            self.fs.makedirs(path, exist_ok=True)
        return path

    # -- models --------------------------------------------------------------------
    def save_model(self, kind: str, config: dict[str, Any], state_dict: dict[str, Any], extra: dict[str, Any]) -> str:
        """Save ``model/config.json`` (kind, config, fitted state) and ``model/weights.safetensors``."""
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
        self.write_bytes(f"{MODEL_DIR}/weights.safetensors", data)
        self.write_json(
            f"{MODEL_DIR}/config.json",
            {"format_version": 1, "kind": kind, "config": config, "app": self.app, "weights": _sha256(data), **extra},
        )
        return self.uri_of(MODEL_DIR)

    def load_model_files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (config.json contents, state dict), the weights verified against their recorded hash."""
        if not self.exists(f"{MODEL_DIR}/config.json"):
            try:
                used = self.manifest().model_run  # a run that applied another run's model saves none of its own
            except Exception:  # noqa: BLE001 - no readable manifest: the plain message
                used = None
            if used:
                raise StorageError(f"{self.uri} has no saved model: that run applied the model of {used} (it was "
                                   f"given --model); pass --model {used}")
            raise StorageError(f"{self.uri} has no saved model (model/config.json is missing)")
        return read_model_files(self.fs, self.path_of(MODEL_DIR).replace(os.sep, "/"), self.uri_of(MODEL_DIR))

    # -- checkpoints ---------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        """The tensors under a name of their own, then ``meta.json`` naming them (the commit), then the old state.

        Each file is atomic, and the pair is too: the state is written to
        ``state-<sha256 prefix>.safetensors`` beside the previous one, and only the new
        ``meta.json`` (recording its name, size and SHA-256) makes it the checkpoint. A kill
        between the two writes leaves the previous checkpoint whole (and an orphan state file
        that the next save removes), so a resumed run loses at most one checkpoint's progress.
        """
        from safetensors.torch import save

        data = save(tensors)
        digest = _sha256(data)
        name = f"state-{digest.removeprefix('sha256:')[:16]}.safetensors"
        self.write_bytes(f"{CHECKPOINT_DIR}/{name}", data)
        self.write_json(f"{CHECKPOINT_DIR}/meta.json", {**meta, "state_file": {"name": name, "size": len(data), "hash": digest}})
        folder = self.path_of(CHECKPOINT_DIR)
        with storage_op("clean up", self.uri_of(CHECKPOINT_DIR)):
            self.fs.invalidate_cache(folder)
            for entry in self.fs.ls(folder, detail=False):
                base = posixpath.basename(entry.replace(os.sep, "/"))
                if base.endswith(".safetensors") and base.startswith("state") and base != name:
                    self.fs.rm(entry)

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The saved training state, or None when there is none.

        Raises:
            CheckpointError: the checkpoint is damaged (torn by a kill during a write by an
                older version, truncated, or not the state its ``meta.json`` describes).
        """
        from safetensors.torch import load

        if not self.exists(f"{CHECKPOINT_DIR}/meta.json"):
            return None
        where = self.uri_of(CHECKPOINT_DIR)
        try:
            meta = self.read_json(f"{CHECKPOINT_DIR}/meta.json")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}/meta.json is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}/meta.json does not hold a JSON object")
        recorded = meta.pop("state_file", None)
        # checkpoints written before the state had a name of its own: state.safetensors
        name = recorded.get("name") if isinstance(recorded, dict) else None
        name = name if isinstance(name, str) and "/" not in name else "state.safetensors"
        try:
            data = self.read_bytes(f"{CHECKPOINT_DIR}/{name}")
        except StorageError as e:
            if e.transient:
                raise
            raise CheckpointError(f"{where}/{name} is missing") from e
        if isinstance(recorded, dict) and (recorded.get("size") != len(data) or recorded.get("hash") != _sha256(data)):
            raise CheckpointError(
                f"{where}/{name} ({len(data)} bytes) is not the state meta.json describes "
                f"({recorded.get('size')} bytes, {str(recorded.get('hash'))[:19]}…)"
            )
        try:
            return load(data), meta
        except Exception as e:  # safetensors' own error types
            raise CheckpointError(f"{where}/{name} cannot be read ({e})") from e

    # -- claims --------------------------------------------------------------------
    def _claims(self) -> list[tuple[int, str]]:
        folder = self.path_of(CLAIMS_DIR)
        with storage_op("list", self.uri_of(CLAIMS_DIR)):
            self.fs.invalidate_cache(folder)
            try:
                names = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                return []
        out = []
        for p in names:
            stem = posixpath.basename(p.replace(os.sep, "/").rstrip("/")).removesuffix(".json")
            if stem.isdigit():
                out.append((int(stem), p))
        return sorted(out)

    def _latest_claim(self) -> dict[str, Any] | None:
        claims = self._claims()
        if not claims:
            return None
        try:
            with storage_op("read the claim of", self.uri):
                return json.loads(self.fs.cat_file(claims[-1][1]))
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # removed right now (the run finished), or damaged: the exclusive create decides

    def claim_holder(self) -> dict[str, Any] | None:
        """The live claim on this run of another owner (pid, host, heartbeat), or None."""
        record = self._latest_claim()
        if record is None or record.get("owner") == self.owner or claim_is_stale(record):
            return None
        return record

    def claim(self) -> bool:
        """Claim this run for this :class:`RunDir` (one run attempt): True if it is ours now, False
        if another live owner holds it. A stale claim is taken over by creating the next
        generation exclusively, so of two processes taking it over at once only one wins."""
        claims = self._claims()
        record = self._latest_claim() if claims else None
        if record is not None and record.get("owner") == self.owner:
            return True
        if record is not None and not claim_is_stale(record):
            return False
        generation = claims[-1][0] + 1 if claims else 1
        path = self.path_of(f"{CLAIMS_DIR}/{generation:06d}.json")
        now = time.time()
        owner = self.owner or uuid.uuid4().hex
        mine = {"owner": owner, "pid": os.getpid(), "host": _HOST, "generation": generation, "started": now,
                "heartbeat": now}
        data = json.dumps(mine).encode()
        try:
            with storage_op("claim", self.uri):
                won = _create_exclusive(self.fs, path, data)
            if won:
                self.owner = owner
                with _ACTIVE_LOCK:
                    _ACTIVE[path] = (self.fs, path, mine)
                _start_heartbeat()
        except BaseException:
            # Ctrl-C or an error between the exclusive create and this attempt taking the run up: nobody would
            # give that claim back, and a new run's folder was left holding only ``_claims/``
            self._take_back_claim(path, data)
            raise
        return won

    def _take_back_claim(self, path: str, data: bytes) -> None:
        """Remove the claim ``path`` if it is the one this attempt created (``data``), then the ``_claims``
        folder and the run folder when that leaves them empty (a new run's). Best effort."""
        with _BEAT_LOCK, _ACTIVE_LOCK:
            _ACTIVE.pop(path, None)
        try:
            if self.fs.cat_file(path) == data:
                self.fs.rm(path)
            if is_local(self.fs):
                for folder in (self.path_of(CLAIMS_DIR), self.path):
                    os.rmdir(folder)  # only when empty
                self._remove_empty_parents()
        except Exception as e:  # noqa: BLE001 - not ours, not empty, or an outage: what is left is found stale
            log.debug("claim %s not taken back: %s", path, e)

    def _forget_claim(self) -> None:
        prefix = self.path_of(CLAIMS_DIR)
        with _BEAT_LOCK, _ACTIVE_LOCK:
            for key in [k for k, (_, _, r) in _ACTIVE.items() if k.startswith(prefix) and r["owner"] == self.owner]:
                del _ACTIVE[key]

    def release(self) -> None:
        """Give up this attempt's claim (the run is complete or discarded)."""
        self._forget_claim()
        self.remove(CLAIMS_DIR)

    # -- completion ----------------------------------------------------------------
    def list_files(self, exclude: tuple[str, ...] = (CHECKPOINT_DIR, RUN_MARKER, MANIFEST, CLAIMS_DIR)) -> list[str]:
        """Relative POSIX paths of every file in the run, sorted."""
        with storage_op("list", self.uri):
            if not self.fs.exists(self.path):
                return []
            root = self.fs._strip_protocol(self.path).rstrip("/")
            found = self.fs.find(self.path)
        rels = []
        for p in found:
            rel = p[len(root) :].lstrip("/").replace(os.sep, "/")
            if rel.split("/")[0] in exclude or ".tmp-" in rel:
                continue
            rels.append(rel)
        return sorted(rels)

    def output_records(self) -> list[FileRecord]:
        with storage_op("read", self.uri):
            return [
                FileRecord(path=rel, size=int(self.fs.size(self.path_of(rel))), hash=hash_file(self.fs, self.path_of(rel)))
                for rel in self.list_files()
            ]

    def write_manifest(self, manifest: Manifest) -> str:
        """Write ``manifest.json`` (anything secret-looking redacted). Call last: its presence means
        the run is complete."""
        from tasks.redaction import redact_obj

        clean = Manifest.model_validate(redact_obj(manifest.model_dump(mode="json")))
        # The manifest first, then what only an unfinished run needs: a kill at any point leaves the folder
        # resumable (marker + checkpoint) or complete. The checkpoint and the marker went first, and a kill before
        # the manifest left a folder that was neither (its training lost, listed nowhere).
        uri = self.write_bytes(MANIFEST, clean.model_dump_json(indent=2).encode())
        try:
            self.drop_leftovers()
        except Exception as e:  # noqa: BLE001 - an outage: the run is complete all the same
            log.warning("%s is complete, but its checkpoint or in-progress marker could not be removed (%s); "
                        "readers ignore them, and the next run of the same input and config removes them", self.uri, e)
        return uri

    def drop_leftovers(self) -> None:
        """Remove from a complete run what only an unfinished run needs: the checkpoint, the claims (this
        attempt's, or a dead one's: a kill right after the manifest), and last the in-progress marker, so that
        a complete run with a marker is one that may hold leftovers (:meth:`ArtifactStore._tidy_complete`)."""
        try:
            self.remove(CHECKPOINT_DIR)
        finally:
            self._forget_claim()  # whatever happens: no heartbeat keeps a finished run's claim alive
        self.remove(CLAIMS_DIR)
        self.remove(RUN_MARKER)

    @property
    def is_complete(self) -> bool:
        return self.exists(MANIFEST)

    def manifest(self) -> Manifest:
        if not self.is_complete:
            raise StorageError(f"{self.uri} is not a complete run (no manifest.json)")
        data = self.read_bytes(MANIFEST, small=True)
        try:
            return Manifest.model_validate_json(data)
        except ValueError as e:  # pydantic's ValidationError (bad JSON too) is a ValueError
            raise StorageError(f"{self.uri}: its manifest.json cannot be read ({_first_line(e)}): the run is damaged or "
                               "was written by an incompatible aeflow") from None

    def remove(self, rel: str) -> None:
        path = self.path_of(rel)
        with storage_op("remove", self.uri_of(rel)):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def clear_partial(self) -> None:
        """Remove what an earlier attempt left (outputs, temporary files); keep what resumes it:
        the checkpoint, the fingerprint marker and the claims."""
        keep = {CHECKPOINT_DIR, RUN_MARKER, CLAIMS_DIR}
        with storage_op("clean up", self.uri):
            self.fs.invalidate_cache(self.path)
            if not self.fs.exists(self.path):
                return
            for entry in self.fs.ls(self.path, detail=False):
                if posixpath.basename(entry.replace(os.sep, "/").rstrip("/")) not in keep:
                    self.fs.rm(entry, recursive=True)
            ckpt = self.path_of(CHECKPOINT_DIR)
            if self.fs.exists(ckpt):
                for entry in self.fs.ls(ckpt, detail=False):
                    if ".tmp-" in posixpath.basename(entry.replace(os.sep, "/")):
                        self.fs.rm(entry)

    def _remove_empty_parents(self) -> None:
        """``runs/<app>`` and ``runs`` of a local store when the removed run left them empty (a failed
        first run left the folders behind); the output folder is the store's to remove
        (:meth:`ArtifactStore.remove_created_if_empty`: only when that run created it). Object stores have no folders."""
        if not is_local(self.fs):
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        for _ in range(2):  # runs/<app>, then runs
            try:
                os.rmdir(parent)  # only when empty (another run's files keep it)
            except OSError:
                return
            parent = os.path.dirname(parent)

    def discard(self, keep_checkpoint: bool = True) -> None:
        """Undo a failed run: delete its outputs; keep only what lets a rerun resume.

        The checkpoint and the fingerprint marker stay when a checkpoint exists,
        so the next run of the same (app, input, config) continues training
        where this one stopped. No manifest is ever left, and the claim is released;
        a run whose manifest was written before the failure is complete and stays so.
        ``keep_checkpoint=False`` (a failure the same command would meet again: bad
        input or configuration, whose fix changes the fingerprint) removes it all.
        Best effort: when the store itself fails (an outage), what is left has no
        manifest, so readers ignore it, and the next run of the same command
        removes it (:meth:`clear_partial`).
        """
        try:
            if not self.exists():
                return
            if self.is_complete:  # interrupted after its manifest was written, while its leftovers went
                try:
                    self.drop_leftovers()
                except Exception as e:  # noqa: BLE001 - the run is complete all the same
                    log.warning("%s is complete, but its checkpoint or in-progress marker could not be removed (%s)",
                                self.uri, e)
                return
            if not keep_checkpoint or not self.exists(f"{CHECKPOINT_DIR}/meta.json"):
                self._forget_claim()  # first: no heartbeat writes the claim back into the removed folder
                with storage_op("remove", self.uri):
                    self.fs.rm(self.path, recursive=True)
                    self._remove_empty_parents()
                return
            try:
                self.clear_partial()
            finally:
                self.release()  # even when the outputs could not all go: the claim must not outlive the attempt
        except Exception as e:
            log.warning("could not remove what the failed run left in %s (%s); it has no manifest, so readers "
                        "ignore it, and the next run of the same command clears it", self.uri, e)
        finally:
            self._forget_claim()


@contextlib.contextmanager
def _given_back_on_error(run: RunDir) -> Iterator[None]:
    """From a claim until the caller owns the run (``run_app``'s ``try``): an error or Ctrl-C gives the claim
    back, keeping what resumes the run (:meth:`RunDir.discard`). Nothing did, and the run's folder kept a claim
    of nobody's; a new run's held only ``_claims/`` (neither complete nor resumable, listed nowhere)."""
    try:
        yield
    except BaseException:
        run.discard(keep_checkpoint=True)
        raise


class ArtifactStore:
    """Runs under one root (local folder or ``s3://bucket/prefix``)."""

    def __init__(self, root: str = DEFAULT_OUTPUT) -> None:
        refuse_empty_root(root)
        self.root_uri = root
        self.fs, path = url_to_fs(root)
        self.root = os.path.abspath(path) if is_local(self.fs) else path.rstrip("/")
        self._created: list[str] = []  # the local folders check_writable made, the root first

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_uri!r})"

    def remove_created_if_empty(self) -> None:
        """Remove the output folder (and the parents) that :meth:`check_writable` created, when a failed run
        left them empty: a run refused by its data left an empty ``-o`` folder behind. Best effort."""
        for folder in self._created:
            try:
                os.rmdir(folder)  # only when empty: another run's files keep it
            except OSError:
                return
        self._created = []

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts) if is_local(self.fs) else posixpath.join(self.root, *parts)

    def run(self, app: str, run_id: str) -> RunDir:
        if not _RUN_ID_RE.match(run_id):
            raise StorageError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-'")
        return RunDir(self.fs, self._join("runs", app, run_id), app, run_id)

    def check_writable(self) -> None:
        """Fail early (before any work) when the root cannot be written, e.g. a missing bucket."""
        if is_local(self.fs):
            missing, folder = [], self.root
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                missing.append(folder)
                folder = os.path.dirname(folder)
            try:
                os.makedirs(self.root, exist_ok=True)
                self._created = missing
            except OSError as e:
                raise StorageError(f"cannot create artifact root {self.root_uri!r}: {e}") from e
            return
        bucket = self.root.split("/")[0]
        try:
            with storage_op("reach the artifact root", self.root_uri):
                exists = bucket_exists(self.fs, bucket)
        except StorageError:
            raise
        except Exception as e:  # credentials, endpoint
            raise StorageError(f"cannot reach artifact root {self.root_uri!r}: {e}") from e
        if not exists:
            raise StorageError(f"cannot write to {self.root_uri!r}: bucket {bucket!r} does not exist")

    def start_run(self, app: str, fingerprint: str, config: dict[str, Any], run_id: str | None = None) -> RunDir:
        """Claim the directory of a new run, or an interrupted run of the same fingerprint.

        Never returns a complete run: with an explicit ``run_id`` that already has a
        manifest this raises, so earlier results are never overwritten. An interrupted
        run is resumed only by one process at a time (its claim); an identical run
        started meanwhile gets a folder of its own. What an interrupted attempt left
        besides its checkpoint is removed first.
        """
        marker = {"app": app, "fingerprint": fingerprint, "created": datetime.now(UTC).isoformat(), "config": config}
        if run_id is None:
            for run in self._incomplete(app, fingerprint):
                if run.claim():
                    with _given_back_on_error(run):
                        if run.is_complete:  # finished between our look and our claim
                            run.release()
                            continue
                        run.clear_partial()
                    return run
            base = new_run_id(fingerprint)
            for n in range(1, 1000):
                run = self.run(app, base if n == 1 else f"{base}-{n}")
                if not run.exists() and run.claim():
                    with _given_back_on_error(run):
                        run.write_json(RUN_MARKER, {**marker, "run_id": run.run_id})
                    return run
            raise StorageError(f"cannot find a free run id under {self.root_uri} for {base}")
        run = self.run(app, run_id)
        if run.is_complete:
            # the --run-id the user gave names a finished run: a setting to change (exit 2), not a storage fault
            raise ConfigError(f"run {run.uri} already exists and is complete; choose another --run-id (its results "
                              "are kept: a finished run is never overwritten)")
        # a run id in use by a live process is the user's to change, like a complete one (exit 2); it was exit 4
        # (storage), and one running with other settings was called "an interrupted run"
        holder = run.claim_holder()
        if holder is None and run.exists(RUN_MARKER):
            if run.read_json(RUN_MARKER).get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"run {run.uri} holds an interrupted run with a different input or config; choose another "
                    "--run-id (or run the same command as before to resume it)"
                )
        if holder is not None or not run.claim():
            holder = holder or run.claim_holder() or {}
            since = datetime.fromtimestamp(float(holder.get("started", 0)), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            raise ConfigError(
                f"run {run.uri} is being run by process {holder.get('pid')} on {holder.get('host')} (since {since}); "
                "wait for it to finish or choose another --run-id"
            )
        with _given_back_on_error(run):
            if run.exists(RUN_MARKER):
                run.clear_partial()
            else:
                run.write_json(RUN_MARKER, {**marker, "run_id": run_id})
        return run

    def _run_dirs(self, app: str | None = None) -> list[RunDir]:
        base = self._join("runs")
        with storage_op("list the runs in", self.root_uri):
            # A folder gone between a look and a read holds no run: the failed first run of the root (or of the
            # app) took it, with the empty runs/<app> and runs/ (``_remove_empty_parents``). It was a traceback.
            try:
                if not self.fs.exists(base):
                    return []
                apps = [app] if app else sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))
            except FileNotFoundError:
                return []
            out = []
            for a in apps:
                adir = self._join("runs", a)
                try:
                    found = sorted(self.fs.ls(adir, detail=False)) if self.fs.isdir(adir) else []
                except FileNotFoundError:
                    continue
                for p in found:
                    rid = posixpath.basename(p.rstrip("/").replace(os.sep, "/"))
                    if _RUN_ID_RE.match(rid):
                        out.append(self.run(a, rid))
        return out

    def _map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``[fn(x) for x in items]``; on an object store several at once (each is a request, its latency the
        cost), in order all the same. The first error raises, as in the loop, and what has not started is
        dropped: in an outage the answer comes after the retries of the requests in flight, not of every run."""
        if is_local(self.fs) or len(items) < 2:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(min(_CONCURRENT_READS, len(items)), thread_name_prefix="aeflow-read")
        try:
            futures = [pool.submit(fn, x) for x in items]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_manifest(self, run: RunDir) -> Manifest | None:
        """The run's manifest, or None when it has none (not complete) or it cannot be read (said in a warning).
        One read: a missing ``manifest.json`` is the answer, not a prior existence check."""
        path = run.path_of(MANIFEST)
        try:
            with storage_op("read", run.uri_of(MANIFEST)):
                data = cat_small(self.fs, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except StorageError:  # an outage, or no access: the listing cannot be answered
            raise
        except Exception as e:  # noqa: BLE001 - e.g. manifest.json is a folder: skip it, don't crash listing
            log.warning("skipping %s: its manifest cannot be read (%s: %s)", run.uri, type(e).__name__, e)
            return None
        try:
            return Manifest.model_validate_json(data)
        except ValueError as e:  # pydantic's ValidationError (bad JSON too): a manifest from an incompatible version
            log.warning("skipping %s: its manifest.json cannot be read (%s): the run is damaged or was written by an "
                        "incompatible aeflow", run.uri, _first_line(e))
            return None

    def list_runs(self, app: str | None = None) -> list[Manifest]:
        """Complete runs (those with a manifest), oldest first."""
        manifests = [m for m in self._map(self._read_manifest, self._run_dirs(app)) if m is not None]
        return sorted(manifests, key=lambda m: (m.created, m.run_id))

    def newest_run(self, app: str, accept: Callable[[Manifest], bool] | None = None, *,
                   fingerprint: str | None = None, where: Callable[[RunDir], bool] | None = None) -> Manifest | None:
        """The newest complete run of ``app`` that is accepted, in :meth:`list_runs`' order (``created``, then run
        id): the first of ``reversed(list_runs(app))`` with ``fingerprint`` (when given), that ``where(run)``
        accepts (a test of the run's files, made before its manifest is read) and that ``accept(manifest)``
        accepts; None if there is none.

        In a local folder without reading every manifest: a run's ``created`` (when it started) precedes the
        last change of its folder (the manifest is written into it last), so folders are read newest change
        first and the search stops at the first folder changed before the best run found so far started
        (:data:`_MTIME_SLACK` allows for a file server's clock). An object store keeps no time for a folder:
        there every manifest is read, one request each, several at once.
        """
        runs = self._run_dirs(app)
        order: list[tuple[float | None, RunDir]] = [(None, run) for run in runs]
        if is_local(self.fs):
            order = []
            for run in runs:
                try:
                    order.append((os.stat(run.path).st_mtime, run))
                except OSError:  # gone meanwhile
                    continue
            order.sort(key=lambda t: (t[0], t[1].run_id), reverse=True)
        batch = 1 if is_local(self.fs) else len(order)

        def read(run: RunDir) -> Manifest | None:
            if where is not None and not where(run):
                return None
            m = self._read_manifest(run)
            if m is None or (fingerprint is not None and m.fingerprint != fingerprint) or (accept and not accept(m)):
                return None
            return m

        best: Manifest | None = None
        i = 0
        while i < len(order):
            changed = order[i][0]
            if best is not None and changed is not None and changed + _MTIME_SLACK < _utc(best.created).timestamp():
                break  # this folder and every one after it last changed before the best run found started
            chunk = [run for _, run in order[i : i + batch]]
            i += len(chunk)
            for m in self._map(read, chunk):
                if m is not None and (best is None or (m.created, m.run_id) > (best.created, best.run_id)):
                    best = m
        return best

    def find_complete(self, app: str, fingerprint: str) -> Manifest | None:
        """The newest complete run of ``app`` with this fingerprint (``--skip-existing``), or None."""
        return self.newest_run(app, fingerprint=fingerprint)

    def _incomplete(self, app: str, fingerprint: str) -> Iterator[RunDir]:
        for run in self._run_dirs(app):
            # start_run named this folder after the fingerprint in its marker, another one: pass it over without a
            # request (were it a --run-id of that shape holding this fingerprint, the run would start afresh)
            made_for = _made_for(run.run_id)
            if made_for is not None and made_for != fingerprint[:8]:
                continue
            if run.is_complete:
                if made_for is not None:  # a run of this fingerprint (a --run-id's would cost a request per run)
                    self._tidy_complete(run)
                continue
            if run.exists(RUN_MARKER):
                try:
                    if run.read_json(RUN_MARKER).get("fingerprint") == fingerprint:
                        yield run
                except json.JSONDecodeError:
                    continue
                except StorageError as e:
                    if e.transient:
                        raise
                    continue

    @staticmethod
    def _tidy_complete(run: RunDir) -> None:
        """Remove the checkpoint and marker that a complete run still holds (its process was killed right after
        writing the manifest), unless a live process is still finishing it. Readers ignore them meanwhile."""
        try:
            if run.exists(RUN_MARKER) and run.claim_holder() is None:
                log.info("removing the checkpoint and in-progress marker left in %s, which is complete", run.uri)
                run.drop_leftovers()
        except Exception as e:  # noqa: BLE001 - best effort: another process tidied it, or an outage
            log.debug("leftovers of %s not removed: %s", run.uri, e)

    def _incomplete_entry(self, run: RunDir) -> dict[str, Any] | None:
        if run.is_complete or not run.exists(RUN_MARKER):
            return None
        try:
            marker = run.read_json(RUN_MARKER)
            ckpt = run.read_json(f"{CHECKPOINT_DIR}/meta.json") if run.exists(f"{CHECKPOINT_DIR}/meta.json") else None
        except (json.JSONDecodeError, StorageError) as e:
            if isinstance(e, StorageError) and e.transient:
                raise
            return None
        holder = run.claim_holder()
        return {
            "app": run.app, "run_id": run.run_id, "run_uri": run.uri, "created": marker.get("created", ""),
            "running": {k: holder.get(k) for k in ("pid", "host")} if holder else None,
            "checkpoint": {k: ckpt.get(k) for k in ("epoch", "step", "finished")} if isinstance(ckpt, dict) else None,
        }

    def incomplete_runs(self, app: str | None = None) -> list[dict[str, Any]]:
        """Runs without a manifest that hold a run marker (interrupted, or being run now), oldest first: app, run
        id and URI, when the first attempt started, the live claim (pid, host) if one holds it, and where training's
        checkpoint stands (epoch, step, finished), read from its ``meta.json`` alone."""
        found = [r for r in self._map(self._incomplete_entry, self._run_dirs(app)) if r is not None]
        return sorted(found, key=lambda r: (str(r["created"]), r["run_id"]))

    def find_incomplete(self, app: str, fingerprint: str) -> RunDir | None:
        """An interrupted run of this fingerprint that nobody is working on (not claimed by a live owner)."""
        for run in self._incomplete(app, fingerprint):
            if run.claim_holder() is None:
                return run
        return None


@dataclass(frozen=True)
class ModelFolder:
    """A bare model folder: ``config.json`` + ``weights.safetensors``, the layout of a run's
    ``model/`` on its own (e.g. the models trained by the benchmarks and committed with them)."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.path)

    def load_model_files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (config.json contents, state dict), the weights verified against their recorded hash."""
        return read_model_files(self.fs, self.path.replace(os.sep, "/"), self.uri)


def open_model_source(uri: str) -> RunDir | ModelFolder:
    """What ``--model`` names: a complete run, or a model folder (config.json + weights.safetensors)."""
    fs, path = url_to_fs(uri)
    path = path.rstrip("/")
    if is_local(fs):
        path = os.path.abspath(path)
    with storage_op("read the model", uri):
        try:
            folder = fs.exists(f"{path}/config.json") and fs.exists(f"{path}/weights.safetensors")
        except (OSError, ValueError):  # unreadable: open_run reports it
            folder = False
        if folder and not fs.exists(f"{path}/{MANIFEST}"):
            return ModelFolder(fs, path)
        parts = path.replace(os.sep, "/").split("/")
        if len(parts) < 3 or parts[-3] != "runs":  # neither a run's URI nor a model folder: say which it is not
            if not fs.exists(path):
                raise StorageError(f"--model {uri}: no such run or model folder{relative_note(uri)}")
            raise StorageError(f"--model {uri} is neither a run (.../runs/<app>/<run_id>) nor a model folder "
                               "(it holds no config.json + weights.safetensors)")
    run = open_run(uri)
    run.manifest()  # a run whose manifest cannot be read is no complete run (runs list skips it too)
    return run


def open_run(uri: str, *, require_complete: bool = True) -> RunDir:
    """Open a run by its URI (``./artifacts/runs/reduce/<id>`` or ``s3://b/p/runs/reduce/<id>``)."""
    fs, path = url_to_fs(uri)
    path = path.rstrip("/")
    if is_local(fs):
        path = os.path.abspath(path)
    parts = path.replace(os.sep, "/").split("/")
    if len(parts) < 3 or parts[-3] != "runs":
        raise StorageError(f"{uri!r} is not a run URI (expected .../runs/<app>/<run_id>)")
    run = RunDir(fs, path, parts[-2], parts[-1])
    try:
        with storage_op("read the run", uri):
            present = fs.exists(path)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot read run {uri!r}: {e}") from e
    if not present:
        raise StorageError(f"run {uri!r} does not exist")
    if require_complete and not run.is_complete:
        raise StorageError(f"run {uri!r} is not complete (no manifest.json): it failed or is still running")
    return run
