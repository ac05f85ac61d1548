"""``aeflow compress`` / ``decompress`` as plain functions: image files <-> ``.aec`` files.

The CLI commands are thin over these; the batch job (``tasks/apps/compress.py``) codes
images of a run instead. Both use the coding functions of :mod:`tasks.codec`.

Outputs are written only inside ``--output`` and never through a link (temporary name, then
rename); two inputs that would make the same output name (``photo.png`` and ``photo.jpg`` ->
``photo.aec``) are refused before anything is written.
"""

from __future__ import annotations

import os
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
from tasks.redaction import refuse_credentials
from tasks.storage import is_local, join_uri, read_uri, storage_op, url_to_fs, write_file


def _make_folder(uri: str) -> None:
    fs, path = url_to_fs(uri)
    with storage_op("create", uri):
        fs.makedirs(path, exist_ok=True)


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


def _aec_output_name(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return (name[:-4] if name.endswith(".aec") else name).rsplit(".", 1)[0] + ".png"


def plan_outputs(inputs: list[str], output_dir: str, name_of: Callable[[str], str]) -> list[tuple[str, str]]:
    """(input, output name) for each distinct input, refusing two inputs that would write one file.

    ``photo.png`` and ``photo.jpg`` both make ``photo.aec``: rather than let the second silently
    overwrite the first, nothing is written and the message names both (compress them into
    different ``--output`` folders, or rename one).

    Raises:
        InputError: two inputs map to the same output name.
    """
    plan, by_name = [], {}
    for uri in dict.fromkeys(inputs):  # the same file given twice is coded once
        name = name_of(uri)
        if name in by_name:
            raise InputError(
                f"{by_name[name]} and {uri} would both be written to {join_uri(output_dir, name)}; nothing was "
                "written: give them different --output folders or rename one"
            )
        by_name[name] = uri
        plan.append((uri, name))
    return plan


def write_into(output_dir: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``output_dir/name``, never outside ``output_dir`` and never through a link.

    Locally the file is written under a temporary name in the folder and renamed over ``name``
    (a rename replaces a symlink planted at ``name`` instead of following it); ``name`` must be a
    plain file name. Object stores have no links: one PUT.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise InputError(f"{name!r} is not a plain file name for an output in {output_dir}")
    fs, folder = url_to_fs(output_dir)
    if not is_local(fs):
        write_file(fs, f"{folder.rstrip('/')}/{name}", data)
        return join_uri(output_dir, name)
    # The folder itself may be a link the user chose; inside it, only a plain name is written.
    write_file(fs, os.path.join(os.path.realpath(folder), name), data)
    return join_uri(output_dir, name)


StepProgress = Callable[[str], AbstractContextManager[Callable[[int, int], None] | None]]


def compress_files(images: list[str], model: str, output_dir: str, quality: int | None = None, refine_steps: int = 0,
                   progress: StepProgress | None = None) -> Iterator[Compressed]:
    """Code each image into ``output_dir/<stem>.aec`` with the codec of ``model`` (a run or model folder).

    With the refining encoder, ``progress(uri)`` is entered around each image's encoding and
    gives an ``on_step(done, total)`` callback (e.g. a progress bar).
    """
    for uri in [*images, output_dir]:
        refuse_credentials(uri, "URI")
    plan = plan_outputs(images, output_dir, lambda uri: _stem(uri) + ".aec")
    codec = load_codec_run(model)
    q = check_quality(codec, codec.model.config.levels // 2 if quality is None else quality)
    _make_folder(output_dir)
    for uri, name in plan:
        img, mode = read_image(uri)
        with progress(uri) if progress is not None and refine_steps else nullcontext() as on_step:
            data = encode_image(codec, img, mode, q, refine_steps, on_step=on_step)
        dest = write_into(output_dir, name, data)
        yield Compressed(uri, dest, len(data), 8 * len(data) / (img.shape[0] * img.shape[1]), q)


def decompress_files(files: list[str], output_dir: str, model: str | None = None,
                     root: str = "./artifacts") -> Iterator[Decompressed]:
    """Decode each ``.aec`` file to ``output_dir/<stem>.png``; the codec is ``model`` or found under
    ``root`` by the file's model identity (and checked against it in every case)."""
    for uri in [*files, output_dir, *([model] if model else [])]:
        refuse_credentials(uri, "URI")
    plan = plan_outputs(files, output_dir, _aec_output_name)
    codecs: dict[bytes, LoadedCodec] = {}
    if model:
        given = load_codec_run(model)
        codecs[given.identity] = given
    _make_folder(output_dir)
    for uri, name in plan:
        try:
            data = read_uri(uri)
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
        dest = write_into(output_dir, name, encode_png(img))
        yield Decompressed(uri, dest, int(img.shape[1]), int(img.shape[0]), mode)
