"""runs_scale: an artifact root after a year of daily runs — what `runs list`, `--model latest`,
`--skip-existing` and `decompress` cost there, new code vs the previous algorithm, side by side.

The root is synthesised from real runs: three small runs are made once with the real CLI (``reduce`` on
the wine table, ``compress`` twice on four 32x32 images, two seeds: two codecs) and their folders are
copied (hard links; manifest.json rewritten) into a year of history: 7 applications, one run a day
each, a training run every 7th day and apply runs (``model_run`` = that week's training run) between,
two runs per application named by hand (``--run-id``), and 3 interrupted runs (a marker and a
checkpoint, no manifest). The compress runs of the newest week hold the first codec, those of the
oldest week the second; other weeks hold codecs of their own (a config.json with another identity).

Measured in one process, each operation on the same root with the new code (``tasks/storage.py``,
``tasks/schedule.py``, ``tasks/codec.py``) and with the previous algorithm (kept below as
``old_*`` functions, the CLI commands run with it patched in). Best of ``--repeat`` runs; s3fs's
listing cache is emptied before each. With ``--s3`` the same on a SeaweedFS server started here
(``weed`` from the virtual environment, on 127.0.0.1) holding a smaller root: per-request latency
is what counts there.

    python -m benchmarks.runs_scale [--runs 3000] [--s3 --s3-runs 300] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from benchmarks._common import machine, md_table, update_section

WORK = Path(__file__).with_name("_work") / "runs_scale"
BIN = Path(sys.executable).parent
APPS = ["reduce", "extract", "detect", "impute", "denoise", "compress", "index"]


# ---------------------------------------------------------------------------------------
# The previous algorithms (tasks/storage.py, tasks/schedule.py, tasks/codec.py before this change)


def old_list_runs(store, app=None):
    from tasks.errors import StorageError

    manifests = []
    for run in store._run_dirs(app):
        if run.is_complete:
            try:
                manifests.append(run.manifest())
            except StorageError as e:
                if e.transient:
                    raise
                continue
            except Exception:  # noqa: BLE001, S112 - as the previous list_runs (it logged a warning)
                continue
    return sorted(manifests, key=lambda m: (m.created, m.run_id))


def old_find_complete(store, app, fingerprint):
    for m in reversed(old_list_runs(store, app)):
        if m.fingerprint == fingerprint:
            return m
    return None


def old_incomplete(store, app, fingerprint):
    from tasks.errors import StorageError
    from tasks.storage import RUN_MARKER

    for run in store._run_dirs(app):
        if not run.is_complete and run.exists(RUN_MARKER):
            try:
                if run.read_json(RUN_MARKER).get("fingerprint") == fingerprint:
                    yield run
            except json.JSONDecodeError:
                continue
            except StorageError as e:
                if e.transient:
                    raise
                continue


def old_incomplete_runs(store, app=None):
    from tasks.errors import StorageError
    from tasks.storage import CHECKPOINT_DIR, RUN_MARKER

    found = []
    for run in store._run_dirs(app):
        if run.is_complete or not run.exists(RUN_MARKER):
            continue
        try:
            marker = run.read_json(RUN_MARKER)
            ckpt = run.read_json(f"{CHECKPOINT_DIR}/meta.json") if run.exists(f"{CHECKPOINT_DIR}/meta.json") else None
        except (json.JSONDecodeError, StorageError) as e:
            if isinstance(e, StorageError) and e.transient:
                raise
            continue
        holder = run.claim_holder()
        found.append({
            "app": run.app, "run_id": run.run_id, "run_uri": run.uri, "created": marker.get("created", ""),
            "running": {k: holder.get(k) for k in ("pid", "host")} if holder else None,
            "checkpoint": {k: ckpt.get(k) for k in ("epoch", "step", "finished")} if isinstance(ckpt, dict) else None,
        })
    return sorted(found, key=lambda r: (str(r["created"]), r["run_id"]))


def old_latest_model_run(app, output):
    from tasks.storage import ArtifactStore

    for m in reversed(old_list_runs(ArtifactStore(output), app)):
        if not m.model_run:
            return m.run_uri
    raise LookupError(app)


def old_find_codec_run(root, identity):
    from tasks.codec import load_codec_run
    from tasks.errors import StorageError
    from tasks.storage import MODEL_DIR, ArtifactStore

    store = ArtifactStore(root)
    for manifest in reversed(old_list_runs(store, "compress")):
        run = store.run("compress", manifest.run_id)
        try:
            meta = run.read_json(f"{MODEL_DIR}/config.json")
        except (StorageError, json.JSONDecodeError):
            continue
        if meta.get("codec_id") == identity.hex():
            return load_codec_run(run.uri)
    return None


@contextmanager
def previous_algorithm() -> Iterator[None]:
    """The CLI and the pipeline's helpers with the previous algorithm patched in."""
    from tasks.storage import ArtifactStore

    with mock.patch.object(ArtifactStore, "list_runs", old_list_runs), \
         mock.patch.object(ArtifactStore, "incomplete_runs", old_incomplete_runs):
        yield


