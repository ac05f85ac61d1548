"""Nothing lost under kill: atomic files, verified checkpoints and weights, one claimant per unfinished run.

Kills are real (a child process SIGKILLed mid-write); concurrency is real (processes started
at once racing for the same unfinished run), on a local folder and on the moto S3 server.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tasks.errors import ConfigError, ModelMismatchError, StorageError
from tasks.storage import (
    ArtifactStore,
    CheckpointError,
    ModelFolder,
    _sha256,
    claim_is_stale,
    open_model_source,
)

pytestmark = pytest.mark.tasks
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    request.getfixturevalue("s3_endpoint")
    from tests.conftest import TEST_BUCKET

    return ArtifactStore(f"s3://{TEST_BUCKET}/durability-{tmp_path.name}")


# -- atomic files ---------------------------------------------------------------------------


def test_a_file_killed_mid_write_never_appears(tmp_path):
    """A real process SIGKILLed while streaming a file leaves no file under the final name."""
    root = str(tmp_path / "artifacts")
    code = (
        "import sys, time\n"
        "from tasks.storage import ArtifactStore\n"
        f"run = ArtifactStore({root!r}).run('reduce', 'r1')\n"
        "f = run.open('embeddings.parquet', 'wb')\n"
        "f.write(b'PAR1' + b'x' * 100000); f.flush()\n"
        "print('writing', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    run = ArtifactStore(root).run("reduce", "r1")
    assert not run.exists("embeddings.parquet"), "a killed writer must not leave a file that looks complete"
    leftovers = os.listdir(run.path)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0], leftovers
    assert run.list_files() == [], "temporary files are never outputs"
    run.clear_partial()
    assert os.listdir(run.path) == []


def test_streamed_write_is_published_only_on_success(store):
    run = store.run("reduce", "stream")
    with pytest.raises(RuntimeError), run.open("out.parquet", "wb") as f:
        f.write(b"half a table")
        raise RuntimeError("the apply step failed")
    assert not run.exists("out.parquet")
    with run.open("out.parquet", "wb") as f:
        f.write(b"a whole table")
    assert run.read_bytes("out.parquet") == b"a whole table"
    assert run.list_files() == ["out.parquet"]


def test_local_write_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    run = ArtifactStore(str(tmp_path / "artifacts")).run("reduce", "r2")
    os.makedirs(run.path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, os.path.join(run.path, "report.md"))
    run.write_bytes("report.md", b"summary")
    assert victim.read_text() == "keep me"
    assert not os.path.islink(os.path.join(run.path, "report.md"))


# -- checkpoints ------------------------------------------------------------------------------


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _state(run) -> str:
    """The checkpoint's state file, as its meta.json names it."""
    return "checkpoint/" + json.loads(run.read_bytes("checkpoint/meta.json"))["state_file"]["name"]


