"""The platform's state file: ports, generated keys and the processes it started.

``DIR/platform.json`` (mode 0600: it holds the generated S3 keys and the database
password) is written after every component that starts, so ``down`` stops what a
failed ``up`` left running, and ``up`` again on the same DIR reuses the ports,
the keys, the database and the object store's data.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.platform.procs import ProcRecord
from tasks.errors import PlatformError

STATE_FILE = "platform.json"
FORMAT = 1

# Ports the platform listens on, by role (all on 127.0.0.1).
PORT_NAMES = (
    "postgres",
    "prefect",
    "s3",
    "s3_grpc",
    "weed_master",
    "weed_master_grpc",
    "weed_volume",
    "weed_volume_grpc",
    "weed_filer",
    "weed_filer_grpc",
    "dask",
    "dask_http",
)


@dataclass
class PlatformState:
    """Everything ``up``, ``status`` and ``down`` share about one platform directory."""

    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    components: dict[str, ProcRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.dir / STATE_FILE

    @classmethod
    def load(cls, directory: Path) -> PlatformState:
        """The state of ``directory`` (an empty state when it has none yet)."""
        directory = directory.resolve()
        path = directory / STATE_FILE
        if not path.exists():
            return cls(dir=directory)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlatformError(f"cannot read the platform state {path}: {e}") from e
        if doc.get("format") != FORMAT:
            raise PlatformError(f"{path} has state format {doc.get('format')!r}; this aeflow writes {FORMAT}")
        return cls(
            dir=directory,
            ports={k: int(v) for k, v in (doc.get("ports") or {}).items()},
            secrets=dict(doc.get("secrets") or {}),
            settings=dict(doc.get("settings") or {}),
            components={k: ProcRecord.from_json(v) for k, v in (doc.get("components") or {}).items()},
            timings=dict(doc.get("timings") or {}),
        )

    def save(self) -> None:
        """Write the state atomically, readable by its owner only."""
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "dir": str(self.dir),
            "ports": self.ports,
            "secrets": self.secrets,
            "settings": self.settings,
            "components": {k: v.to_json() for k, v in self.components.items()},
            "timings": self.timings,
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, self.path)

    def secret(self, name: str, nbytes: int = 24) -> str:
        """A generated secret, created once per platform directory and kept."""
        if name not in self.secrets:
            self.secrets[name] = secrets.token_hex(nbytes)
        return self.secrets[name]


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per platform directory.

    A directory this call created and that holds nothing but the lock when it ends (an ``up``
    refused before anything started) is removed again, with the parents it created.
    """
    created = [p for p in (directory, *directory.parents) if not p.exists()]  # the deepest first
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise PlatformError(f"another `aeflow platform` command is working on {directory}; wait for it") from e
        held = True
        yield
    finally:
        if held and created and os.listdir(directory) == [".lock"]:
            (directory / ".lock").unlink()  # still held: no other command can have taken it meanwhile
            for p in created:
                try:
                    p.rmdir()
                except OSError:  # something else appeared in it meanwhile
                    break
        os.close(fd)
