"""An artifact root with hundreds of runs: questions about the newest runs must not read them all.

What was slow: ``--model latest``, ``--skip-existing``, the start of every ``aeflow run`` (its look
for an interrupted run of the same fingerprint) and ``aeflow decompress`` without ``--model`` each
read the manifest of every run of the application (``list_runs``), and every manifest read cost
two existence checks besides the read (three requests a run on S3, one after the other). After a
year of daily runs that is thousands of requests for one answer. Now a local root is read newest
folder first (a run's ``created`` precedes its folder's last change) and the search stops; start_run's
look passes over folders that ``start_run`` named after another fingerprint; a listing reads each
manifest once (a missing one is the answer), several at a time on object stores, a JSON file in one
request. The answers must be those of a full scan, whatever the runs are named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from tasks import codec as codec_mod
from tasks.schedule import latest_model_run
from tasks.storage import (
    MANIFEST,
    RUN_MARKER,
    ArtifactStore,
    Manifest,
    RunDir,
    new_run_id,
)

DAYS = 200
START = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)


def _fp(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _write_run(root: Path, app: str, run_id: str, created: datetime, fp: str, model_run: str | None,
               codec_id: str | None = None, metric: float = 0.5, touched: datetime | None = None) -> None:
    """A complete run; its folder last changed when it finished (``touched``: then), as a year of history has it."""
    folder = root / "runs" / app / run_id
    (folder / "model").mkdir(parents=True)
    if codec_id is not None:
        (folder / "model" / "config.json").write_text(json.dumps({"kind": "codec", "codec_id": codec_id}))
    m = Manifest(app=app, run_id=run_id, run_uri=str(folder), created=created, finished=created + timedelta(seconds=30),
                 fingerprint=fp, model_run=model_run, config={"load": {"input": f"day-{created:%Y-%m-%d}"}},
                 metrics={"score": metric})
    (folder / MANIFEST).write_text(m.model_dump_json(indent=2))
    t = (touched or m.finished).timestamp()
    os.utime(folder, (t, t))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """200 days of detect (weekly training, daily apply) and compress runs (a codec a week), run ids as start_run
    makes them (the id a few seconds after ``created``; some in the same second), two runs named by hand, and an
    interrupted run."""
    root = tmp_path_factory.mktemp("year")
    training = ""
    for d in range(DAYS):
        created = START + timedelta(days=d, seconds=(d * 7) % 50, microseconds=(d * 7919) % 10**6)
        stamp = created + timedelta(seconds=d % 3)  # 0..2 s later: the id's second may equal created's
        fp = _fp("detect", d)
        rid = new_run_id(fp, stamp)
        _write_run(root, "detect", rid, created, fp, None if d % 7 == 0 else training, metric=(d * 37 % 100) / 100)
        if d % 7 == 0:
            training = str(root / "runs" / "detect" / rid)
        cfp = _fp("compress", d)
        _write_run(root, "compress", new_run_id(cfp, stamp + timedelta(minutes=5)), created + timedelta(minutes=5), cfp,
                   None, codec_id=_codec_id(d // 7))
    # named by hand (--run-id): found by their folders' times like the others
    _write_run(root, "detect", "baseline", START + timedelta(days=40), _fp("baseline"), None)
    _write_run(root, "detect", "zz-candidate", START + timedelta(days=5), _fp("candidate"), "x")
    # interrupted: a marker, no manifest
    ifp = _fp("detect", "interrupted")
    folder = root / "runs" / "detect" / new_run_id(ifp, START + timedelta(days=DAYS))
    folder.mkdir(parents=True)
    (folder / RUN_MARKER).write_text(json.dumps({"app": "detect", "fingerprint": ifp, "created": "x"}))
    return root


class Spy:
    """Counts the local filesystem calls that read or probe a file, by kind."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str]] = []
        for name in ("cat_file", "exists", "info"):
            real = getattr(LocalFileSystem, name)

            def spy(fs, path, *a, _real=real, _name=name, **k):
                self.calls.append((_name, str(path)))
                return _real(fs, path, *a, **k)

            monkeypatch.setattr(LocalFileSystem, name, spy)

    def count(self, kind: str | None = None, name: str | None = None) -> int:
        """Calls on a run's folder or its files (not the listing of the root and the app folders)."""
        return sum(1 for k, p in self.calls if (kind is None or k == kind) and (name is None or p.endswith(name))
                   and re.search(r"/runs/[^/]+/[^/]+", p))

    def reset(self) -> None:
        self.calls.clear()


def _scan(store: ArtifactStore, app: str, accept) -> Manifest | None:
    """The previous answer: the newest accepted run of reversed(list_runs)."""
    return next((m for m in reversed(store.list_runs(app)) if accept(m)), None)