DAMAGE = {
    "truncated": lambda run: run.write_bytes(_state(run), run.read_bytes(_state(run))[:50]),
    "bit_flip": lambda run: run.write_bytes(_state(run), _flip_last_byte(run.read_bytes(_state(run)))),
    "state_missing": lambda run: run.remove(_state(run)),
    "meta_not_json": lambda run: run.write_bytes("checkpoint/meta.json", b'{"epoch": 3, "histo'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_detected(store, damage):
    run = store.start_run("reduce", "7" * 64, {})
    run.save_checkpoint({"w": torch.arange(64.0)}, {"epoch": 3})
    tensors, meta = run.load_checkpoint()
    assert meta == {"epoch": 3} and torch.equal(tensors["w"], torch.arange(64.0))
    DAMAGE[damage](run)
    with pytest.raises(CheckpointError, match=r"checkpoint/(state-[0-9a-f]{16}\.safetensors|meta\.json)"):
        run.load_checkpoint()
    run.discard()


def test_a_kill_between_the_state_and_its_meta_keeps_the_previous_checkpoint(store, monkeypatch):
    """The new state is written, the kill comes before meta.json: the previous checkpoint is still whole."""
    run = store.start_run("reduce", "8" * 64, {})
    run.save_checkpoint({"w": torch.zeros(4)}, {"epoch": 1})
    first = _state(run)

    def killed(*_a, **_k):
        raise KeyboardInterrupt("killed before meta.json")

    with monkeypatch.context() as m:
        m.setattr(type(run), "write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            run.save_checkpoint({"w": torch.ones(4)}, {"epoch": 2})
    assert len([f for f in run.fs.ls(run.path_of("checkpoint"), detail=False) if "state-" in f]) == 2, "the orphan is there"
    tensors, meta = run.load_checkpoint()
    assert meta == {"epoch": 1} and torch.equal(tensors["w"], torch.zeros(4)), "the epoch-1 checkpoint, not a discard"
    run.save_checkpoint({"w": torch.full((4,), 3.0)}, {"epoch": 3})
    names = sorted(posixpath.basename(f) for f in run.fs.ls(run.path_of("checkpoint"), detail=False))
    assert names == sorted(["meta.json", posixpath.basename(_state(run))]) and _state(run) != first, names
    assert run.load_checkpoint()[1] == {"epoch": 3}


def test_a_checkpoint_written_before_the_state_had_its_own_name_still_loads(tmp_path):
    """meta.json without a state name: the state is checkpoint/state.safetensors, still verified."""
    from safetensors.torch import save

    run = ArtifactStore(str(tmp_path)).start_run("reduce", "6" * 64, {})
    data = save({"w": torch.arange(3.0)})
    run.write_bytes("checkpoint/state.safetensors", data)
    run.write_json("checkpoint/meta.json", {"epoch": 2, "state_file": {"size": len(data), "hash": _sha256(data)}})
    tensors, meta = run.load_checkpoint()
    assert meta == {"epoch": 2} and torch.equal(tensors["w"], torch.arange(3.0))
    run.write_bytes("checkpoint/state.safetensors", data[:-1] + b"x")
    with pytest.raises(CheckpointError, match="is not the state meta.json describes"):
        run.load_checkpoint()
    run.save_checkpoint({"w": torch.ones(2)}, {"epoch": 3})
    assert not run.exists("checkpoint/state.safetensors"), "the old-style state goes with the first new checkpoint"


class _Records(logging.Handler):
    """The records of one logger (caplog misses loggers that Prefect's logging config stops propagating)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)

    def __enter__(self) -> _Records:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def test_training_discards_a_damaged_checkpoint_and_starts_over(tmp_path):
    from models.dense import DenseAEConfig, DenseAutoencoder
    from tasks.config import TrainConfig
    from tasks.train import train_model

    run = ArtifactStore(str(tmp_path)).start_run("reduce", "9" * 64, {})
    cfg = TrainConfig(epochs=3, patience=5, batch_size=16, threads=1)
    x = torch.randn(64, 6).numpy()
    train_model(DenseAutoencoder(DenseAEConfig(6, 2, (8,))), x, x[:8], cfg, run=run, show_progress=False)
    data = run.read_bytes(_state(run))
    run.write_bytes(_state(run), data[: len(data) // 2])  # torn, as by a kill mid-write
    with _Records("aeflow.train") as logged:
        result = train_model(DenseAutoencoder(DenseAEConfig(6, 2, (8,))), x, x[:8], cfg, run=run, show_progress=False)
    assert "discarding a damaged checkpoint, training starts over" in logged.text
    assert result.epochs_run == 3 and result.resumed_from_epoch == 0, "trained from scratch"
    assert run.load_checkpoint()[1]["epoch"] == 3, "the new checkpoint is whole again"


# -- claims: one worker per unfinished run ------------------------------------------------------


_RACER = """
import sys
from tasks.storage import ArtifactStore
store = ArtifactStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # go: every racer has imported and waits
print(store.start_run("reduce", sys.argv[2], {}).run_id, flush=True)
sys.stdin.readline()  # hold the claim until every racer has one
"""


def test_identical_runs_started_at_once_never_share_an_unfinished_run(tmp_path):
    """Three processes race for one interrupted run. (On S3 the same claim logic runs over a conditional
    PUT: test_exclusive_create_lets_exactly_one_writer_win covers that the store refuses the loser.)"""
    root = str(tmp_path / "artifacts")
    fingerprint = "5" * 64
    interrupted = ArtifactStore(root).start_run("reduce", fingerprint, {})
    interrupted.save_checkpoint({"w": torch.ones(2)}, {"epoch": 1})
    interrupted.discard()  # killed mid-training: checkpoint kept, claim released
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, root, fingerprint], cwd=REPO, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(3)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in racers)
        for p in racers:
            p.stdin.write("go\n")
            p.stdin.flush()
        ids = sorted(p.stdout.readline().strip() for p in racers)
    finally:
        for p in racers:
            p.communicate("exit\n", timeout=60)
    assert all(ids) and len(set(ids)) == 3, f"two processes took the same run folder: {ids}"
    assert interrupted.run_id in ids, "one of them resumes the interrupted run"


def test_exclusive_create_lets_exactly_one_writer_win(store):
    from tasks.storage import _create_exclusive

    run = store.run("reduce", "excl")
    path = run.path_of("_claims/000001.json")
    assert _create_exclusive(store.fs, path, b'{"owner": "first"}')
    assert not _create_exclusive(store.fs, path, b'{"owner": "second"}')
    assert run.read_bytes("_claims/000001.json") == b'{"owner": "first"}'


def test_stale_claims(tmp_path):
    other = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(other.stdout)
    now = time.time()
    import socket

    host = socket.gethostname()
    assert claim_is_stale({"host": host, "pid": dead_pid, "heartbeat": now, "owner": "x"}, now)
    assert not claim_is_stale({"host": host, "pid": os.getppid(), "heartbeat": now, "owner": "x"}, now)
    assert not claim_is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now - 30, "owner": "x"}, now)
    assert claim_is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now - 3600, "owner": "x"}, now)
    assert claim_is_stale({"host": host, "pid": os.getpid(), "heartbeat": now, "owner": "gone"}, now), \
        "this process, but no attempt of it holds the claim any more"


def test_a_stale_claim_is_taken_over_and_a_live_one_is_respected(store):
    fingerprint = "6" * 64
    run = store.start_run("reduce", fingerprint, {})
    run.save_checkpoint({"w": torch.ones(2)}, {"epoch": 1})
    # Another host works on it (fresh heartbeat): an identical run gets its own folder...
    live = {"owner": "other", "pid": 1, "host": "elsewhere", "started": time.time(), "heartbeat": time.time()}
    run.write_json("_claims/000002.json", live)
    run._forget_claim()
    fresh = store.start_run("reduce", fingerprint, {})
    assert fresh.run_id != run.run_id
    with pytest.raises(ConfigError, match=r"is being run by process 1 on elsewhere \(since .*\); wait for it"):
        store.start_run("reduce", fingerprint, {}, run_id=run.run_id)
    # ...until its heartbeat stops: then the next identical run resumes it.
    run.write_json("_claims/000002.json", {**live, "heartbeat": time.time() - 3600})
    resumed = store.start_run("reduce", fingerprint, {})
    assert resumed.run_id == run.run_id
    assert resumed.load_checkpoint()[1]["epoch"] == 1
    assert resumed.exists("_claims/000003.json"), "taken over by the next generation"
    fresh.discard()
    resumed.discard()


def test_a_discard_that_cannot_clear_the_outputs_still_gives_the_claim_back(store, monkeypatch, caplog):
    """discard released the claim only after clearing the outputs: a store failing in between left the
    claim of an attempt that had ended, and the next run of the same command on another host waited
    for its heartbeat to go stale."""
    run = store.start_run("reduce", "7" * 64, {})
    run.save_checkpoint({"w": torch.ones(2)}, {"epoch": 1})
    run.write_bytes("embeddings/part.00000.parquet", b"partial")
    assert run.exists("_claims/000001.json")

    def outage() -> None:
        raise StorageError("the store stopped answering")

    monkeypatch.setattr(run, "clear_partial", outage)
    with caplog.at_level(logging.WARNING):
        run.discard()
    assert not run.exists("_claims/000001.json"), "the claim outlived the discarded attempt"
    assert "could not remove what the failed run left" in caplog.text
    assert run._latest_claim() is None, "no claim left for the next run to wait on"


# -- weights -----------------------------------------------------------------------------------


def _saved_model(store):
    run = store.start_run("reduce", "4" * 64, {})
    run.save_model("dense", {"in_features": 3}, {"a.weight": torch.arange(6.0).reshape(2, 3)}, {})
    return run


def test_tampered_weights_are_refused_by_name(store):
    from safetensors.torch import save

    run = _saved_model(store)
    assert run.load_model_files()[0]["weights"].startswith("sha256:")
    run.write_bytes("model/weights.safetensors", save({"a.weight": torch.zeros(2, 3)}))
    with pytest.raises(ModelMismatchError, match=r"model/weights.safetensors does not match the SHA-256 recorded"):
        run.load_model_files()


def test_a_model_folder_without_a_recorded_hash_loads_with_a_warning(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(REPO, "benchmarks", "weights", "denoise"), folder)
    assert isinstance(open_model_source(str(folder)), ModelFolder)
    open_model_source(str(folder)).load_model_files()  # the committed hash verifies
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "weights"}))
    with _Records("aeflow.storage") as logged:
        meta, state = open_model_source(str(folder)).load_model_files()
    assert "records no SHA-256 of weights.safetensors" in logged.text and state
    (folder / "config.json").write_text(json.dumps({**cfg, "weights": "sha256:" + "0" * 64}))
    with pytest.raises(ModelMismatchError, match=f"{folder}/weights.safetensors does not match"):
        open_model_source(str(folder)).load_model_files()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "benchmarks", "weights"))))
def test_every_committed_model_folder_records_its_weights_hash(name, tmp_path):
    """The README's `--model benchmarks/weights/...` commands load without the unverifiable-weights warning."""
    folder = os.path.join(REPO, "benchmarks", "weights", name)
    with _Records("aeflow.storage") as logged:
        meta, state = open_model_source(folder).load_model_files()
    assert meta["weights"].startswith("sha256:") and state and "records no SHA-256" not in logged.text
