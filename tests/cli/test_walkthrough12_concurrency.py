"""Several runs at once on one artifact root (the twelfth walkthrough, concurrency): what was wrong.

- ``aeflow run ... --run-id nightly`` while another process was running ``nightly`` with other settings said
  that the folder "holds an interrupted run with a different input or config" (it was running, not
  interrupted), and with the same settings it was refused with exit 4 (storage) and ``"kind": "storage"``
  under ``--json``, while the other ``--run-id`` refusals (a complete run, an interrupted one of other
  settings) are exit 2: the run id is the user's to change. Both now say who runs it since when, exit 2.
- A run's claim (``_claims/NNNNNN.json``) was created in place on a local artifact root and was empty for a
  moment: a second process that looked at the claims then read no claim, created the next generation, and
  both processes took up the same interrupted run (each clearing what the other wrote). Written under a
  temporary name and linked to its name now, a claim is whole or absent.
- Two overlapping backfills (or two ``--skip-existing`` runs) of one date, one of them interrupted with a
  checkpoint while the other completed the date: the interrupted run stayed for ever. The same backfill again
  skipped the date (a complete run exists), so nothing resumed it, and ``runs list --incomplete`` kept listing
  it as "resumed by the same command", its checkpoint kept. A skip now removes such a superseded interrupted
  run (one that no live process holds).
- ``aeflow backfill APP --model latest`` chose the model as each date's run started: a training run of the app
  that completed during the backfill (the nightly training, a colleague's) gave the later dates another model
  than the earlier ones, in one backfill. Chosen once now, when the backfill starts (and a root without a
  trained model is one refusal, exit 4, instead of every date failing alike).
- ``aeflow runs list`` (or a run starting) while the first run of an artifact root (or of an application) failed
  and removed its folder with the then empty ``runs/<app>`` and ``runs`` folders: the listing found the folder
  gone between its look and its read, and crashed with a FileNotFoundError traceback (exit 1, "a bug"). Two
  pollers of ``runs list --incomplete`` beside two failing runs met it once in eight runs. A folder removed
  meanwhile now lists as nothing.
- The heartbeat thread could write a claim back after the run gave it up: a heartbeat in flight while a run
  finished or failed recreated ``_claims/`` in the finished run, or the folder of a discarded run (a leftover
  holding only a claim). Giving up a claim now waits for the write in flight, and no later one writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tasks import storage
from tasks.errors import AeflowError
from tasks.storage import RUN_MARKER, ArtifactStore
from tests.conftest import files_under
from tests.refusals import assert_raised, assert_refused, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()


@refusal("--run-id of a run that another process is running now (wait for it to finish, or choose another)", 2,
         "configuration")
def test_run_id_of_a_running_run_is_refused_as_a_setting_and_not_called_interrupted(tmp_path):
    store = ArtifactStore(str(tmp_path))
    running = store.run("reduce", "nightly")
    running.write_json(RUN_MARKER, {"fingerprint": "a" * 64, "created": "2026-12-01T00:00:00+00:00"})
    now = time.time()
    # another live process on this host holds it (the test's parent process: alive for sure)
    running.write_json("_claims/000001.json", {"owner": "other", "pid": os.getppid(), "host": socket.gethostname(),
                                               "generation": 1, "started": now, "heartbeat": now})
    before = files_under(tmp_path)
    for fingerprint in ("a" * 64, "b" * 64):  # the same settings, and other settings
        with pytest.raises(AeflowError) as e:
            store.start_run("reduce", fingerprint, {}, run_id="nightly")
        assert_raised(e.value, test_run_id_of_a_running_run_is_refused_as_a_setting_and_not_called_interrupted,
                      f"is being run by process {os.getppid()} on {socket.gethostname()}",
                      "choose another --run-id")
        assert "interrupted" not in str(e.value), str(e.value)
    assert files_under(tmp_path) == before, "the running run's folder is left as it was"


def test_a_claim_being_created_is_never_taken_for_no_claim(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    first, second = store.run("reduce", "r1"), store.run("reduce", "r1")  # two processes take up the same run
    real_fdopen, seen = os.fdopen, {}

    def racing_fdopen(fd, *args, **kwargs):
        # the first process is creating its claim file: the second one looks at the claims right now
        if "second" not in seen:
            seen["second"] = None
            seen["second"] = second.claim()
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", racing_fdopen)
    won = first.claim()
    monkeypatch.undo()
    try:
        assert [won, seen["second"]].count(True) == 1, f"both took the run: {files_under(tmp_path)}"
    finally:
        first.release()
        second.release()


def test_a_heartbeat_in_flight_does_not_bring_back_a_discarded_run(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    run = store.start_run("reduce", "8" * 64, {})
    in_write, go, stop = threading.Event(), threading.Event(), threading.Event()
    real_write = storage.write_file

    def write_file(fs, path, data):
        if threading.current_thread() is beat and not in_write.is_set():
            in_write.set()  # a heartbeat is being written ...
            go.wait(30)     # ... and the run gives its claim up meanwhile
        return real_write(fs, path, data)

    class Clock:  # the heartbeat loop at once, and ended at the end of the test
        time = staticmethod(time.time)

        @staticmethod
        def sleep(seconds):
            if threading.current_thread() is beat:
                if stop.is_set():
                    raise SystemExit
                seconds = 0.01
            time.sleep(seconds)

    hook = threading.excepthook
    monkeypatch.setattr(threading, "excepthook", lambda args: None if args.thread is beat else hook(args))
    monkeypatch.setattr(storage, "write_file", write_file)
    monkeypatch.setattr(storage, "time", Clock)
    beat = threading.Thread(target=storage._heartbeat_loop, name="test-heartbeat", daemon=True)
    beat.start()
    try:
        assert in_write.wait(30)
        discarding = threading.Thread(target=run.discard)  # failed before any checkpoint: everything goes
        discarding.start()
        discarding.join(1)  # it removed the folder at once; now it waits for the heartbeat written meanwhile
        go.set()
        discarding.join(30)
    finally:
        go.set()
        stop.set()
        beat.join(30)
    assert not discarding.is_alive() and not beat.is_alive()
    assert not os.path.exists(run.path), f"left behind: {files_under(tmp_path)}"


def test_a_skip_removes_the_interrupted_run_that_the_complete_one_supersedes(prefect_server, wine_parquet, tmp_path):
    out = str(tmp_path / "out")
    cmd = ["run", "reduce", "--input", wine_parquet, "--output", out, "--epochs", "1", "--skip-existing", "--json"]
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    done = json.loads(res.stdout.strip().splitlines()[-1])
    store = ArtifactStore(out)
    manifest = store.run("reduce", done["run_id"]).manifest()
    # one being run now (by a live attempt): left alone; and the same date of an overlapping backfill,
    # interrupted after an epoch (its checkpoint kept)
    busy = store.start_run("reduce", manifest.fingerprint, manifest.config)
    left = store.start_run("reduce", manifest.fingerprint, manifest.config)
    left.save_checkpoint({"w": torch.ones(2)}, {"epoch": 1})
    left.discard()
    assert sorted(r["run_id"] for r in store.incomplete_runs("reduce")) == sorted([left.run_id, busy.run_id])

    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout.strip().splitlines()[-1])
    assert again["skipped"] and again["run_id"] == done["run_id"]
    assert not os.path.exists(left.path), files_under(left.path)
    assert [r["run_id"] for r in store.incomplete_runs("reduce")] == [busy.run_id]
    assert [m.run_id for m in store.list_runs("reduce")] == [done["run_id"]]
    busy.discard()


def test_backfill_model_latest_is_chosen_once_for_every_date(prefect_server, wine_parquet, tmp_path, monkeypatch):
    from tasks import schedule

    out = str(tmp_path / "out")
    res = runner.invoke(app, ["run", "reduce", "--input", wine_parquet, "--output", out, "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout.strip().splitlines()[-1])["run_uri"]
    for day in ("2026-11-01", "2026-11-02"):
        os.makedirs(tmp_path / "daily" / day)
        shutil.copy(wine_parquet, tmp_path / "daily" / day / "t.parquet")
    real, dates = schedule.prepare_config, []

    def prepare_config(config, date=None, timezone="UTC"):
        dates.append(date)
        if len(dates) == 2:  # a training of the app completed after the first date's run: a newer trained model
            newer = os.path.join(out, "runs", "reduce", "20991231T000000Z-newer")
            shutil.copytree(trained, newer)
            with open(os.path.join(newer, "manifest.json")) as f:
                manifest = json.load(f)
            manifest.update(run_id="20991231T000000Z-newer", run_uri=newer, created="2099-12-31T00:00:00+00:00")
            with open(os.path.join(newer, "manifest.json"), "w") as f:
                json.dump(manifest, f)
        return real(config, date, timezone)

    monkeypatch.setattr(schedule, "prepare_config", prepare_config)
    res = runner.invoke(app, ["backfill", "reduce", "-i", str(tmp_path / "daily" / "{date}" / "t.parquet"), "--model",
                              "latest", "-o", out, "--start", "2026-11-01", "--end", "2026-11-02", "--json"])
    assert res.exit_code == 0, res.output
    outcomes = json.loads(res.stdout.strip().splitlines()[-1])
    assert [o["status"] for o in outcomes] == ["completed", "completed"], outcomes
    models = [ArtifactStore(out).run("reduce", os.path.basename(o["run_uri"])).manifest().model_run for o in outcomes]
    assert len(dates) == 2 and models == [trained, trained], "one backfill, one model"


@refusal("aeflow backfill --model latest under an --output that holds no complete run of the app that trained a model "
         "(refused before any date runs; every date failed alike)", 4, "storage")
def test_backfill_model_latest_without_a_trained_model_is_one_refusal(tmp_path):
    res = runner.invoke(app, ["backfill", "reduce", "-i", str(tmp_path / "{date}.parquet"), "--model", "latest",
                              "-o", str(tmp_path / "out"), "--start", "2026-11-01", "--end", "2026-11-03"])
    assert_refused(res, test_backfill_model_latest_without_a_trained_model_is_one_refusal,
                   "holds no complete reduce run that trained a model")
    assert "2026-11-01" not in res.output, "no date ran"
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, f"one line, no blank ones: {res.stderr!r}"


@refusal("aeflow backfill --output in a bucket that does not exist (refused before any date runs; every date failed "
         "alike, each advised to run the same command again)", 4, "storage")
def test_backfill_output_bucket_that_does_not_exist_is_one_refusal(tmp_path, s3_endpoint):
    res = runner.invoke(app, ["backfill", "reduce", "-i", str(tmp_path / "{date}.parquet"), "-o",
                              "s3://no-such-backfill-bucket/aeflow", "--start", "2026-11-01", "--end", "2026-11-03"])
    assert_refused(res, test_backfill_output_bucket_that_does_not_exist_is_one_refusal,
                   "bucket 'no-such-backfill-bucket' does not exist")
    assert "2026-11-01" not in res.output and "run the same command again" not in res.output, res.output


def test_listing_while_a_failed_first_run_removes_the_runs_folder(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    real_ls, failing = store.fs.ls, []

    def ls(path, *args, **kwargs):
        if failing:  # it fails between the listing's look and its read: its folder, runs/detect and runs go
            failing.pop().discard(keep_checkpoint=False)
        return real_ls(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "ls", ls)
    failing.append(store.start_run("detect", "9" * 64, {}))  # the root's first run, which fails in a moment
    assert store.incomplete_runs() == []  # runs/ went
    failing.append(store.start_run("detect", "9" * 64, {}))
    assert store.list_runs("detect") == []  # runs/detect went
    assert not os.path.exists(os.path.join(str(tmp_path), "runs"))
