"""``aeflow compress`` / ``decompress`` as plain functions: image files <-> ``.aec`` files.

The CLI commands are thin over these; the batch job (``tasks/apps/compress.py``) codes
images of a run instead. Both use the coding functions of :mod:`tasks.codec`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from tasks.codec import (
    LoadedCodec,
    check_quality,
    decode_aec,
    encode_image,
    encode_png,
    find_codec_run,
    load_codec_run,
    read_aec,
    read_image,
)
from tasks.errors import InputError, ModelMismatchError
from tasks.storage import join_uri, url_to_fs


@dataclass(frozen=True)
class Compressed:
    input: str
    output: str
    bytes: int
    bpp: float
    quality: int


@dataclass(frozen=True)
class Decompressed:
    input: str
    output: str
    width: int
    height: int
    mode: str


def _stem(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


StepProgress = Callable[[str], AbstractContextManager[Callable[[int, int], None] | None]]


def compress_files(images: list[str], model: str, output_dir: str, quality: int | None = None, refine_steps: int = 0,
                   progress: StepProgress | None = None) -> Iterator[Compressed]:
    """Code each image into ``output_dir/<stem>.aec`` with the codec of ``model`` (a run or model folder).

    With the refining encoder, ``progress(uri)`` is entered around each image's encoding and
    gives an ``on_step(done, total)`` callback (e.g. a progress bar).
    """
    codec = load_codec_run(model)
    q = check_quality(codec, codec.model.config.levels // 2 if quality is None else quality)
    fs, path = url_to_fs(output_dir)
    fs.makedirs(path, exist_ok=True)
    for uri in images:
        img, mode = read_image(uri)
        with progress(uri) if progress is not None and refine_steps else nullcontext() as on_step:
            data = encode_image(codec, img, mode, q, refine_steps, on_step=on_step)
        dest = join_uri(output_dir, _stem(uri) + ".aec")
        dfs, dpath = url_to_fs(dest)
        dfs.pipe_file(dpath, data)
        yield Compressed(uri, dest, len(data), 8 * len(data) / (img.shape[0] * img.shape[1]), q)


def decompress_files(files: list[str], output_dir: str, model: str | None = None,
                     root: str = "./artifacts") -> Iterator[Decompressed]:
    """Decode each ``.aec`` file to ``output_dir/<stem>.png``; the codec is ``model`` or found under
    ``root`` by the file's model identity (and checked against it in every case)."""
    codecs: dict[bytes, LoadedCodec] = {}
    if model:
        given = load_codec_run(model)
        codecs[given.identity] = given
    fs, path = url_to_fs(output_dir)
    fs.makedirs(path, exist_ok=True)
    for uri in files:
        sfs, spath = url_to_fs(uri)
        try:
            data = sfs.cat_file(spath)
        except FileNotFoundError as e:
            raise InputError(f"{uri}: no such file") from e
        header = read_aec(data, uri)
        codec = codecs.get(header.model_id)
        if codec is None and model:
            codec = next(iter(codecs.values()))  # decode_aec names both identities
        if codec is None:
            codec = find_codec_run(root, header.model_id)
            if codec is None:
                raise ModelMismatchError(
                    f"{uri}: made by codec {header.model_id_hex}, which no compress run under {root} holds; pass --model RUN"
                )
            codecs[header.model_id] = codec
        img, mode = decode_aec(codec, data, uri)
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        name = (name[:-4] if name.endswith(".aec") else name).rsplit(".", 1)[0] + ".png"
        dest = join_uri(output_dir, name)
        dfs, dpath = url_to_fs(dest)
        dfs.pipe_file(dpath, encode_png(img))
        yield Decompressed(uri, dest, int(img.shape[1]), int(img.shape[0]), mode)
