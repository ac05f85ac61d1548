"""Codec files at the task layer: .aec versions 1 and 2, codecs loaded by kind, decoding in a fresh process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import skimage.data
import torch

from models.aec import AecFile, AecFormatError, parse
from models.codec import CodecConfig, ImageCodec
from models.codec_hyperprior import HyperpriorCodec
from tasks.codec import (
    code_image,
    codec_from_files,
    decode_aec,
    encode_image,
    load_codec_run,
    new_codec,
)
from tasks.errors import ConfigError, InputError, ModelMismatchError
from tests.models.codec_helpers import TINY_HYPER, save_model_folder

pytestmark = [pytest.mark.tasks]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _with_tables(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.update_tables()
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """An untrained but complete (tables built) tiny codec of each kind, as model folders."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("codecs")
    return {
        "hyperprior": save_model_folder(_with_tables(HyperpriorCodec(TINY_HYPER)), str(d / "hyper")),
        "codec": save_model_folder(_with_tables(ImageCodec(CodecConfig(channels=8, latent_channels=8,
                                                                       lambdas=(0.01, 0.1)))), str(d / "fact")),
    }


def _photo() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[100:170, 120:215])  # 70x95 RGB, not a multiple of 16


def test_aec_versions():
    v1 = AecFile(model_id=b"12345678", quality=3, mode="L", width=7, height=9, payload=b"\x01\x02\x03\x04")
    data = v1.to_bytes()
    assert data[4] == 1 and len(data) == 31 + 4 == v1.overhead + 4, "the factorized codec's files are unchanged"
    assert parse(data) == v1 and parse(data).kind == "codec"
    v2 = AecFile(model_id=b"12345678", quality=3, mode="RGB", width=7, height=9, payload=b"\x01\x02\x03\x04",
                 kind="hyperprior")
    data2 = v2.to_bytes()
    assert data2[4] == 2 and data2[5] == 1 and len(data2) == 32 + 4 == v2.overhead + 4
    assert parse(data2) == v2
    # A version-2 file naming no known kind (checksum recomputed, so only the kind is wrong).
    bad = bytearray(data2[:-4])
    bad[5] = 9
    with pytest.raises(AecFormatError, match="unknown model kind code 9"):
        parse(bytes(bad) + struct.pack("<I", zlib.crc32(bytes(bad))))
    with pytest.raises(AecFormatError, match="unsupported .aec format version 3"):
        parse(data2[:4] + b"\x03" + data2[5:])
    with pytest.raises(AecFormatError, match="truncated"):
        parse(data2[:20])
    with pytest.raises(ValueError, match="model kind"):
        AecFile(model_id=b"12345678", quality=0, mode="L", width=1, height=1, payload=b"", kind="jpeg").to_bytes()


def test_codecs_load_by_kind_and_files_name_their_kind(folders):
    hyper, fact = load_codec_run(folders["hyperprior"]), load_codec_run(folders["codec"])
    assert isinstance(hyper.model, HyperpriorCodec) and isinstance(fact.model, ImageCodec)
    img = _photo()
    data = encode_image(hyper, img, "RGB", 1)
    header = parse(data)
    assert header.kind == "hyperprior" and header.model_id == hyper.identity and header.version == 2
    decoded, mode = decode_aec(hyper, data, "a.aec")
    assert decoded.shape == img.shape and mode == "RGB"
    with pytest.raises(ModelMismatchError, match=r"made by codec \w+ \(hyperprior\), but the model given .* \(codec\)"):
        decode_aec(fact, data, "a.aec")
    assert parse(encode_image(fact, img, "RGB", 1)).version == 1
    with pytest.raises(ConfigError, match="latent refinement is implemented for the factorized codec only"):
        encode_image(hyper, img, "RGB", 1, refine_steps=10)
    coded = code_image(hyper, img, "RGB", 1, "a.png")
    assert coded.payload_bits == 8 * (len(coded.data) - 32) and coded.estimate_bits > 0
    assert isinstance(new_codec("hyperprior", channels=8, latent_channels=8), HyperpriorCodec)
    with pytest.raises(ValueError, match="unknown codec 'jpeg'"):
        new_codec("jpeg")


def test_codec_option_errors_are_configuration_errors_found_before_writing(folders, tmp_path):
    """--refine-steps with the hyperprior and --quality beyond the model's levels: exit 2 (invalid configuration),
    found before the output folder is made (was: exit 3 as invalid input, after the folder was made)."""
    from PIL import Image

    from tasks.codec_files import compress_files

    Image.fromarray(_photo()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--refine-steps 3: latent refinement is implemented for the factorized"):
        list(compress_files([str(tmp_path / "a.png")], folders["hyperprior"], str(out), refine_steps=3))
    with pytest.raises(ConfigError, match=f"--quality must be in 0..{TINY_HYPER.levels - 1} for this model, got 99"):
        list(compress_files([str(tmp_path / "a.png")], folders["hyperprior"], str(out), quality=99))
    assert not out.exists()
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty.png: empty file"):
        list(compress_files([str(tmp_path / "empty.png")], folders["codec"], str(out)))
    assert not out.exists()


def test_codec_from_files_refuses_what_is_not_a_complete_codec(folders):
    from safetensors.torch import load_file

    state = load_file(os.path.join(folders["hyperprior"], "weights.safetensors"))
    config = HyperpriorCodec(TINY_HYPER).config.to_dict()
    with pytest.raises(ModelMismatchError, match="holds a 'conv' model, not a learned image codec"):
        codec_from_files({"kind": "conv", "config": {}}, state, "m")
    with pytest.raises(ModelMismatchError, match="do not fit its hyperprior config"):
        codec_from_files({"kind": "hyperprior", "config": {**config, "latent_channels": 12}}, state, "m")
    fresh = HyperpriorCodec(TINY_HYPER).state_dict()
    with pytest.raises(ModelMismatchError, match="no entropy-coding tables"):
        codec_from_files({"kind": "hyperprior", "config": config}, fresh, "m")


CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(2)
from tasks.codec import decode_aec, load_codec_run
codec = load_codec_run(sys.argv[1])
img, mode = decode_aec(codec, open(sys.argv[2], "rb").read(), sys.argv[2])
np.save(sys.argv[3], img)
print(codec.identity_hex, mode)
"""


def test_cpu_encode_then_decode_in_a_fresh_process_is_bit_identical(folders, tmp_path):
    """What the hyperprior guarantees: another process (another torch thread count, a fresh model load)
    decodes the bytes to exactly the same pixels. The table indices come from exact integer arithmetic,
    so the decoded latent would be the same on any machine; the pixels, from float32 convolutions,
    are promised for the same device and software."""
    codec = load_codec_run(folders["hyperprior"])
    img = _photo()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = encode_image(codec, img, "RGB", TINY_HYPER.levels - 1)
        here, _ = decode_aec(codec, data, "x.aec")
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "x.aec").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", CHILD, folders["hyperprior"], str(tmp_path / "x.aec"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [codec.identity_hex, "RGB"]
    there = np.load(tmp_path / "x.npy")
    assert there.dtype == np.uint8 and np.array_equal(there, here)
