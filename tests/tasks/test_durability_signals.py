"""Kills, Ctrl-C and SIGTERM at the edges of a run: its folder is always complete or resumable.

- a kill at any step of writing the manifest leaves the run resumable (marker + checkpoint) or complete
  (manifest), and a complete run's leftovers are never taken for an unfinished run;
- Ctrl-C (or an error) between a run's claim and the code that gives it back on failure leaves no
  folder holding only ``_claims/``;
- SIGTERM to ``aeflow run`` (``kill``, systemd, a container's stop) unwinds as Ctrl-C does: a message, exit
  143, the claim given back, the checkpoint kept for the same command to resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from tasks.errors import ConfigError
from tasks.storage import ArtifactStore, Manifest, RunDir

pytestmark = pytest.mark.tasks
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FP = "3" * 64


class Killed(BaseException):
    """The process dies here: nothing after this point runs (a finally block may, a kill's would not)."""


def _training_run(store: ArtifactStore) -> RunDir:
    """A run that trained (checkpoint of epoch 3) and wrote its outputs: only the manifest is missing."""
    run = store.start_run("reduce", FP, {})
    run.write_bytes("embeddings.parquet/part.00000.parquet", b"PAR1 rows")
    run.save_checkpoint({"w": torch.ones(2)}, {"epoch": 3})
    return run


def _manifest(run: RunDir) -> Manifest:
    from datetime import UTC, datetime

    return Manifest(app=run.app, run_id=run.run_id, run_uri=run.uri, created=datetime.now(UTC),
                    finished=datetime.now(UTC), fingerprint=FP, config={}, outputs=run.output_records())


def _kill_at(monkeypatch, step: int) -> list[str]:
    """Kill the process before the ``step``-th write or removal in a run folder (0: the first)."""
    done: list[str] = []
    for name in ("write_bytes", "remove"):
        real = getattr(RunDir, name)

        def op(self, rel, *a, _real=real, _name=name, **k):
            if len(done) == step:
                raise Killed(f"killed before {_name}({rel!r})")
            done.append(f"{_name} {rel}")
            return _real(self, rel, *a, **k)

        monkeypatch.setattr(RunDir, name, op)
    return done


# -- 1. completing a run ----------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_a_kill_at_any_step_of_completion_leaves_the_run_resumable_or_complete(tmp_path, monkeypatch, step):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    run = _training_run(store)
    outputs = run.list_files()
    with monkeypatch.context() as m:
        done = _kill_at(m, step)
        with pytest.raises(Killed):
            run.write_manifest(_manifest(run))
    run._forget_claim()  # the process is gone: its claim is stale
    complete = run.is_complete
    resumable = run.exists("_run.json") and run.exists("checkpoint/meta.json")
    assert complete or resumable, f"killed after {done}: neither complete nor resumable: {sorted(os.listdir(run.path))}"
    if not complete:  # the same command resumes it, training from its checkpoint
        assert [r["run_id"] for r in store.incomplete_runs()] == [run.run_id]
        resumed = store.start_run("reduce", FP, {})
        assert resumed.run_id == run.run_id and resumed.load_checkpoint()[1] == {"epoch": 3}
        resumed.discard()
        return
    # complete everywhere, whatever it still holds
    assert [m.run_id for m in store.list_runs()] == [run.run_id]
    assert store.incomplete_runs() == [], "a complete run listed as unfinished"
    assert store.find_complete("reduce", FP).run_id == run.run_id, "--skip-existing does not see it"
    with pytest.raises(ConfigError, match="already exists and is complete"):
        store.start_run("reduce", FP, {}, run_id=run.run_id)
    # the next run of the same input and config starts afresh (a complete run is never resumed) and tidies it
    fresh = store.start_run("reduce", FP, {})
    assert fresh.run_id != run.run_id
    fresh.discard()
    assert sorted(os.listdir(run.path)) == ["embeddings.parquet", "manifest.json"], os.listdir(run.path)
    assert run.list_files() == outputs and run.manifest().run_id == run.run_id


def test_an_interrupt_right_after_the_manifest_leaves_the_run_complete(tmp_path, monkeypatch):
    """Ctrl-C after the manifest was written: run_app's failure path gives the run back (discard). It
    cleared the complete run's files, or removed the whole folder, manifest and all."""
    store = ArtifactStore(str(tmp_path / "artifacts"))
    run = _training_run(store)
    with monkeypatch.context() as m:
        _kill_at(m, 1)  # the step after writing the manifest
        with pytest.raises(Killed):
            run.write_manifest(_manifest(run))
    run.discard()  # as run_app does on any exception
    assert run.is_complete and run.manifest().run_id == run.run_id
    assert sorted(os.listdir(run.path)) == ["embeddings.parquet", "manifest.json"], os.listdir(run.path)


# -- 2. between the claim and run_app's try ------------------------------------------------------------


def _interrupt(*_a, **_k):
    raise KeyboardInterrupt("Ctrl-C")


def _interrupt_once(real):
    """``real`` with one Ctrl-C on its first call (the cleanup that follows calls it again, uninterrupted)."""
    calls = []

    def method(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("Ctrl-C")
        return real(*a, **k)

    return method


def _leftovers(root) -> list[str]:
    """Every folder under ``root`` that holds ``_claims`` (a run given back holds none)."""
    return [d for d, subdirs, _ in os.walk(root) if "_claims" in subdirs]


@pytest.mark.parametrize("where", ["claim", "marker"])
def test_ctrl_c_while_a_new_run_is_claimed_leaves_no_folder(tmp_path, monkeypatch, where):
    import tasks.storage

    root = tmp_path / "artifacts"
    store = ArtifactStore(str(root))
    if where == "claim":  # the claim is created, this attempt has not recorded it yet
        monkeypatch.setattr(tasks.storage, "_start_heartbeat", _interrupt)
    else:  # claimed, the in-progress marker not written yet
        monkeypatch.setattr(RunDir, "write_json", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.start_run("reduce", FP, {})
    assert _leftovers(root) == [] and not (root / "runs").exists(), list(os.walk(root))


def test_ctrl_c_while_an_interrupted_run_is_taken_up_keeps_it_resumable(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    interrupted = _training_run(store)
    interrupted.discard()  # killed mid-training: checkpoint kept, claim given back
    with monkeypatch.context() as m:
        m.setattr(RunDir, "clear_partial", _interrupt_once(RunDir.clear_partial))
        with pytest.raises(KeyboardInterrupt):
            store.start_run("reduce", FP, {})
    assert _leftovers(tmp_path) == [], "the claim of an attempt that gave up"
    entry = store.incomplete_runs()
    assert [(r["run_id"], r["running"], r["checkpoint"]["epoch"]) for r in entry] == [(interrupted.run_id, None, 3)]
    again = store.start_run("reduce", FP, {})
    assert again.run_id == interrupted.run_id and again.load_checkpoint()[1] == {"epoch": 3}
    again.discard()


def test_ctrl_c_before_run_app_owns_the_run_leaves_no_claimed_folder_and_says_so(tmp_path, monkeypatch, capsys):
    """run_app claimed the run (start_run), then said which run it is: Ctrl-C there left the folder claimed.
    And the CLI said "run X is incomplete; the same command again resumes it" of a run whose folder the interrupt
    had removed (no checkpoint yet): nothing there to resume, and `runs list --incomplete` showed nothing."""
    import typer

    import flows.pipeline
    import tasks.load
    from flows.cli.common import fail
    from tasks.apps import get_app
    from tasks.config import resolve_config

    pd.DataFrame({"id": range(40), **{f"f{i}": [float((j * (i + 3)) % 7) for j in range(40)] for i in range(4)}}) \
        .to_csv(tmp_path / "t.csv", index=False)
    # no Prefect task run (and so no API server) is needed to reach that point
    monkeypatch.setattr(tasks.load, "inspect_input", tasks.load.inspect_input.fn)
    monkeypatch.setattr(flows.pipeline, "_first_attempt", _interrupt)
    root = tmp_path / "artifacts"
    config = resolve_config(get_app("reduce").RunConfig, options={
        "load.input": str(tmp_path / "t.csv"), "load.id_column": "id", "output": str(root)})
    with pytest.raises(KeyboardInterrupt) as info:
        flows.pipeline.run_app(config)
    assert _leftovers(root) == [] and not (root / "runs").exists(), list(os.walk(root))
    uri = info.value.aeflow_run_uri
    assert not os.path.exists(uri) and info.value.aeflow_run_kept is False
    with pytest.raises(typer.Exit) as exit_:
        fail(info.value)
    said = " ".join(capsys.readouterr().err.split())
    assert exit_.value.exit_code == 130
    assert said == (f"interrupted: run {uri} stopped before its first checkpoint and was removed: nothing to resume; "
                    "the same command again starts over"), said
    # a run that kept its checkpoint is still said to be resumable
    e = KeyboardInterrupt()
    e.aeflow_run_uri, e.aeflow_run_kept = uri, True
    with pytest.raises(typer.Exit):
        fail(e)
    assert f"run {uri} is incomplete; the same command again resumes it" in " ".join(capsys.readouterr().err.split())


# -- 3. SIGTERM to `aeflow run` ----------------------------------------------------------------------------


def test_sigterm_unwinds_like_ctrl_c_only_while_the_command_runs():
    from flows.cli.common import Terminated, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, in the main thread
    assert signal.getsignal(signal.SIGTERM) is before, "the handler outlived the command"
    assert isinstance(Terminated(), KeyboardInterrupt), "every Ctrl-C path (give the run back) applies"


def test_the_cli_says_terminated_and_exits_143(capsys):
    import typer

    from flows.cli.common import Terminated, fail

    e = KeyboardInterrupt()
    e.aeflow_run_uri = "/out/runs/reduce/r1"
    with pytest.raises(typer.Exit) as exit_:
        try:
            raise Terminated() from e
        except Terminated as t:
            fail(t)
    assert exit_.value.exit_code == 143
    said = " ".join(capsys.readouterr().err.split())
    assert said.startswith("terminated: run /out/runs/reduce/r1 is incomplete; the same command again resumes it"), said


@pytest.mark.cli
@pytest.mark.slow
def test_sigterm_during_training_exits_143_gives_the_run_back_and_keeps_the_checkpoint(tmp_path, prefect_server):
    """A real `aeflow run reduce` process (on the session's Prefect server) is sent SIGTERM mid-training."""
    import numpy as np
    from prefect.settings import PREFECT_API_URL

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(2000, 8)), columns=[f"f{i}" for i in range(8)])
    frame.insert(0, "id", range(len(frame)))
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1", PREFECT_LOGGING_LEVEL="INFO",
               PREFECT_API_URL=PREFECT_API_URL.value())
    cmd = [os.path.join(os.path.dirname(sys.executable), "aeflow"), "run", "reduce", "-i", str(tmp_path / "t.parquet"),
           "--id-column", "id", "-o", str(out), "--set", "train.epochs=500", "--set", "train.patience=500",
           "--set", "train.threads=1", "--set", "train.checkpoint_seconds=0"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("runs/reduce/*/checkpoint/meta.json")):  # training, a checkpoint saved
                break
            time.sleep(0.1)
        assert list(out.glob("runs/reduce/*/checkpoint/meta.json")), log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    (run_path,) = out.glob("runs/reduce/*")
    assert proc.returncode == 143, text[-3000:]
    said = " ".join(text.split())
    assert f"terminated: run {run_path} is incomplete; the same command again resumes it" in said, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert sorted(os.listdir(run_path)) == ["_run.json", "checkpoint"], "claim given back, outputs gone, checkpoint kept"
    # what the same command does first: it takes this run up again, from its checkpoint
    store = ArtifactStore(str(out))
    (entry,) = store.incomplete_runs()
    assert entry["running"] is None and entry["checkpoint"]["epoch"] >= 1
    marker = store.run("reduce", run_path.name).read_json("_run.json")
    resumed = store.start_run("reduce", marker["fingerprint"], {})
    assert resumed.run_id == run_path.name and resumed.load_checkpoint() is not None
    resumed.discard()