# ---------------------------------------------------------------------------------------
# The root


def _aeflow(*args: str, cwd: Path) -> None:
    subprocess.run([str(BIN / "aeflow"), *args, "--quiet", "--json"], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def seed_runs() -> dict[str, Path]:
    """Three real runs made once with the CLI (kept under benchmarks/_work): reduce, and two compress codecs."""
    seed = WORK / "seed"
    done = WORK / "seed.json"
    if done.exists():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    from PIL import Image
    from sklearn.datasets import load_wine

    shutil.rmtree(seed, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    load_wine(as_frame=True).frame.to_csv(WORK / "wine.csv", index=False)
    (WORK / "imgs").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for j in range(4):
        img = 128 + 80 * np.sin(xx / (3 + j)) * np.cos(yy / 4) + rng.normal(0, 5, (32, 32))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(WORK / "imgs" / f"i{j}.png")
    _aeflow("run", "reduce", "-i", "wine.csv", "--epochs", "1", "-o", "seed", cwd=WORK)
    codec = ["-i", "imgs", "--epochs", "1", "--channels", "16", "--latent-channels", "16", "--patch-size", "32",
             "--patches", "8", "--rd-images", "2", "-o", "seed"]
    _aeflow("run", "compress", *codec, "--seed", "0", "--run-id", "codec-a", cwd=WORK)
    _aeflow("run", "compress", *codec, "--seed", "1", "--run-id", "codec-b", cwd=WORK)
    found = {"reduce": next((seed / "runs" / "reduce").iterdir()),
             "codec-a": seed / "runs" / "compress" / "codec-a", "codec-b": seed / "runs" / "compress" / "codec-b"}
    done.write_text(json.dumps({k: str(v) for k, v in found.items()}))
    return found


def build_root(root: Path, runs: int) -> dict[str, Any]:
    """A root of about ``runs`` runs (a year of 7 apps daily at --runs 2555); returns what the timings look for."""
    from tasks.storage import new_run_id

    seeds = seed_runs()
    days = max(8, -(-runs // len(APPS)))
    info_file = root / "_built.json"
    if info_file.exists() and json.loads(info_file.read_text()).get("days") == days:
        return json.loads(info_file.read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days + 1)
    templates = {k: json.loads((v / "manifest.json").read_text()) for k, v in seeds.items()}
    codec_meta = json.loads((seeds["codec-a"] / "model" / "config.json").read_text())
    weeks = -(-days // 7)
    fake_codecs: dict[int, Path] = {}
    for w in range(1, weeks - 1):  # other weeks: a codec of their own (another identity), weights not needed
        f = root / "_codecs" / f"week{w}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({**codec_meta, "codec_id": hashlib.sha256(f"week{w}".encode()).hexdigest()[:16]}))
        fake_codecs[w] = f
    info: dict[str, Any] = {"days": days, "runs": 0, "fingerprints": {}, "training": {}, "named": []}

    def write_run(app: str, run_id: str, created: datetime, fp: str, model_run: str | None, data: str,
                  source: Path, codec_json: Path | None) -> str:
        folder = root / "runs" / app / run_id
        for f in source.rglob("*"):
            rel = f.relative_to(source)
            if f.is_dir() or rel.name == "manifest.json":
                continue
            dest = folder / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(codec_json if codec_json is not None and str(rel) == "model/config.json" else f, dest)
        m = json.loads(json.dumps(templates["reduce" if app != "compress" else "codec-a"]))
        uri = str(folder)
        m.update(app=app, run_id=run_id, run_uri=uri, created=created.isoformat().replace("+00:00", "Z"),
                 finished=(created + timedelta(seconds=40)).isoformat().replace("+00:00", "Z"), fingerprint=fp,
                 model_run=model_run)
        m["config"].update(model_run=model_run, output=str(root))
        m["config"]["load"]["input" if model_run is None else "apply_to"] = data
        m["metrics"] = {k: (v * float(rng.uniform(0.9, 1.1)) if isinstance(v, float) else v)
                        for k, v in m["metrics"].items()}
        (folder / "manifest.json").write_text(json.dumps(m, indent=2))
        done = (created + timedelta(seconds=40)).timestamp()
        os.utime(folder, (done, done))  # the folder last changed when the run finished, as in a real history
        info["runs"] += 1
        return uri

    for d in range(days):
        day = (start + timedelta(days=d)).date()
        week = d // 7
        for k, app in enumerate(APPS):
            created = start + timedelta(days=d, hours=2, minutes=30 + 7 * k, seconds=int(rng.integers(0, 50)),
                                        microseconds=int(rng.integers(0, 10**6)))
            training = d % 7 == 0
            fp = hashlib.sha256(f"{app}|{day}|{training}".encode()).hexdigest()
            run_id = new_run_id(fp, created + timedelta(seconds=int(rng.integers(0, 4))))
            codec_json = None
            source = seeds["reduce"]
            if app == "compress":
                source = seeds["codec-a"] if week == weeks - 1 else seeds["codec-b"]
                codec_json = None if week in (0, weeks - 1) else fake_codecs[week]
            uri = write_run(app, run_id, created, fp, None if training else info["training"][app],
                            f"s3://lake/{app}/{day}/", source, codec_json)
            if training:
                info["training"][app] = uri
            if d == days // 2:
                info["fingerprints"][app] = fp  # a day in the middle of the year (a backfill re-run)
    for k, app in enumerate(APPS):  # named by hand, early in the year
        for n, name in enumerate(("baseline-v1", "candidate")):
            created = start + timedelta(days=3 + 30 * n, hours=9, minutes=k)
            fp = hashlib.sha256(f"{app}|{name}".encode()).hexdigest()
            source = seeds["reduce"] if app != "compress" else seeds["codec-b"]
            codec_json = fake_codecs.get(1) if app == "compress" else None
            write_run(app, name, created, fp, None, f"s3://lake/{app}/history/", source, codec_json)
    for app in ("reduce", "detect", "compress"):  # interrupted on the last day
        created = start + timedelta(days=days - 1, hours=5)
        fp = hashlib.sha256(f"{app}|interrupted".encode()).hexdigest()
        folder = root / "runs" / app / new_run_id(fp, created)
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "_run.json").write_text(json.dumps({"app": app, "fingerprint": fp, "created": created.isoformat(),
                                                      "config": {}, "run_id": folder.name}))
        (folder / "checkpoint" / "meta.json").write_text(json.dumps({"epoch": 3, "step": 0, "finished": False}))
    shutil.rmtree(root / "_codecs", ignore_errors=True)
    info["codec_a"] = json.loads((seeds["codec-a"] / "model" / "config.json").read_text())["codec_id"]
    info["codec_b"] = json.loads((seeds["codec-b"] / "model" / "config.json").read_text())["codec_id"]
    info_file.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------------------
# SeaweedFS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def seaweedfs() -> Iterator[dict[str, str]]:
    """``weed server`` with its S3 gateway on free ports of 127.0.0.1; yields the s3fs environment."""
    from flows.platform.components import s3_identities, weed_binary

    tmp = Path(tempfile.mkdtemp(prefix="runs-scale-weed-"))
    (tmp / "data").mkdir()
    key, secret = "RUNSSCALEKEY", "runs-scale-secret-key"
    (tmp / "identities.json").write_text(json.dumps(s3_identities(key, secret)))
    p = {name: _free_port() for name in ("m", "mg", "v", "vg", "f", "fg", "s3", "s3g")}
    cmd = [weed_binary(), "server", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={p['m']}", f"-master.port.grpc={p['mg']}", f"-volume.port={p['v']}",
           f"-volume.port.grpc={p['vg']}", f"-filer.port={p['f']}", f"-filer.port.grpc={p['fg']}", "-s3",
           f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}", f"-s3.config={tmp / 'identities.json'}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.resumeState=false",
           "-master.volumeSizeLimitMB=256", "-volume.max=0"]
    log = open(tmp / "weed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}", "AWS_ACCESS_KEY_ID": key,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.time() + 120
        while True:
            try:
                s3fs.S3FileSystem.clear_instance_cache()
                fs = s3fs.S3FileSystem()
                if not fs.exists("runs-scale"):
                    fs.mkdir("runs-scale")
                fs.pipe_file("runs-scale/probe", b"ok")
                if fs.cat_file("runs-scale/probe") == b"ok":
                    break
            except Exception:  # noqa: BLE001 - still starting
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start; see {tmp / 'weed.log'}") from None
                time.sleep(1)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def upload(local: Path, uri: str, codec_ids: set[str]) -> None:
    """The root's files to ``uri``; weights only where a real codec is (decompress loads it)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    base = uri.removeprefix("s3://")
    lpaths, rpaths = [], []
    for f in local.rglob("*"):
        rel = f.relative_to(local).as_posix()
        if f.is_dir() or rel == "_built.json":
            continue
        if f.name == "weights.safetensors":
            meta = json.loads((f.parent / "config.json").read_text())
            if meta.get("codec_id") not in codec_ids:
                continue
        lpaths.append(str(f))
        rpaths.append(f"{base}/{rel}")
    fs.put(lpaths, rpaths)


# ---------------------------------------------------------------------------------------
# Timing


REQUESTS = [0]  # S3 requests made (every one goes through S3FileSystem._call_s3), or local file calls


@contextmanager
def counted_file_calls() -> Iterator[None]:
    """Count the local filesystem's reads and probes (cat_file, exists, info, ls)."""
    from fsspec.implementations.local import LocalFileSystem

    patches = []
    for name in ("cat_file", "exists", "info", "ls"):
        real = getattr(LocalFileSystem, name)

        def spy(fs, path, *a, _real=real, **k):
            REQUESTS[0] += 1
            return _real(fs, path, *a, **k)

        patches.append(mock.patch.object(LocalFileSystem, name, spy))
    for patch in patches:
        patch.start()
    try:
        yield
    finally:
        for patch in patches:
            patch.stop()


@contextmanager
def counted_requests(latency_s: float = 0.0) -> Iterator[None]:
    """Count the S3 requests; with ``latency_s``, each waits that long first (a store farther away than
    127.0.0.1: the requests made concurrently wait concurrently, as they would)."""
    import asyncio

    from s3fs import S3FileSystem

    real = S3FileSystem._call_s3

    async def call(self, method, *args, **kwargs):
        REQUESTS[0] += 1
        if latency_s:
            await asyncio.sleep(latency_s)
        return await real(self, method, *args, **kwargs)

    with mock.patch.object(S3FileSystem, "_call_s3", call):
        yield


def best_of(fn: Callable[[], Any], repeat: int, before: Callable[[], None]) -> tuple[float, Any, int]:
    """(best time, result, S3 requests of one call)."""
    times, result = [], None
    for _ in range(repeat):
        before()
        REQUESTS[0] = 0
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result, REQUESTS[0]


def cli(*args: str) -> str:
    from typer.testing import CliRunner

    from flows.cli import build_app

    res = CliRunner().invoke(build_app(), list(args), env={"COLUMNS": "200"})
    if res.exit_code != 0:
        raise RuntimeError(f"aeflow {' '.join(args)} failed ({res.exit_code}): {res.output[-2000:]}")
    return res.output


def measure(root: str, info: dict[str, Any], repeat: int) -> list[list[str]]:
    """Each operation with the new code and with the previous algorithm: rows of the table."""
    from tasks.codec import find_codec_run
    from tasks.schedule import latest_model_run
    from tasks.storage import ArtifactStore, url_to_fs

    fs, path = url_to_fs(root)
    store = ArtifactStore(root)

    def fresh() -> None:
        fs.invalidate_cache()

    app = "detect"
    fp_done = info["fingerprints"][app]  # a day in the middle of the year
    fp_new = hashlib.sha256(b"a new day").hexdigest()
    a, b = bytes.fromhex(info["codec_a"]), bytes.fromhex(info["codec_b"])
    missing = hashlib.sha256(b"no such codec").digest()[:8]
    newest = store.run(app, os.path.basename(info["training"][app].rstrip("/")))
    show_uri = newest.uri

    def new_run_scan(new: bool) -> Callable[[], Any]:
        def go() -> Any:
            if new:
                return store.find_complete(app, fp_new), list(store._incomplete(app, fp_new))
            return old_find_complete(store, app, fp_new), list(old_incomplete(store, app, fp_new))
        return go

    def json_runs(out: str) -> list:
        return [(r["app"], r["run_id"]) for r in json.loads(out)]

    ops: list[tuple[str, Callable[[], Any], Callable[[], Any], Callable[[Any], Any]]] = [
        ("`runs list` (table)", lambda: cli("runs", "list", "-o", root), lambda: cli("runs", "list", "-o", root), str),
        ("`runs list --json`", lambda: cli("runs", "list", "-o", root, "--json"),
         lambda: cli("runs", "list", "-o", root, "--json"), json_runs),
        (f"`runs list --app {app} --json`", lambda: cli("runs", "list", "-o", root, "--app", app, "--json"),
         lambda: cli("runs", "list", "-o", root, "--app", app, "--json"), json_runs),
        ("`runs list --incomplete --json`", lambda: cli("runs", "list", "-o", root, "--incomplete", "--json"),
         lambda: cli("runs", "list", "-o", root, "--incomplete", "--json"), json_runs),
        ("`runs show RUN --json`", lambda: cli("runs", "show", show_uri, "--json"),
         lambda: cli("runs", "show", show_uri, "--json"), str),
        (f"`run {app} --model latest` (resolve latest)", lambda: latest_model_run(app, root),
         lambda: old_latest_model_run(app, root), str),
        (f"`run {app} --skip-existing`, a date done half a year ago", lambda: store.find_complete(app, fp_done).run_id,
         lambda: old_find_complete(store, app, fp_done).run_id, str),
        (f"`run {app} --skip-existing`, a new date (+ start_run's look for an interrupted run)",
         new_run_scan(True), new_run_scan(False), repr),
        ("`decompress` without --model: find + load the codec, newest week's", lambda: find_codec_run(root, a).source,
         lambda: old_find_codec_run(root, a).source, str),
        ("`decompress` without --model: find + load the codec, oldest week's", lambda: find_codec_run(root, b).source,
         lambda: old_find_codec_run(root, b).source, str),
        ("`decompress` without --model: a codec not there", lambda: find_codec_run(root, missing),
         lambda: old_find_codec_run(root, missing), repr),
    ]
    cli("runs", "list", "-o", root, "--app", app, "--json")  # imports (the CLI's, torch's) out of the first timing
    find_codec_run(root, a)
    rows = []
    t_find, found, _ = best_of(lambda: fs.find(path.rstrip("/") + "/runs"), repeat, fresh)
    t_ls, _, _ = best_of(lambda: [fs.ls(f"{path.rstrip('/')}/runs/{x}") for x in APPS], repeat, fresh)
    for name, ours, old, key in ops:
        t_new, r_new, n_new = best_of(ours, repeat, fresh)
        with previous_algorithm():
            t_old, r_old, n_old = best_of(old, repeat, fresh)
        same = "yes" if key(r_new) == key(r_old) else "**NO**"
        row = [name, f"{t_new:.3f}", f"{t_old:.3f}", f"{t_new / t_old:.3f}", same]
        rows.append([*row, f"{n_new:,} / {n_old:,}"])
        print(f"  {name}: ours {t_new:.3f} s, previous {t_old:.3f} s, same result: {same}, calls {n_new} / {n_old}",
              flush=True)
    rows.append([f"for scale: listing every file under runs/ (`fs.find`, {len(found):,} files)", f"{t_find:.3f}",
                 "", "", "", ""])
    rows.append(["for scale: listing the 7 app folders (`fs.ls` each)", f"{t_ls:.3f}", "", "", "", ""])
    return rows


NOTES = """\
What changed (`tasks/storage.py`, `tasks/schedule.py`, `tasks/codec.py`):

- **One read per run, not three.** `list_runs` checked `manifest.json` exists twice (`is_complete`, then
  `manifest()`) before reading it; now it reads it, and a missing file is the answer. On S3 each JSON read is
  also one GET instead of HEAD + GET (s3fs asks the size first to fetch large objects in parts;
  `cat_small` passes `max_concurrency=1`), and the reads go 16 at a time (`ArtifactStore._map`).
  `runs list --incomplete` keeps its one existence check per run, 16 at a time on S3.
- **The newest run without reading the year.** `--model latest`, `--skip-existing` (`find_complete`) and
  `decompress` (`find_codec_run`) took `reversed(list_runs(app))`; now `ArtifactStore.newest_run` reads a local
  root's run folders newest modification first (one `os.stat` of each run folder of the app, not in the
  counts above: microseconds each) and stops at the first folder that last changed (plus an hour
  of slack for another host's clock) before the best run found so far was created: a run's `created` precedes
  the writing of its manifest into its folder, whatever the run is named. `decompress` reads a run's
  `model/config.json` first and its manifest only where the codec matches. An object store keeps no time for a
  folder, so there every manifest is still read, one request each, 16 at a time. `--skip-existing` for a date
  not run yet reads every manifest of the app (once, locally; concurrently on S3) — the answer is "none".
- **start_run's look for an interrupted run** (every `aeflow run`) probed every folder of the app; it now passes
  over folders whose name `start_run` made for another fingerprint (`<time>-<fingerprint[:8]>`), since their
  marker holds that fingerprint.

Left as it was: the rich table of `runs list` renders every row (1 ms a row here, most of the
3,000-row table's time, measured twice to choose whether the data column fits); `runs show` reads one run
(constant); `runs list --incomplete` still asks each complete run for its manifest. The S3 timings on
127.0.0.1 have ~1 ms requests; the simulated-latency table shows what a remote store's round trips cost."""


HEADER = ["operation", "ours s", "previous s", "ours / previous", "same result",
          "file calls ours / previous (cat_file, exists, info, ls)"]
S3_HEADER = [*HEADER[:-1], "S3 requests ours / previous"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3000, help="runs in the local root (7 apps a day)")
    ap.add_argument("--s3", action="store_true", help="also on a SeaweedFS server started here")
    ap.add_argument("--s3-runs", type=int, default=300, help="runs in the S3 root")
    ap.add_argument("--s3-latency-ms", type=float, default=0.0,
                    help="also time the S3 root with this much added before each request (a remote store)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many")
    ap.add_argument("--quick", action="store_true", help="a tiny version (70 runs, S3 35), results not written")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.s3_runs, args.repeat = 70, 35, 1
    import logging

    logging.getLogger("aeflow.storage").setLevel(logging.ERROR)
    root = WORK / f"root-{args.runs}"
    t0 = time.time()
    info = build_root(root, args.runs)
    print(f"local root {root}: {info['runs']} complete runs + 3 interrupted ({time.time() - t0:.0f} s to build)")
    with counted_file_calls():
        rows = measure(str(root), info, args.repeat)
    sections = [f"### Local folder: {info['runs']:,} complete runs + 3 interrupted\n\n" + md_table(HEADER, rows)]
    if args.s3:
        s3_local = WORK / f"root-{args.s3_runs}"
        s3_info = build_root(s3_local, args.s3_runs)
        with seaweedfs():
            uri = "s3://runs-scale/root"
            t0 = time.time()
            upload(s3_local, uri, {s3_info["codec_a"], s3_info["codec_b"]})
            print(f"S3 root {uri}: {s3_info['runs']} complete runs ({time.time() - t0:.0f} s to upload)")
            # the manifests name the local folder; the S3 copy is what is read (decompress loads by the store's path)
            s3_repeat = max(1, args.repeat - 1)
            with counted_requests():
                rows = measure(uri, s3_info, s3_repeat)
            sections.append(f"### S3 (SeaweedFS on 127.0.0.1): {s3_info['runs']:,} complete runs + 3 interrupted\n\n"
                            + md_table(S3_HEADER, rows))
            if args.s3_latency_ms:
                with counted_requests(args.s3_latency_ms / 1000):
                    rows = measure(uri, s3_info, 1)
                sections.append(f"### The same S3 root, {args.s3_latency_ms:g} ms added before each request (simulated: "
                                "a store in another building or region)\n\n" + md_table(S3_HEADER, rows))
    body = "\n\n".join(sections)
    print(body)
    if args.quick:
        return
    cmd = f"python -m benchmarks.runs_scale --runs {args.runs}" + (f" --s3 --s3-runs {args.s3_runs}" if args.s3 else "")
    cmd += f" --s3-latency-ms {args.s3_latency_ms:g}" if args.s3 and args.s3_latency_ms else ""
    update_section("Artifact root with thousands of runs (runs_scale.py)", f"""
Machine: {machine()}; 2 cores shared with another agent's work (tests and builds) while this ran. `{cmd}`:
a synthetic root, a year of 7 applications run daily (weekly training, daily apply with that model), built by
copying three real small runs (hard links, manifest.json rewritten); see the script's docstring. Each command
in one process, the new code vs the previous algorithm (kept in the script) on the same root, best of
{args.repeat} (S3: {max(1, args.repeat - 1)}); "same result" compares what each returned.

{body}

{NOTES}
""")


if __name__ == "__main__":
    main()
