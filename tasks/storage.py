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

A failed run leaves no manifest (readers ignore such directories) and never
touches another run. Weights and checkpoints are safetensors: loading never
unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import DEFAULT_OUTPUT
from tasks.errors import StorageError

MANIFEST = "manifest.json"
RUN_MARKER = "_run.json"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    """``fsspec.url_to_fs`` with errors that name the URI."""
    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as e:
        raise StorageError(f"cannot open {uri!r}: {e}") from e


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


def _bucket_missing(e: BaseException) -> bool:
    text = str(e)
    return "NoSuchBucket" in text or "bucket does not exist" in text.lower()


def new_run_id(fingerprint: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{fingerprint[:8]}"


@dataclass
class RunDir:
    """One run's directory. All reads and writes of a run go through here."""

    fs: fsspec.AbstractFileSystem
    path: str
    app: str
    run_id: str

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.path)

    def path_of(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if not is_local(self.fs) else os.path.join(self.path, rel)

    def uri_of(self, rel: str) -> str:
        return to_uri(self.fs, self.path_of(rel))

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path_of(rel) if rel else self.path)

    # -- bytes, JSON ---------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a whole file; on local disks atomically (temp file + rename)."""
        path = self.path_of(rel)
        try:
            if is_local(self.fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except (OSError, PermissionError) as e:
            if _bucket_missing(e):
                raise StorageError(f"cannot write {self.uri_of(rel)}: the bucket does not exist") from e
            raise StorageError(f"cannot write {self.uri_of(rel)}: {e}") from e
        return self.uri_of(rel)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path_of(rel))
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri_of(rel)} does not exist") from e

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode and is_local(self.fs):
            os.makedirs(os.path.dirname(self.path_of(rel)), exist_ok=True)
        return self.fs.open(self.path_of(rel), mode)

    def makedirs(self, rel: str) -> str:
        path = self.path_of(rel)
        self.fs.makedirs(path, exist_ok=True)
        return path

    # -- models --------------------------------------------------------------------
    def save_model(self, kind: str, config: dict[str, Any], state_dict: dict[str, Any], extra: dict[str, Any]) -> str:
        """Save ``model/config.json`` (kind, config, fitted state) and ``model/weights.safetensors``."""
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
        self.write_bytes(f"{MODEL_DIR}/weights.safetensors", data)
        weights_hash = "sha256:" + hashlib.sha256(data).hexdigest()
        self.write_json(
            f"{MODEL_DIR}/config.json",
            {"format_version": 1, "kind": kind, "config": config, "app": self.app, "weights": weights_hash, **extra},
        )
        return self.uri_of(MODEL_DIR)

    def load_model_files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (config.json contents, state dict) without unpickling anything."""
        from safetensors.torch import load

        if not self.exists(f"{MODEL_DIR}/config.json"):
            raise StorageError(f"{self.uri} has no saved model (model/config.json is missing)")
        return self.read_json(f"{MODEL_DIR}/config.json"), load(self.read_bytes(f"{MODEL_DIR}/weights.safetensors"))

    # -- checkpoints ---------------------------------------------------------------
    def save_checkpoint(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        from safetensors.torch import save

        # Tensors first, meta last: a meta file always describes a complete tensor file.
        self.write_bytes(f"{CHECKPOINT_DIR}/state.safetensors", save(tensors))
        self.write_json(f"{CHECKPOINT_DIR}/meta.json", meta)

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        from safetensors.torch import load

        if not self.exists(f"{CHECKPOINT_DIR}/meta.json"):
            return None
        return load(self.read_bytes(f"{CHECKPOINT_DIR}/state.safetensors")), self.read_json(f"{CHECKPOINT_DIR}/meta.json")

    # -- completion ----------------------------------------------------------------
    def list_files(self, exclude: tuple[str, ...] = (CHECKPOINT_DIR, RUN_MARKER, MANIFEST)) -> list[str]:
        """Relative POSIX paths of every file in the run, sorted."""
        if not self.fs.exists(self.path):
            return []
        root = self.fs._strip_protocol(self.path).rstrip("/")
        rels = []
        for p in self.fs.find(self.path):
            rel = p[len(root) :].lstrip("/").replace(os.sep, "/")
            if rel.split("/")[0] in exclude or ".tmp-" in rel:
                continue
            rels.append(rel)
        return sorted(rels)

    def output_records(self) -> list[FileRecord]:
        return [
            FileRecord(path=rel, size=int(self.fs.size(self.path_of(rel))), hash=hash_file(self.fs, self.path_of(rel)))
            for rel in self.list_files()
        ]

    def write_manifest(self, manifest: Manifest) -> str:
        """Write ``manifest.json``. Call last: its presence means the run is complete."""
        self.remove(CHECKPOINT_DIR)
        self.remove(RUN_MARKER)
        return self.write_bytes(MANIFEST, manifest.model_dump_json(indent=2).encode())

    @property
    def is_complete(self) -> bool:
        return self.exists(MANIFEST)

    def manifest(self) -> Manifest:
        if not self.is_complete:
            raise StorageError(f"{self.uri} is not a complete run (no manifest.json)")
        return Manifest.model_validate_json(self.read_bytes(MANIFEST))

    def remove(self, rel: str) -> None:
        path = self.path_of(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def discard(self) -> None:
        """Undo a failed run: delete its outputs; keep only what lets a rerun resume.

        The checkpoint and the fingerprint marker stay when a checkpoint exists,
        so the next run of the same (app, input, config) continues training
        where this one stopped. No manifest is ever left.
        """
        if not self.fs.exists(self.path):
            return
        keep = {CHECKPOINT_DIR, RUN_MARKER} if self.exists(f"{CHECKPOINT_DIR}/meta.json") else set()
        if not keep:
            self.fs.rm(self.path, recursive=True)
            return
        for entry in self.fs.ls(self.path, detail=False):
            if posixpath.basename(entry.rstrip("/")) not in keep:
                self.fs.rm(entry, recursive=True)


class ArtifactStore:
    """Runs under one root (local folder or ``s3://bucket/prefix``)."""

    def __init__(self, root: str = DEFAULT_OUTPUT) -> None:
        self.root_uri = root
        self.fs, path = url_to_fs(root)
        self.root = os.path.abspath(path) if is_local(self.fs) else path.rstrip("/")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_uri!r})"

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts) if is_local(self.fs) else posixpath.join(self.root, *parts)

    def run(self, app: str, run_id: str) -> RunDir:
        if not _RUN_ID_RE.match(run_id):
            raise StorageError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-'")
        return RunDir(self.fs, self._join("runs", app, run_id), app, run_id)

    def check_writable(self) -> None:
        """Fail early (before any work) when the root cannot be written, e.g. a missing bucket."""
        if is_local(self.fs):
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create artifact root {self.root_uri!r}: {e}") from e
            return
        bucket = self.root.split("/")[0]
        try:
            exists = self.fs.exists(bucket)
        except Exception as e:  # credentials, endpoint
            raise StorageError(f"cannot reach artifact root {self.root_uri!r}: {e}") from e
        if not exists:
            raise StorageError(f"cannot write to {self.root_uri!r}: bucket {bucket!r} does not exist")

    def start_run(self, app: str, fingerprint: str, config: dict[str, Any], run_id: str | None = None) -> RunDir:
        """Create the directory of a new run, or reopen an interrupted run of the same fingerprint.

        Never returns a complete run: with an explicit ``run_id`` that already
        has a manifest this raises, so earlier results are never overwritten.
        """
        if run_id is None:
            resumable = self.find_incomplete(app, fingerprint)
            if resumable is not None:
                return resumable
            run_id = new_run_id(fingerprint)
            candidate, n = run_id, 1
            while self.run(app, candidate).exists():
                n += 1
                candidate = f"{run_id}-{n}"
            run_id = candidate
        run = self.run(app, run_id)
        if run.is_complete:
            raise StorageError(f"run {run.uri} already exists and is complete; choose another run id")
        if run.exists(RUN_MARKER):
            marker = run.read_json(RUN_MARKER)
            if marker.get("fingerprint") != fingerprint:
                raise StorageError(
                    f"run {run.uri} holds an interrupted run with a different input or config; choose another run id"
                )
        else:
            run.write_json(
                RUN_MARKER,
                {"app": app, "run_id": run_id, "fingerprint": fingerprint, "created": datetime.now(UTC).isoformat(), "config": config},
            )
        return run

    def _run_dirs(self, app: str | None = None) -> list[RunDir]:
        base = self._join("runs")
        if not self.fs.exists(base):
            return []
        apps = [app] if app else sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False))
        out = []
        for a in apps:
            adir = self._join("runs", a)
            if not self.fs.isdir(adir):
                continue
            for p in sorted(self.fs.ls(adir, detail=False)):
                rid = posixpath.basename(p.rstrip("/").replace(os.sep, "/"))
                if _RUN_ID_RE.match(rid):
                    out.append(self.run(a, rid))
        return out

    def list_runs(self, app: str | None = None) -> list[Manifest]:
        """Complete runs (those with a manifest), oldest first."""
        manifests = []
        for run in self._run_dirs(app):
            if run.is_complete:
                try:
                    manifests.append(run.manifest())
                except Exception:  # a manifest from an incompatible version: skip, don't crash listing
                    continue
        return sorted(manifests, key=lambda m: (m.created, m.run_id))

    def find_complete(self, app: str, fingerprint: str) -> Manifest | None:
        for m in reversed(self.list_runs(app)):
            if m.fingerprint == fingerprint:
                return m
        return None

    def find_incomplete(self, app: str, fingerprint: str) -> RunDir | None:
        for run in self._run_dirs(app):
            if not run.is_complete and run.exists(RUN_MARKER):
                try:
                    if run.read_json(RUN_MARKER).get("fingerprint") == fingerprint:
                        return run
                except (StorageError, json.JSONDecodeError):
                    continue
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
        """Return (config.json contents, state dict) without unpickling anything."""
        from safetensors.torch import load

        try:
            meta = json.loads(self.fs.cat_file(f"{self.path}/config.json"))
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.uri}/config.json is not valid JSON: {e}") from e
        return meta, load(self.fs.cat_file(f"{self.path}/weights.safetensors"))


def open_model_source(uri: str) -> RunDir | ModelFolder:
    """What ``--model`` names: a complete run, or a model folder (config.json + weights.safetensors)."""
    fs, path = url_to_fs(uri)
    path = path.rstrip("/")
    if is_local(fs):
        path = os.path.abspath(path)
    try:
        folder = fs.exists(f"{path}/config.json") and fs.exists(f"{path}/weights.safetensors")
    except Exception:  # unreadable: open_run reports it
        folder = False
    if folder and not fs.exists(f"{path}/{MANIFEST}"):
        return ModelFolder(fs, path)
    return open_run(uri)


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
        present = fs.exists(path)
    except Exception as e:
        raise StorageError(f"cannot read run {uri!r}: {e}") from e
    if not present:
        raise StorageError(f"run {uri!r} does not exist")
    if require_complete and not run.is_complete:
        raise StorageError(f"run {uri!r} is not complete (no manifest.json): it failed or is still running")
    return run