def test_latest_reads_the_newest_runs_only(root, monkeypatch):
    store = ArtifactStore(str(root))
    expected = _scan(store, "detect", lambda m: not m.model_run)
    assert expected is not None and expected.run_id.startswith(f"{START + timedelta(days=196):%Y%m%d}")
    spy = Spy(monkeypatch)
    assert latest_model_run("detect", str(root)) == expected.run_uri
    # at most a week of daily runs, newest first, then stop (it read all 203 before)
    assert spy.count(name=MANIFEST) <= 8, spy.calls


@pytest.mark.parametrize("day", [DAYS - 1, DAYS - 3, 100, None])
def test_skip_existing_finds_the_run_a_full_scan_finds(root, monkeypatch, day):
    store = ArtifactStore(str(root))
    fp = _fp("detect", day) if day is not None else _fp("a new day")
    expected = _scan(store, "detect", lambda m: m.fingerprint == fp)
    assert (expected is None) == (day is None)
    spy = Spy(monkeypatch)
    assert store.find_complete("detect", fp) == expected
    if day is not None and day >= DAYS - 3:  # a recent date: the runs since then, not the year
        assert spy.count(name=MANIFEST) <= DAYS - day + 1, spy.calls


def test_start_run_looks_for_an_interrupted_run_without_a_request_per_run(root, monkeypatch):
    """Every ``aeflow run`` asks first whether an interrupted run of its fingerprint waits to be resumed."""
    store = ArtifactStore(str(root))
    spy = Spy(monkeypatch)
    assert store.find_incomplete("detect", _fp("a new day")) is None
    assert spy.count() <= 4, spy.calls  # the two runs named by hand (manifest, marker); none of the 200 others


def test_start_run_still_resumes_the_interrupted_run_of_its_fingerprint(root):
    store = ArtifactStore(str(root))
    found = store.find_incomplete("detect", _fp("detect", "interrupted"))
    assert found is not None and found.run_id.endswith(_fp("detect", "interrupted")[:8])
    assert [r["run_id"] for r in store.incomplete_runs("detect")] == [found.run_id]


def test_list_runs_reads_each_manifest_once_and_probes_nothing_per_run(root, monkeypatch):
    store = ArtifactStore(str(root))
    spy = Spy(monkeypatch)
    listed = store.list_runs("detect")
    assert len(listed) == DAYS + 2
    assert [(m.created, m.run_id) for m in listed] == sorted((m.created, m.run_id) for m in listed)
    # one read per run folder (the interrupted one's read finds nothing); before: two existence checks besides
    assert spy.count("cat_file") == DAYS + 3
    assert spy.count("exists") <= 2, spy.calls[:5]


@pytest.mark.parametrize("question", ["score above 0.9", "no model_run", "day 13's fingerprint", "nothing", "anything"])
def test_newest_run_answers_as_the_full_scan(root, question):
    store = ArtifactStore(str(root))
    accept = {
        "score above 0.9": lambda m: m.metrics["score"] > 0.9,
        "no model_run": lambda m: m.model_run is None,
        "day 13's fingerprint": lambda m: m.fingerprint == _fp("detect", 13),
        "nothing": lambda m: False,
        "anything": lambda m: True,
    }[question]
    assert store.newest_run("detect", accept) == _scan(store, "detect", accept)


def test_runs_named_by_hand_or_misleadingly_are_found(tmp_path):
    """Names say nothing: ``mine``, and a folder named like an id of January holding a run of December (a copy,
    a hand-made run), are found as the full scan finds them."""
    _write_run(tmp_path, "detect", new_run_id(_fp(1), START), START, _fp(1), None)
    _write_run(tmp_path, "detect", "mine", START + timedelta(days=1), _fp(2), None)
    store = ArtifactStore(str(tmp_path))
    assert latest_model_run("detect", str(tmp_path)).endswith("/mine")
    _write_run(tmp_path, "detect", new_run_id(_fp(3), START - timedelta(days=1)), START + timedelta(days=300), _fp(4),
               None)
    assert store.find_complete("detect", _fp(4)).created == START + timedelta(days=300)
    assert latest_model_run("detect", str(tmp_path)) == _scan(store, "detect", lambda m: not m.model_run).run_uri
    assert latest_model_run("detect", str(tmp_path)).endswith(new_run_id(_fp(3), START - timedelta(days=1)))


def test_a_folder_changed_later_than_it_started_is_still_read(tmp_path):
    """The stop relies on ``created`` preceding the folder's last change: a folder touched afterwards (files
    added, copied) only changed later, and is read earlier."""
    _write_run(tmp_path, "detect", "old", START, _fp(1), None, touched=START + timedelta(days=500))
    _write_run(tmp_path, "detect", "new", START + timedelta(days=1), _fp(2), None)
    assert latest_model_run("detect", str(tmp_path)).endswith("/new")


