"""``aeflow compress`` / ``decompress`` as plain functions: image files <-> ``.aec`` files.

The CLI commands are thin over these; the batch job (``tasks/apps/compress.py``) codes
images of a run instead. Both use the coding functions of :mod:`tasks.codec`.

Outputs are written only inside ``--output`` and never through a link (temporary name, then
rename); two inputs that would make the same output name (``photo.png`` and ``photo.jpg`` ->
``photo.aec``) are refused before anything is written. Every input is read and checked (an image
decodes; an ``.aec`` file parses, has a codec and a quality level it names) and the output folder is
checked before the first output is written, so a command that fails on bad input or a bad ``--output``
writes nothing and overwrites no earlier output. An output file that already exists is refused, naming it,
before anything is written, unless ``overwrite`` (``--overwrite``) is given.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from models.aec import AecFile
from tasks.codec import (
    LoadedCodec,
    check_header,
    check_quality,
    check_refine_steps,
    decode_aec,
    decode_image_bytes,
    decode_image_bytes_noting,
    encode_image,
    encode_png,
    find_codec_run,
    load_codec_run,
    read_aec,
)
from tasks.errors import InputError, ModelMismatchError, StorageError
from tasks.redaction import refuse_credentials
from tasks.storage import (
    bucket_exists,
    is_local,
    join_uri,
    storage_op,
    url_to_fs,
    write_file,
)


def check_output_path(uri: str, what: str, *, folder: bool) -> None:
    """Refuse, before any work, a local output that cannot be created: ``uri`` (a folder when
    ``folder``, else a file) is a file or a folder of the wrong kind, or a file is in the way of a
    folder above it. On an object store the obstacle is a bucket that does not exist (some stores,
    SeaweedFS among them, would create it on the first write: a misspelt bucket would silently get the
    outputs). Nothing is created here.

    Raises:
        StorageError: naming ``what`` (e.g. ``--output codes``) and the obstacle (exit 4).
    """
    fs, path = url_to_fs(uri)
    if not is_local(fs):
        bucket = path.split("/")[0]
        with storage_op("check", uri):
            exists = bucket_exists(fs, bucket)
        if not exists:
            raise StorageError(f"cannot write {what}: bucket {bucket!r} does not exist")
        return
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        raise StorageError(f"cannot write {what}: {uri} is a folder; give a file name")
    if os.path.lexists(path) and not os.path.isdir(path) and folder:
        raise StorageError(f"cannot create {what}: {uri} is a file, not a folder")
    above = os.path.dirname(path)
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise StorageError(f"cannot create {what}: {above} is a file, not a folder")


def check_new_file(uri: str, what: str, overwrite: bool) -> None:
    """:func:`check_output_path` for one output file, which also must not exist unless ``overwrite``.

    Raises:
        StorageError: the path cannot be created, or the file exists (named; exit 4).
    """
    check_output_path(uri, what, folder=False)
    if overwrite:
        return
    fs, path = url_to_fs(uri)
    with storage_op("check", uri):
        there = os.path.lexists(path) if is_local(fs) else fs.exists(path)
    if there:
        raise StorageError(f"cannot write {what}: it already exists; nothing was written (pass --overwrite to "
                           "replace it)")


def _make_folder(uri: str) -> None:
    fs, path = url_to_fs(uri)
    try:
        with storage_op("create", uri):
            fs.makedirs(path, exist_ok=True)
    except OSError as e:  # a file in the way, permissions: the storage exit, one line
        raise StorageError(f"cannot create --output {uri}: {e.strerror or e}") from e


def _check_outputs(output_dir: str, plan: list[tuple[str, str]], overwrite: bool = False) -> None:
    """The output folder can be made, no folder stands where an output file goes, and (unless ``overwrite``)
    no output file exists already: an earlier result is not replaced without being asked.

    A link found where an output goes is not an earlier result (it is replaced, never written through:
    :func:`write_into`), so it does not count as one.

    Raises:
        StorageError: naming the obstacle, or every output that exists (the first three and a count).
    """
    check_output_path(output_dir, f"--output {output_dir}", folder=True)
    fs, folder = url_to_fs(output_dir)
    existing: list[str] = []
    if is_local(fs):
        for _uri, name in plan:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                raise StorageError(f"cannot write {join_uri(output_dir, name)}: a folder of that name is in the way")
            if os.path.isfile(path) and not os.path.islink(path):
                existing.append(join_uri(output_dir, name))
    elif not overwrite:
        try:
            with storage_op("list", output_dir):
                there = {posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)}
        except FileNotFoundError:
            there = set()
        existing = [join_uri(output_dir, name) for _uri, name in plan if name in there]
    if existing and not overwrite:
        names = existing[:3] + ([f"{len(existing) - 3} more"] if len(existing) > 3 else [])
        shown = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        one = len(existing) == 1
        raise StorageError(f"{shown} already exist{'s' if one else ''}; nothing was written (pass --overwrite to "
                           f"replace {'it' if one else 'them'})")


def expand_globs(uris: list[str], role: str) -> list[str]:
    """``uris`` with each glob (``s3://b/codes/*.aec``, or a quoted local one) replaced by the files it matches,
    sorted. The shell expands an unquoted local glob; an object store's was taken as one file's name ("no such
    file"). A name that exists as it is stays itself, whatever its characters (``img[1].png``).

    Raises:
        InputError: a glob that matches no file (naming a missing bucket as such).
    """
    from tasks.inputs import find_files
    from tasks.storage import to_uri

    out: list[str] = []
    for uri in uris:
        refuse_credentials(uri, "URI")
        fs, path = url_to_fs(uri)
        if not any(ch in path for ch in "*?["):
            out.append(uri)
            continue
        with storage_op("list", uri):
            literal = fs.exists(path)
        if literal:
            out.append(uri)
            continue
        fs, found, _root = find_files(uri, role)
        out += [to_uri(fs, p) for p in found]
    return out


def _read_input(uri: str, expected: str) -> bytes:
    """The bytes of one input file (``expected``: what the command takes, for the message)."""
    fs, path = url_to_fs(uri)
    try:
        with storage_op("read", uri):
            if fs.isdir(path):
                raise InputError(f"{uri} is a folder; pass {expected}")
            return fs.cat_file(path)
    except FileNotFoundError as e:
        raise InputError(f"{uri}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{uri} is a folder; pass {expected}") from e


@dataclass(frozen=True)
class Compressed:
    input: str
    output: str
    bytes: int
    bpp: float
    quality: int
    converted: str = ""  # how the image was converted to L or RGB for the codec ("" when it was one)


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
    return (name.removesuffix(".aec")).rsplit(".", 1)[0] + ".png"


def plan_outputs(inputs: list[str], output_dir: str, name_of: Callable[[str], str],
                 remedy: str = "give them different --output folders or rename one") -> list[tuple[str, str]]:
    """(input, output name) for each distinct input, refusing two inputs that would write one file.

    ``photo.png`` and ``photo.jpg`` both make ``photo.aec``: rather than let the second silently
    overwrite the first, nothing is written and the message names both (compress them into
    different ``--output`` folders, or rename one: ``remedy`` says what to do).

    Raises:
        InputError: two inputs map to the same output name.
    """
    plan, by_name = [], {}
    for uri in dict.fromkeys(inputs):  # the same file given twice is coded once
        name = name_of(uri)
        if name in by_name:
            raise InputError(
                f"{by_name[name]} and {uri} would both be written to {join_uri(output_dir, name)}; nothing was "
                f"written: {remedy}"
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
                   progress: StepProgress | None = None, overwrite: bool = False) -> Iterator[Compressed]:
    """Code each image into ``output_dir/<stem>.aec`` with the codec of ``model`` (a run or model folder).

    With the refining encoder, ``progress(uri)`` is entered around each image's encoding and
    gives an ``on_step(done, total)`` callback (e.g. a progress bar). ``.aec`` files that exist
    already are refused (nothing written) unless ``overwrite``.
    """
    from tasks.images import describe_conversion

    for uri in [*images, output_dir]:
        refuse_credentials(uri, "URI")
    plan = plan_outputs(images, output_dir, lambda uri: _stem(uri) + ".aec")
    _check_outputs(output_dir, plan, overwrite)
    codec = load_codec_run(model)
    q = check_quality(codec, codec.model.config.levels // 2 if quality is None else quality)
    check_refine_steps(codec, refine_steps)
    images_only = "image files (PNG/JPEG; a folder is coded by `aeflow run compress --model MODEL --apply-to FOLDER`)"
    for uri, _name in plan:  # every image decodes before the first file is written (one in memory at a time)
        decode_image_bytes(_read_input(uri, images_only), uri)
    _make_folder(output_dir)
    for uri, name in plan:
        img, mode, change = decode_image_bytes_noting(_read_input(uri, images_only), uri)
        with progress(uri) if progress is not None and refine_steps else nullcontext() as on_step:
            data = encode_image(codec, img, mode, q, refine_steps, on_step=on_step)
        dest = write_into(output_dir, name, data)
        yield Compressed(uri, dest, len(data), 8 * len(data) / (img.shape[0] * img.shape[1]), q,
                         describe_conversion(change, None) if change else "")


def decompress_files(files: list[str], output_dir: str, model: str | None = None,
                     root: str = "./artifacts", overwrite: bool = False) -> Iterator[Decompressed]:
    """Decode each ``.aec`` file to ``output_dir/<stem>.png``; the codec is ``model`` or found under
    ``root`` by the file's model identity (and checked against it in every case). PNGs that exist
    already are refused (nothing written) unless ``overwrite``."""
    for uri in [*files, output_dir, *([model] if model else [])]:
        refuse_credentials(uri, "URI")
    plan = plan_outputs(files, output_dir, _aec_output_name)
    _check_outputs(output_dir, plan, overwrite)
    codecs: dict[bytes, LoadedCodec] = {}
    if model:
        given = load_codec_run(model)
        codecs[given.identity] = given

    def codec_of(uri: str, header: AecFile) -> LoadedCodec:
        codec = codecs.get(header.model_id)
        if codec is None and model:
            codec = next(iter(codecs.values()))  # decode_aec names both identities
        if codec is None:
            # looked for under root (after the file's header is read: a bad file is said first): one that does not
            # exist is said as such, as by `aeflow runs list`
            fs, path = url_to_fs(root)
            if is_local(fs) and not fs.exists(path):
                raise StorageError(f"no artifact root at {root} (nothing has run there) to find the files' codec in; "
                                   "--root names one, or pass --model with the run or the model folder that made them")
            codec = find_codec_run(root, header.model_id)
            if codec is None:
                raise ModelMismatchError(
                    f"{uri}: made by codec {header.model_id_hex}, which no compress run under {root} holds; pass --model with the run or the model folder "
                    "(config.json + weights.safetensors) that made it"
                )
            codecs[header.model_id] = codec
        return codec

    # Every file parses (checksum included), has its codec and a quality level that codec has
    # before the first PNG is written.
    for uri, _name in plan:
        data = _read_input(uri, ".aec files")
        header = read_aec(data, uri)
        check_header(codec_of(uri, header), header, uri)
    _make_folder(output_dir)
    for uri, name in plan:
        data = _read_input(uri, ".aec files")
        img, mode = decode_aec(codec_of(uri, read_aec(data, uri)), data, uri)
        dest = write_into(output_dir, name, encode_png(img))
        yield Decompressed(uri, dest, int(img.shape[1]), int(img.shape[0]), mode)
