"""Hostile and unlucky input refused by class, with one line and the documented exit code: secrets in
URIs, devices this machine lacks, tampered weights, crafted codec files and unsafe outputs; plus what is
accepted instead of refused (a CSV with a byte-order mark) and where errors deep in a file point.

Each refusal is registered for the README's bad-input table (``tests/refusals.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import files_under
from tests.refusals import assert_raised, assert_refused, refusal

pytestmark = [pytest.mark.cli]
runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEC = os.path.join(REPO, "benchmarks", "weights", "codec")
DENOISE = os.path.join(REPO, "benchmarks", "weights", "denoise")
KEY_ID, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def _table(path, n=40):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("abcd"))
    df.insert(0, "id", range(n))
    df.to_csv(path, index=False)
    return str(path)


def _png(path, size=(24, 20), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return str(path)


# -- secrets -----------------------------------------------------------------------------------


@refusal("credentials in a URI (s3://KEY:SECRET@bucket/..., ?password=...): never echoed, never retried", 2,
         "configuration")
def test_credentials_in_a_uri_are_refused_without_repeating_them(prefect_server, tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--input", f"s3://{KEY_ID}:{SECRET}@bucket/raw/x.csv",
                              "--output", str(tmp_path / "out")])
    assert_refused(res, test_credentials_in_a_uri_are_refused_without_repeating_them,
                   "load.input: holds credentials in the URI (user info before '@')",
                   "(got 's3://***@bucket/raw/x.csv')")
    res2 = runner.invoke(app, ["run", "reduce", "--input", _table(tmp_path / "t.csv"),
                               "--output", "s3://bucket/x?password=hunter2hunter2"])
    assert_refused(res2, test_credentials_in_a_uri_are_refused_without_repeating_them,
                   "output: holds a secret-looking option ('password')")
    res3 = runner.invoke(app, ["compress", f"s3://{KEY_ID}:{SECRET}@bucket/x.png", "--model", CODEC,
                               "-o", str(tmp_path / "out")])
    assert_refused(res3, test_credentials_in_a_uri_are_refused_without_repeating_them, "URI s3://***@bucket/x.png")
    for r in (res, res2, res3):
        assert SECRET not in r.output and KEY_ID not in r.output and "hunter2" not in r.output
    assert files_under(tmp_path / "out") == []


def test_redaction_of_logs_manifests_and_text(prefect_server, monkeypatch, tmp_path):
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from tasks.redaction import install_log_redaction, redact
    from tasks.storage import ArtifactStore, Manifest

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    text = f"s3://{KEY_ID}:{SECRET}@b/x token=abc123 key {KEY_ID} and env-secret-value-123, s3://b/dir@2024/x"
    assert redact(text) == "s3://***@b/x token=*** key *** and ***, s3://b/dir@2024/x"

    @flow
    def leaky() -> None:
        install_log_redaction()
        get_run_logger().warning("reading %s with password=hunter2hunter2", f"s3://{KEY_ID}:{SECRET}@bucket/x.csv")

    state = leaky(return_state=True)
    APILogHandler().flush()  # send the queued logs now
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    stored = "\n".join(log.message for log in logs)
    assert "reading s3://***@bucket/x.csv with password=***" in stored
    assert SECRET not in stored and "hunter2" not in stored, "no secret reaches Prefect's database"

    run = ArtifactStore(str(tmp_path)).start_run("reduce", "3" * 64, {})
    from datetime import UTC, datetime

    run.write_manifest(Manifest(app="reduce", run_id=run.run_id, run_uri=run.uri, created=datetime.now(UTC),
                                finished=datetime.now(UTC), fingerprint="3" * 64, config={},
                                extra={"notes": ["retried s3://u:pw123456@host/x with password=abc"]}))
    manifest = run.read_bytes("manifest.json").decode()
    assert "s3://***@host/x with password=***" in manifest and "pw123456" not in manifest


# -- devices -----------------------------------------------------------------------------------


@refusal("--device cuda on a machine without CUDA", 2, "configuration")
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(prefect_server, tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--input", _table(tmp_path / "t.csv"), "--device", "cuda",
                              "--output", str(tmp_path / "out")])
    assert_refused(res, test_cuda_without_cuda, "train.device: device 'cuda' requested but CUDA is not available here")
    assert files_under(tmp_path / "out") == []


@refusal("an unknown --device (e.g. tpu)", 2, "configuration")
def test_unknown_device(prefect_server, tmp_path):
    res = runner.invoke(app, ["run", "reduce", "--input", _table(tmp_path / "t.csv"), "--device", "tpu",
                              "--output", str(tmp_path / "out")])
    assert_refused(res, test_unknown_device, "train.device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N")


def test_training_refuses_an_unusable_device_itself():
    from tasks.config import TrainConfig
    from tasks.errors import ConfigError
    from tasks.train import train_model

    x = np.zeros((16, 3), "float32")
    with pytest.raises(ConfigError, match="train.device: 'cuda:x' is not a device"):
        train_model(torch.nn.Linear(3, 3), x, x, TrainConfig(device="cuda:x"), run=None, show_progress=False)


# -- weights -----------------------------------------------------------------------------------


@refusal("a --model whose weights.safetensors no longer matches the SHA-256 recorded when it was saved", 5, "model")
def test_tampered_weights_are_refused(prefect_server, tmp_path):
    folder = tmp_path / "denoise-model"
    shutil.copytree(DENOISE, folder)
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (folder / "weights.safetensors").write_bytes(bytes(data))
    _png(tmp_path / "imgs" / "a.png")
    res = runner.invoke(app, ["run", "denoise", "--model", str(folder), "--apply-to", str(tmp_path / "imgs"),
                              "--output", str(tmp_path / "out")])
    assert_refused(res, test_tampered_weights_are_refused,
                   f"{folder}/weights.safetensors does not match the SHA-256 recorded in config.json when it was "
                   "saved")
    assert files_under(tmp_path / "out") == []
    # The codec commands load models the same way.
    codec = tmp_path / "codec-model"
    codec.mkdir()
    os.symlink(os.path.join(CODEC, "weights.safetensors"), codec / "weights.safetensors")
    cfg = json.loads(open(os.path.join(CODEC, "config.json")).read())
    (codec / "config.json").write_text(json.dumps({**cfg, "weights": "sha256:" + hashlib.sha256(b"other").hexdigest()}))
    res = runner.invoke(app, ["compress", str(tmp_path / "imgs" / "a.png"), "--model", str(codec),
                              "-o", str(tmp_path / "out")])
    assert_refused(res, test_tampered_weights_are_refused, f"{codec}/weights.safetensors does not match")
    assert files_under(tmp_path / "out") == []


# -- codec files -------------------------------------------------------------------------------


def _crafted_aec(width: int, height: int, payload: bytes) -> bytes:
    from models.aec import _HEADER, MAGIC, MODES, VERSION

    body = _HEADER.pack(MAGIC, VERSION, b"\x01" * 8, 0, MODES["RGB"], width, height, len(payload)) + payload
    return body + struct.pack("<I", zlib.crc32(body))


@refusal("an .aec header declaring an image too large to decode (refused before allocating)", 3, "codec files")
def test_crafted_huge_header(tmp_path):
    from models.aec import AecFormatError, parse

    data = _crafted_aec(65536, 65536, b"\x00" * 64)
    tracemalloc.start()
    try:
        with pytest.raises(AecFormatError):
            parse(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"parsing a crafted header allocated {peak} bytes"
    (tmp_path / "bomb.aec").write_bytes(data)
    res = runner.invoke(app, ["decompress", str(tmp_path / "bomb.aec"), "-o", str(tmp_path / "out")])
    assert_refused(res, test_crafted_huge_header,
                   f"{tmp_path}/bomb.aec: the header declares a 65536x65536 image (4,294,967,296 pixels), more than "
                   "the 89,478,485 this decoder accepts")
    assert files_under(tmp_path / "out") == []


@refusal("an .aec header declaring an image far larger than its payload could code", 3, "codec files")
def test_header_larger_than_its_payload(tmp_path):
    (tmp_path / "short.aec").write_bytes(_crafted_aec(8000, 8000, b"\x00" * 8))
    res = runner.invoke(app, ["decompress", str(tmp_path / "short.aec"), "-o", str(tmp_path / "out")])
    assert_refused(res, test_header_larger_than_its_payload,
                   f"{tmp_path}/short.aec: corrupted: the header declares a 8000x8000 image but carries only 8 "
                   "payload bytes")


@pytest.fixture(scope="module")
def good_aec(tmp_path_factory) -> bytes:
    """A real .aec file, made by the committed benchmark codec."""
    d = tmp_path_factory.mktemp("aec")
    res = runner.invoke(app, ["compress", _png(d / "photo.png"), "--model", CODEC, "-o", str(d)])
    assert res.exit_code == 0, res.output
    return (d / "photo.aec").read_bytes()


@refusal("a truncated .aec file", 3, "codec files")
def aec_truncated(good):
    return good[:-7], "truncated"


@refusal("a corrupted .aec file (checksum mismatch)", 3, "codec files")
def aec_corrupted(good):
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    return bytes(flipped), "corrupted: checksum mismatch"


@refusal("a file that is not an .aec file (wrong magic bytes)", 3, "codec files")
def aec_wrong_magic(good):
    return b"\x89PNG" + good[4:], "not an .aec file (wrong magic bytes)"


@refusal("an .aec file of a format version this aeflow does not read", 3, "codec files")
def aec_unknown_version(good):
    return good[:4] + b"\x07" + good[5:], "unsupported .aec format version 7"


@refusal("an .aec file made by another codec than --model", 5, "model")
def aec_foreign(good):
    from models.aec import AecFile, parse

    f = parse(good)
    return AecFile(model_id=b"\x00" * 8, quality=f.quality, mode=f.mode, width=f.width, height=f.height,
                   payload=f.payload).to_bytes(), "made by codec 0000000000000000"


AEC_CASES = [aec_truncated, aec_corrupted, aec_wrong_magic, aec_unknown_version, aec_foreign]


@pytest.mark.parametrize("case", AEC_CASES, ids=[c.__name__ for c in AEC_CASES])
def test_bad_aec_files(good_aec, tmp_path, case):
    data, message = case(good_aec)
    (tmp_path / "bad.aec").write_bytes(data)
    res = runner.invoke(app, ["decompress", str(tmp_path / "bad.aec"), "--model", CODEC, "-o", str(tmp_path / "out")])
    assert res.exit_code == case.refusal.exit_code, res.output
    assert f"{tmp_path}/bad.aec: " in res.stderr and message in res.stderr and "Traceback" not in res.output
    assert files_under(tmp_path / "out") == []


@refusal("two inputs that would write one output (photo.png and photo.jpg -> photo.aec); nothing is written", 3,
         "codec files")
def test_same_stem_inputs_are_refused(tmp_path):
    a = _png(tmp_path / "photo.png")
    Image.open(a).convert("RGB").save(tmp_path / "photo.jpg")
    res = runner.invoke(app, ["compress", a, str(tmp_path / "photo.jpg"), "--model", CODEC, "-o", str(tmp_path / "out")])
    assert_refused(res, test_same_stem_inputs_are_refused,
                   f"{a} and {tmp_path}/photo.jpg would both be written to {tmp_path}/out/photo.aec; nothing was "
                   "written")
    assert files_under(tmp_path / "out") == []


def test_decompress_never_writes_through_a_link_in_the_output_folder(tmp_path):
    src = _png(tmp_path / "photo.png")
    out = tmp_path / "out"
    res = runner.invoke(app, ["compress", src, "--model", CODEC, "-o", str(out)])
    assert res.exit_code == 0, res.output
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the output folder")
    os.symlink(victim, out / "photo.png")
    res = runner.invoke(app, ["decompress", str(out / "photo.aec"), "--model", CODEC, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "outside the output folder", "decompress followed a link out of -o"
    assert not os.path.islink(out / "photo.png")
    assert Image.open(out / "photo.png").size == (24, 20)
    assert sorted(os.listdir(out)) == ["photo.aec", "photo.png"], "no temporary file is left"


# -- tables: accepted instead of refused, and where deep errors point ----------------------------


def test_a_csv_with_a_byte_order_mark_is_read_as_if_it_had_none(tmp_path):
    from tasks.config import LoadConfig
    from tasks.load import inspect_table, to_dask

    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + open(_table(tmp_path / "plain.csv"), "rb").read())
    src = inspect_table(str(path), LoadConfig(id_column="id"))
    assert src.columns == ("id", "a", "b", "c", "d") and src.schema.id == "id"
    df = to_dask(src).compute(scheduler="sync")
    assert df["id"].tolist() == list(range(40))


def test_a_parse_error_deep_in_a_large_csv_names_the_files_line(tmp_path):
    from tasks.config import LoadConfig
    from tasks.errors import InputError
    from tasks.load import inspect_table, to_dask

    n = 40_000  # > 1 MiB: several byte blocks of 1 MiB
    lines = ["id,a,b,c,d"] + [f"{i},{i * 0.5:.6f},{i * 0.25:.6f},{i * 0.125:.6f},1.0" for i in range(n)]
    lines[35_001] += ",extra"  # row 35000 is line 35002 of the file
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    src = inspect_table(str(path), LoadConfig(id_column="id", blocksize_mb=1))
    assert src.n_partitions > 1 and src.blocks[-1].row_offset is None
    with pytest.raises(InputError, match=r"big.csv: cannot parse \(ParserError: .* in line 35002, saw 6\)$"):
        to_dask(src).compute(scheduler="sync")  # ... and the message ends there (pandas' newline left a ')' alone)


@pytest.mark.parametrize("short_at", [5, 35_001], ids=["first-block", "deep"])
@refusal("a CSV line with fewer fields than the header (named by line and count; it read as missing values)", 3, "table")
def test_a_short_csv_line_is_named_as_short_not_as_missing_values(tmp_path, short_at):
    """pandas fills a short line's fields with nulls, and the message was "column 'd' has null values (use the
    impute application ...)" at that line: the wrong fix. Now the line and its field count are named."""
    from tasks.config import LoadConfig
    from tasks.errors import InputError
    from tasks.load import inspect_table, to_dask

    n = 40_000
    lines = ["id,a,b,c,d"] + [f"{i},{i * 0.5:.6f},{i * 0.25:.6f},{i * 0.125:.6f},1.0" for i in range(n)]
    lines[short_at] = lines[short_at].rsplit(",", 2)[0]  # 3 fields: c and d missing
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    src = inspect_table(str(path), LoadConfig(id_column="id", blocksize_mb=1))
    with pytest.raises(InputError, match=rf"big.csv: line {short_at + 1} has 3 fields but the header names 5 columns "
                                         r"\(a missing separator, or a line cut short\?\)") as e:
        to_dask(src).compute(scheduler="sync")
    assert_raised(e.value, test_a_short_csv_line_is_named_as_short_not_as_missing_values)
    assert "impute" not in str(e.value)
    # A real missing value (an empty field, all fields there) is still reported as one.
    lines[short_at] = lines[short_at] + ",,"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"column 'c' has null values: null at line {short_at + 1}.*\(use the impute application"):
        to_dask(inspect_table(str(path), LoadConfig(id_column="id", blocksize_mb=1))).compute(scheduler="sync")


# -- run ids -----------------------------------------------------------------------------------


@refusal("--run-id of a run that is already complete (choose another; the finished run is kept as it was)", 2,
         "configuration")
def test_run_id_of_a_complete_run(prefect_server, dask_address, tmp_path):
    """It was exit 4 (storage) though nothing is wrong with the store: the setting names a finished run."""
    table, out = _table(tmp_path / "t.csv"), str(tmp_path / "out")
    args = ["run", "reduce", "--input", table, "--output", out, "--epochs", "1", "--run-id", "nightly",
            "--dask-address", dask_address]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    manifest = tmp_path / "out" / "runs" / "reduce" / "nightly" / "manifest.json"
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = runner.invoke(app, [*args, "--latent-dim", "3"])
    assert_refused(again, test_run_id_of_a_complete_run, f"{os.path.dirname(manifest)} already exists and is complete",
                   "choose another --run-id")
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before, "the finished run was touched"