def test_runs_started_in_the_same_second_are_ordered_as_list_runs_orders_them(tmp_path):
    """Same ``created``: the run id decides (``-2`` is the second run of that second)."""
    fp = _fp("same")
    base = new_run_id(fp, START)
    for rid in (base, f"{base}-2", f"{base}-3"):
        _write_run(tmp_path, "detect", rid, START, fp, None)
    store = ArtifactStore(str(tmp_path))
    assert store.find_complete("detect", fp).run_id == f"{base}-3" == store.list_runs("detect")[-1].run_id


def _codec_id(week: int) -> str:
    return hashlib.sha256(f"week {week}".encode()).hexdigest()[:16]


@pytest.mark.parametrize("week", [(DAYS - 1) // 7, 0, None])
def test_decompress_finds_the_codec_a_full_scan_finds(root, monkeypatch, week):
    """The newest week's codec (the usual case) costs a few reads; the oldest, or one not there, reads the
    config.json of every compress run, but a manifest only where it matches."""
    monkeypatch.setattr(codec_mod, "load_codec_run", lambda uri: uri)  # the search is what is tested, not loading
    identity = _codec_id(week) if week is not None else "0" * 16
    store = ArtifactStore(str(root))
    expected = _scan(store, "compress", lambda m: json.loads(
        (root / "runs" / "compress" / m.run_id / "model" / "config.json").read_text())["codec_id"] == identity)
    spy = Spy(monkeypatch)
    found = codec_mod.find_codec_run(str(root), bytes.fromhex(identity))
    assert found == (str(root / "runs" / "compress" / expected.run_id) if expected else None)
    assert spy.count(name=MANIFEST) <= 7, spy.calls  # the runs holding it, newest first; before: all 200
    if week == (DAYS - 1) // 7:
        assert spy.count(name="config.json") <= 2, spy.calls


def test_json_reads_are_one_request_on_object_stores():
    """s3fs asks a file's size (HEAD) before a GET unless told not to fetch it in parallel parts."""

    class FakeS3:
        max_concurrency = 10

        def __init__(self) -> None:
            self.kwargs: list[dict] = []

        def cat_file(self, path, **kwargs):
            self.kwargs.append(kwargs)
            return b'{"fingerprint": "f"}'

        def unstrip_protocol(self, path):
            return f"s3://{path}"

    fs = FakeS3()
    run = RunDir(fs, "bucket/root/runs/detect/r1", "detect", "r1")
    assert run.read_json(RUN_MARKER) == {"fingerprint": "f"}
    assert fs.kwargs == [{"max_concurrency": 1}]


def test_an_object_store_reads_every_manifest_several_at_once_with_the_same_answers(root):
    """No folder times there: all manifests are read (in threads), and the answers are those of the local root.
    fsspec's in-memory filesystem stands for S3 (not local, no network)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    base = "/runs-scale-test"
    local = ArtifactStore(str(root))
    kept = [m for m in local.list_runs("detect")][-30:]
    for m in kept:
        for f in (root / "runs" / "detect" / m.run_id).rglob("*"):
            if f.is_file():
                mem.pipe_file(f"{base}/runs/detect/{m.run_id}/{f.relative_to(root / 'runs' / 'detect' / m.run_id)}",
                              f.read_bytes())
    try:
        store = ArtifactStore(f"memory://{base}")
        assert [m.run_id for m in store.list_runs("detect")] == [m.run_id for m in kept]
        for accept in (lambda m: not m.model_run, lambda m: m.metrics["score"] > 0.5, lambda m: False):
            assert getattr(store.newest_run("detect", accept), "run_id", None) == getattr(
                next((m for m in reversed(kept) if accept(m)), None), "run_id", None)
        assert store.find_complete("detect", kept[3].fingerprint).run_id == kept[3].run_id
    finally:
        mem.rm(base, recursive=True)


def test_an_outage_stops_the_reads_of_an_object_store_at_the_first_error():
    """The reads run several at once; the first failure is the answer, and the runs not yet asked are not
    asked (in an outage each would have waited through its retries: minutes a request)."""
    import threading
    import time

    from tasks.errors import StorageUnavailable

    asked: list[int] = []
    lock = threading.Lock()

    def read(i: int) -> int:
        with lock:
            asked.append(i)
        if i == 0:
            raise StorageUnavailable("cannot read: the object store is unreachable")
        time.sleep(0.2)
        return i

    store = ArtifactStore("memory://runs-scale-outage")
    with pytest.raises(StorageUnavailable):
        store._map(read, list(range(200)))
    assert len(asked) < 100, len(asked)
    assert store._map(lambda i: i * 2, list(range(40))) == [i * 2 for i in range(40)]  # in order
