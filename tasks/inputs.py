"""Input files: what a URI names (a file, a folder, a glob) and each file's identity.

Shared by the table and image loaders (``tasks/load.py``, ``tasks/images.py``): one
listing with the same rules (hidden files left out, a missing bucket named as such)
and one content hash (the object store's ETag when there is one, else SHA-256).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec

from tasks.errors import InputError, StorageError
from tasks.storage import hash_file, is_local, nothing_at, storage_op, to_uri, url_to_fs


def content_hash(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any] | None = None) -> str:
    """An input file's identity: the object store's ETag when there is one (no download), else SHA-256."""
    with storage_op("read", to_uri(fs, path)):
        if not is_local(fs):
            info = info if info is not None else fs.info(path)
            etag = info.get("ETag") or info.get("etag")
            if etag:
                return f"etag:{str(etag).strip(chr(34))}"
        return hash_file(fs, path)


def find_files(uri: str, role: str = "input") -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """What an input URI names: a file, a folder (recursively) or a glob -> (fs, sorted files, root).

    Hidden files and folders (``.x``, ``_x`` below the root) are left out.

    Raises:
        InputError: nothing there (naming a missing bucket as such), or unreadable.
    """
    fs, path = url_to_fs(uri)
    path = os.path.abspath(path) if is_local(fs) else path.rstrip("/")
    try:
        with storage_op("list", uri):  # an outage is a StorageUnavailable line, not bad input
            if any(ch in path for ch in "*?["):
                found = [p for p in fs.glob(path) if fs.isfile(p)] or None  # matches nothing: said as such
                root = posixpath.dirname(path.replace(os.sep, "/").split("*")[0].split("?")[0].split("[")[0])
            elif fs.isdir(path):
                found, root = [p for p in fs.find(path) if not fs.isdir(p)], path
            elif fs.exists(path):
                found, root = [path], posixpath.dirname(path.replace(os.sep, "/"))
            else:
                found, root = None, path
    except PermissionError as e:  # a storage matter (exit 4), like the object store's refusal (storage_op)
        raise StorageError(f"cannot read {role} {uri}: permission denied ({e})") from e
    except OSError as e:
        raise InputError(f"cannot read {role} {uri}: {e}") from e
    if found is None:
        raise InputError(nothing_at(fs, path, uri, role))
    root = root.replace(os.sep, "/").rstrip("/")
    return fs, sorted(p for p in found if not _hidden(relative_to(p, root))), root


def refuse_missing_local(uri: str, role: str = "input") -> None:
    """Raise :func:`find_files`'s refusal for a local ``uri`` with nothing there, without listing a folder.

    The CLI calls it before Prefect's temporary server starts (a missing file was refused only after it, 5 s
    and more later); an object store's URI is left to the run, which tells an outage from a missing object.
    """
    fs, path = url_to_fs(uri)
    if not is_local(fs):
        return
    path = os.path.abspath(path)
    if any(ch in path for ch in "*?["):
        if any(fs.isfile(p) for p in fs.glob(path)):
            return
    elif fs.exists(path):
        return
    raise InputError(nothing_at(fs, path, uri, role))


def relative_to(path: str, root: str) -> str:
    """``path`` below ``root`` as a POSIX relative path (its basename when it is not below)."""
    p = path.replace(os.sep, "/")
    return p[len(root) :].lstrip("/") if p.startswith(root + "/") else posixpath.basename(p)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))
