"""The eleventh walkthrough: a data team that keeps everything in object storage, without `aeflow platform`
(plain commands against a SeaweedFS S3 server of this module's own, started with `weed server -s3`).

- `aeflow compress`/`decompress --output` and `aeflow search --sheet` in a bucket that does not exist were
  written: SeaweedFS creates a bucket on the first PUT, so a misspelt bucket silently got the outputs (exit 0);
  `aeflow run --output` refused it. Now refused by name before any work (exit 4), and no bucket appears.
- An input glob that matches nothing said "no PNG/JPEG images found in input s3://b/imgs/*.jpg (the folder is
  empty)" of a folder full of PNGs, and a glob in a bucket that does not exist did not name the bucket.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tasks.errors import InputError
from tests.conftest import free_port

pytestmark = [pytest.mark.cli, pytest.mark.s3]
runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEC = os.path.join(REPO, "benchmarks", "weights", "codec")
BUCKET, MISSING = "wt11", "wt11-no-such-bucket"
KEY, SECRET = "WT11ADMINKEY", "wt11-admin-secret-0123456789"


def _weed() -> str:
    from flows.platform.components import weed_binary
    from tasks.errors import PlatformError

    try:
        return weed_binary()
    except PlatformError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3) on free ports, its keys in the environment as s3fs reads them;
    yields an s3fs filesystem on it with the bucket ``wt11``."""
    import s3fs

    d = tmp_path_factory.mktemp("seaweed")
    (d / "data").mkdir()
    (d / "identities.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    p = {k: free_port() for k in ("m", "mg", "v", "vg", "f", "fg", "s3", "s3g")}
    cmd = [_weed(), "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={p['m']}", f"-master.port.grpc={p['mg']}", f"-volume.port={p['v']}",
           f"-volume.port.grpc={p['vg']}", f"-filer.port={p['f']}", f"-filer.port.grpc={p['fg']}",
           "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}", f"-s3.config={d / 'identities.json'}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.resumeState=false",
           "-master.volumeSizeLimitMB=64", "-volume.max=0"]
    with open(d / "weed.log", "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}", "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            deadline = time.monotonic() + 90
            while True:
                s3fs.S3FileSystem.clear_instance_cache()
                fs = s3fs.S3FileSystem(skip_instance_cache=True)
                try:
                    fs.mkdir(BUCKET)
                    fs.ls(BUCKET)
                    break
                except Exception:  # noqa: BLE001 - whatever fails while it starts: again until the deadline
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"SeaweedFS did not start: {(d / 'weed.log').read_text()[-2000:]}")
                    time.sleep(1)
            yield fs
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # a graceful stop takes ~25 s; nothing here needs it
            proc.wait()
            s3fs.S3FileSystem.clear_instance_cache()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _one_line(res) -> str:
    assert "Traceback" not in res.output and "unexpected error" not in res.output, res.output
    assert res.stderr.count("error:") == 1, res.stderr
    return " ".join(res.stderr.split())


def _buckets(fs) -> list[str]:
    fs.invalidate_cache()
    return [b.rstrip("/") for b in fs.ls("", refresh=True)]


def test_codec_outputs_in_a_bucket_that_does_not_exist_are_refused(seaweed, tmp_path):
    fs = seaweed
    img = tmp_path / "photo.png"
    img.write_bytes(_png(1))
    ok = runner.invoke(app, ["compress", str(img), "--model", CODEC, "-o", f"s3://{BUCKET}/codes"])
    assert ok.exit_code == 0, ok.output
    assert fs.exists(f"{BUCKET}/codes/photo.aec")

    for args, what in (
        (["compress", str(img), "--model", CODEC, "-o", f"s3://{MISSING}/codes"], f"--output s3://{MISSING}/codes"),
        (["decompress", f"s3://{BUCKET}/codes/photo.aec", "--model", CODEC, "-o", f"s3://{MISSING}/decoded"],
         f"--output s3://{MISSING}/decoded"),
        (["search", "--index", f"s3://{BUCKET}/runs/index/none", "--query", str(img),
          "--sheet", f"s3://{MISSING}/sheet.png"], f"--sheet s3://{MISSING}/sheet.png"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 4, (args, res.output)
        assert f"cannot write {what}: bucket '{MISSING}' does not exist" in _one_line(res), res.stderr
        assert MISSING not in _buckets(fs), f"{args[0]} created the bucket {MISSING}"


def test_an_input_glob_that_matches_nothing_says_so(seaweed):
    from tasks.load import list_table_files

    fs = seaweed
    for i in range(3):
        fs.pipe(f"{BUCKET}/imgs/img_{i}.png", _png(i))
    res = runner.invoke(app, ["search", "--index", f"s3://{BUCKET}/runs/index/none",
                              "--query", f"s3://{BUCKET}/imgs/*.jpg"])
    assert res.exit_code == 3, res.output
    line = _one_line(res)
    assert f"query s3://{BUCKET}/imgs/*.jpg matches no file" in line and "folder is empty" not in line, line

    res = runner.invoke(app, ["search", "--index", f"s3://{BUCKET}/runs/index/none",
                              "--query", f"s3://{MISSING}/imgs/*.png"])
    assert res.exit_code == 3, res.output
    assert f"bucket '{MISSING}' does not exist" in _one_line(res), res.stderr
    with pytest.raises(InputError, match=f"cannot read input s3://{MISSING}/raw/\\*.csv: bucket '{MISSING}' does not"):
        list_table_files(f"s3://{MISSING}/raw/*.csv")


def test_credentials_in_a_uri_are_refused_by_every_command(seaweed, tmp_path):
    """`aeflow run` refused s3://KEY:SECRET@bucket (its config models check every URI), but the commands whose URIs
    pass no config model handed it to s3fs: `runs list --output` printed botocore's traceback (exit 1) with the
    secret in it ('Invalid bucket name "KEY:SECRET@bucket"'), `runs show`, `search --index` and `compress --model`
    repeated the secret in their one line, and `runs list --output s3://b/x?password=...` printed it in 'no complete
    runs under ...' (exit 0)."""
    key_id, secret = "AKIAWT11EXAMPLEKEYID", "wt11-Top/Secret+value"
    img = tmp_path / "q.png"
    img.write_bytes(_png(3))
    userinfo = f"s3://{key_id}:{secret}@{BUCKET}"
    for args in (["runs", "list", "--output", f"{userinfo}/aeflow"],
                 ["runs", "list", "--output", f"s3://{BUCKET}/aeflow?password={secret}"],
                 ["runs", "show", f"{userinfo}/aeflow/runs/reduce/x1"],
                 ["search", "--index", f"{userinfo}/aeflow/runs/index/x1", "--query", str(img)],
                 ["compress", str(img), "--model", f"{userinfo}/aeflow/runs/compress/x1", "-o", str(tmp_path / "c")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert secret not in res.output and key_id not in res.output, res.output
        line = _one_line(res)
        assert "remove it and give keys through the environment" in line and "***" in line, line
    assert not (tmp_path / "c").exists()


def test_s3_filesystems_bound_their_timeouts(monkeypatch):
    """botocore's 60 s read timeout x 5 attempts x s3fs' 5 retries: 25 minutes of silence per call against an
    endpoint that accepts connections and never answers. The filesystems aeflow opens bound the read timeout
    (the retries stay: a restarting store is ridden out); the user's fsspec configuration still wins."""
    import fsspec

    from tasks.storage import S3_CONFIG, url_to_fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y" * 8)
    fs, _ = url_to_fs("s3://some-bucket/runs")
    given = fs.storage_options["config_kwargs"]
    assert given["read_timeout"] == S3_CONFIG["read_timeout"] <= 10 and given["connect_timeout"] <= 10
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 7}})
    fs, _ = url_to_fs("s3://other-bucket/runs")
    assert fs.storage_options["config_kwargs"]["read_timeout"] == 7
    assert fs.storage_options["config_kwargs"]["connect_timeout"] == S3_CONFIG["connect_timeout"]
    local, _ = url_to_fs(os.getcwd())
    assert "config_kwargs" not in local.storage_options


def test_an_endpoint_that_never_answers_is_an_outage_not_a_hang(tmp_path):
    """A listener that accepts and never answers (a wrong port): one line, exit 4 (guard: the read timeout is
    shortened through the user's fsspec configuration so that the test is quick)."""
    import socket
    import subprocess
    import sys

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y" * 8, "FSSPEC_S3": '{"config_kwargs": {"read_timeout": 1}}'}
    try:
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "aeflow"), "runs", "list", "--output",
                              "s3://out/aeflow"], check=False, env=env, capture_output=True, text=True, timeout=240)
    finally:
        server.close()
    assert res.returncode == 4, res.stderr
    assert f"the object store at http://127.0.0.1:{port} is unreachable (timed out)" in res.stderr
    assert "Traceback" not in res.stderr
