"""Validated, Dask-parallel image loading (PNG/JPEG folders at any fsspec URI).

``inspect_images`` lists a file or folder (recursively; local or ``s3://``),
hashes the files and reads class labels from subfolders (the ImageFolder
convention: ``root/<class>/.../image.png``). ``load_images`` decodes every file
on the Dask client in shards of ``shard_size`` files (fewer when their bytes pass
``shard_mb``): each worker reads the bytes, decodes them with Pillow, normalises
the mode (grayscale or RGB), resizes or crops when configured, and writes one
``.npz`` shard (uint8 CHW arrays) into the run directory. A file that does not decode, or an image smaller
than the network needs, names itself in one :class:`InputError`; with ``skip_bad`` it is left out and listed
instead. What the normalisation changed
beyond the mode asked for (transparency composited, a palette, 16 bits, CMYK) is counted per image set,
and :func:`image_notes` says it (and which files were left out) in the run's notes.

Reading shards back (:func:`read_images`, :func:`iter_images`) never unpickles.
This module does not import Prefect: Dask workers import it to decode, and should
start fast (the Prefect task over :func:`load_images` is in ``tasks.apps.images_base``).
Reused by every image application (denoise, index, and the learned codec).
"""

from __future__ import annotations

import io
import posixpath
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import numpy as np
from prefect import task
from pydantic import Field

from tasks.config import Frozen
from tasks.dask_client import compute_settled
from tasks.errors import InputError
from tasks.inputs import content_hash, find_files, relative_to
from tasks.prefect_utils import IO_TASK
from tasks.storage import (
    FileRecord,
    RunDir,
    read_uri,
    storage_op,
    to_uri,
    url_to_fs,
    write_uri,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
Mode = Literal["gray", "rgb", "keep"]

# Image formats aeflow does not read, by file name (at the door) and by Pillow's name for the content
# (when decoding): a refusal names the format, so the user knows what to convert.
OTHER_IMAGE_EXTENSIONS = {
    ".webp": "WebP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF",
    ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL", ".jp2": "JPEG 2000", ".j2k": "JPEG 2000",
    ".ico": "ICO", ".tga": "TGA", ".psd": "PSD", ".pbm": "PBM", ".pgm": "PGM", ".ppm": "PPM", ".pnm": "PNM",
    ".dng": "DNG (camera raw)", ".cr2": "CR2 (camera raw)", ".nef": "NEF (camera raw)", ".arw": "ARW (camera raw)",
}
_PIL_FORMAT_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000", "DIB": "BMP", "AVIF": "AVIF", "HEIF": "HEIF"}
READS = "aeflow reads PNG and JPEG"


def unsupported_format(fmt: str) -> str:
    """The one reason given for an image in a format aeflow does not read, e.g. ``fmt="WebP"``."""
    article = "an" if fmt[:1] in "AEIO" else "a"
    return f"{article} {fmt} image; {READS}: convert it to one of them"


def not_an_image(path: str) -> str:
    """Why a listed file that is not named .png/.jpg/.jpeg is not read: its format when its name says one."""
    fmt = OTHER_IMAGE_EXTENSIONS.get(posixpath.splitext(path)[1].lower())
    return unsupported_format(fmt) if fmt else f"not an image file; {READS} (.png, .jpg, .jpeg)"


def other_files_error(others: Sequence[str], role: str, uri: str, remedy: str = "pass --skip-bad to leave such "
                      "files out") -> InputError:
    """The refusal of a folder holding files that are not PNG/JPEG images (URIs): the first named, with why."""
    more = f" (and {len(others) - 1} more file{'s' if len(others) > 2 else ''} aeflow does not read)" if len(others) > 1 else ""
    return InputError(f"{others[0]}: {not_an_image(others[0])}{more}; {role} {uri} must hold only PNG/JPEG images "
                      f"(or {remedy})")


class ImageLoadConfig(Frozen):
    """Where the images are and how they are normalised at the door."""

    input: str | None = Field(None, description="Training images: a PNG/JPEG file or folder (recursive; subfolders name classes), local or s3://.")
    apply_to: str | None = Field(None, description="Images to apply the model to; same forms as input. Without it, index and compress use the "
                                   "input; denoise applies the input with --model, and nothing in a training run (which scores held-out "
                                   "input images with synthetic noise).")
    reference: str | None = Field(
        None, description="Clean images with the same relative paths as apply_to, for quality metrics (denoise: --clean-reference)."
    )
    mode: Mode = Field(
        "gray", description="gray, rgb, or keep: keep leaves grayscale (L) and RGB images as they are and converts the rest "
        "(grayscale with alpha -> L, RGBA/CMYK/palette -> RGB, 16-bit -> 8-bit; the run's notes count them). "
        "Transparency is composited on white (see alpha).")
    size: int | None = Field(None, ge=1, le=8192, description="Resize every image to size x size (None: keep the original size).")
    fit: Literal["resize", "crop"] = Field(
        "resize", description="With size: resize (ignores aspect ratio) or crop (shorter side to size, then centre crop)."
    )
    alpha: Literal["white", "refuse"] = Field(
        "white", description="Images with transparency: composite on white, or refuse them (the codec has no alpha plane)."
    )
    skip_bad: bool = Field(False, description="Leave out files that are not PNG/JPEG, do not decode or are smaller than "
                           "the network needs, instead of failing (named in a warning and the run's notes; listed with "
                           "reasons in the manifest).")
    shard_size: int = Field(64, ge=1, le=100_000, description="Images per Dask task and per shard file (at most).")
    shard_mb: float = Field(
        32.0, gt=0,
        description="A shard also closes when its files reach this many MB, so a Dask task holds a bounded amount of "
        "decoded pixels (large photographs: a few per shard; a single larger file is a shard of its own).",
    )


@dataclass(frozen=True)
class ImageSource:
    """An inspected image input: its files (with hashes), relative paths and labels."""

    uri: str
    role: str
    files: tuple[FileRecord, ...]
    rel: tuple[str, ...]
    labels: tuple[str | None, ...]
    not_images: tuple[str, ...] = ()

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and all(lbl is not None for lbl in self.labels) and len(set(self.labels)) > 1

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one input, in shards on storage, in input order (bad files left out)."""

    source_uri: str
    role: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    rel: tuple[str, ...]
    labels: tuple[str | None, ...]
    shapes: tuple[tuple[int, int, int], ...]
    skipped: tuple[dict[str, str], ...] = ()
    has_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    paths: tuple[str, ...] = ()  # the URI of each image, as listed (empty: derived from source_uri and rel)
    converted: dict[str, int] = field(default_factory=dict)  # images per conversion beyond the mode (decode_image_noting)

    def __len__(self) -> int:
        return len(self.rel)

    def path_of(self, k: int) -> str:
        """The URI of image ``k`` for messages: the file itself, whether the input was a folder, a glob or one file."""
        if self.paths:
            return self.paths[k]
        base = self.source_uri.rstrip("/")
        return base if _is_image_name(base) and posixpath.basename(base) == self.rel[k] else f"{base}/{self.rel[k]}"

    @property
    def megapixels(self) -> float:
        return sum(h * w for _, h, w in self.shapes) / 1e6


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(uri: str, role: str = "input") -> tuple[Any, list[str], list[str], str]:
    """Resolve a file or folder to (fs, image paths, non-image paths, root path).

    Raises:
        InputError: nothing there, a missing bucket, or no PNG/JPEG images.
    """
    fs, found, root = find_files(uri, role)
    images = [p for p in found if _is_image_name(p)]
    others = [p for p in found if not _is_image_name(p)]
    if len(found) == 1 and others:
        raise InputError(f"{to_uri(fs, others[0])}: {not_an_image(others[0])}")
    if not images:
        raise InputError(f"no PNG/JPEG images found in {role} {uri}" + (" (the folder is empty)" if not found else ""))
    return fs, images, others, root


def inspect_images(uri: str, role: str = "input", *, skip_bad: bool = False) -> ImageSource:
    """List and hash the images at ``uri``; labels from the first subfolder of each path.

    Files with other extensions inside the folder are an error (naming the first),
    or, with ``skip_bad``, left out and recorded.
    """
    fs, paths, others, root = list_images(uri, role)
    if others and not skip_bad:
        raise other_files_error([to_uri(fs, p) for p in others], role, uri)
    files, rels, labels = [], [], []
    for p in paths:
        furi = to_uri(fs, p)
        with storage_op("read", furi):
            info = fs.info(p)
        size = int(info.get("size") or 0)
        if size == 0 and not skip_bad:
            raise InputError(f"{furi}: empty file (0 bytes), not an image")
        files.append(FileRecord(path=furi, size=size, hash=content_hash(fs, p, info)))
        rel = relative_to(p, root)
        rels.append(rel)
        labels.append(rel.split("/")[0] if "/" in rel else None)
    return ImageSource(uri, role, tuple(files), tuple(rels), tuple(labels), tuple(to_uri(fs, p) for p in others))


# ---------------------------------------------------------------------------------------
# Decoding (pure functions; run on Dask workers)


_EXIF_ORIENTATION = 0x0112


def decode_image(
    data: bytes, mode: Mode = "gray", size: int | None = None, fit: str = "resize", alpha: str = "white"
) -> np.ndarray:
    """Decode PNG/JPEG bytes to a uint8 ``(C, H, W)`` array, upright (an EXIF Orientation is applied).

    Transparency is composited on white, or with ``alpha="refuse"`` is an error
    (:func:`decode_image_noting` also says what was converted).

    Raises:
        ValueError: with the reason when the bytes are not a decodable image.
    """
    return decode_image_noting(data, mode, size, fit, alpha)[0]


def decode_image_noting(
    data: bytes, mode: Mode = "gray", size: int | None = None, fit: str = "resize", alpha: str = "white"
) -> tuple[np.ndarray, str | None]:
    """:func:`decode_image`, and what it changed beyond the mode asked for (None: nothing).

    The change is a key of :data:`CONVERSIONS`, ``"<kind>><target>"`` (e.g. ``"palette>RGB"``,
    ``"16-bit>grayscale"``) or ``"alpha"`` (transparency composited on white). Converting L to RGB
    or RGB to L is what ``mode`` asks for, and not a change.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()
    except UnidentifiedImageError as e:
        for sig, name in ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG")):
            if data.startswith(sig):  # the format's signature, then nothing Pillow can read: damaged, not foreign
                raise ValueError(f"a damaged {name} file (its {name} signature, then data that does not decode)") from e
        raise ValueError("not a PNG/JPEG image (cannot identify the format)") from e
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot decode image: {e}") from e
    if fmt not in ("PNG", "JPEG", "MPO"):
        raise ValueError(unsupported_format(_PIL_FORMAT_NAMES.get(str(fmt), str(fmt))))
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # Pixels as the image is displayed: a camera's EXIF Orientation (e.g. 6, rotated 90°) applied.
        img = ImageOps.exif_transpose(img)
    source = img.mode
    kind = {"P": "palette", "PA": "palette", "1": "1-bit", "CMYK": "CMYK"}.get(source, source)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the 8 most significant bits (PIL's convert would clip), whatever the values
        # (a dark 16-bit image, every value under 256, is nearly black, not an 8-bit image to cast).
        kind = "16-bit"
        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    gray_like = img.mode in ("1", "L", "LA", "I", "F")
    target = {"gray": "L", "rgb": "RGB"}.get(mode) or ("L" if gray_like else "RGB")
    target_name = "grayscale" if target == "L" else "RGB"
    change = None if kind in ("L", "RGB") else f"{kind}>{target_name}"
    # An alpha channel, or a PNG colour key (tRNS: one palette entry, gray level or RGB colour is transparent)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            # every pixel opaque (an RGBA export, an unused tRNS colour): the alpha channel is dropped, nothing lost
            change = f"opaque-alpha>{target_name}"
        elif alpha == "refuse":
            what = "an alpha channel" if img.mode in ("RGBA", "LA", "PA") else "a transparent colour (PNG tRNS)"
            raise ValueError(f"image has {what} (mode {img.mode}) and transparent pixels; the codec stores L or RGB "
                             "only")
        else:  # composite transparency on white rather than letting convert() drop alpha to black
            change = "alpha"
            rgba = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
        img = rgba
    img = img.convert(target)
    if size is not None:
        if fit == "crop":
            w, h = img.size
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))), change


# How each change of decode_image_noting is said in a run's notes (``{n}`` images, ``{s}`` plural, ``{to}`` target).
CONVERSIONS = {
    "alpha": "{n} image{s} with transparency composited on white (--set load.alpha=refuse to refuse them)",
    "opaque-alpha": "{n} image{s} with a fully opaque alpha channel stored as {to} without it",
    "palette": "{n} palette image{s} converted to {to}",
    "16-bit": "{n} 16-bit image{s} reduced to 8 bits ({to})",
    "1-bit": "{n} 1-bit (black and white) image{s} stored as 8-bit {to}",
    "CMYK": "{n} CMYK image{s} converted to {to}",
}


def _conversion_rank(change: str) -> int:
    kinds = list(CONVERSIONS)
    kind = change.partition(">")[0]
    return kinds.index(kind) if kind in kinds else len(kinds)


def describe_conversion(change: str, n: int | None = 1) -> str:
    """One change of :func:`decode_image_noting` in words, for ``n`` images (None: "a ... image")."""
    kind, _, to = change.partition(">")
    text = CONVERSIONS.get(kind, "{n} " + kind + " image{s} converted to {to}")
    if n is None:
        text = text.removeprefix("{n} ")
        return ("an " if text[:1] in "AEIOaeio" else "a ") + text.format(s="", to=to)
    return text.format(n=n, s="" if n == 1 else "s", to=to)


def encode_png(arr: np.ndarray) -> bytes:
    """A uint8 ``(C, H, W)`` or ``(H, W)`` array as PNG bytes."""
    return _encode(arr, "PNG")


def encode_like(arr: np.ndarray, path: str) -> bytes:
    """Encode in the format the file name asks for (JPEG at quality 95 for .jpg/.jpeg, else PNG)."""
    return _encode(arr, "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG")


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(a.astype(np.uint8))).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decode_shard(
    uris: list[str], mode: Mode, size: int | None, fit: str, out_uri: str | None, alpha: str = "white",
    min_side: int = 1,
) -> list[dict[str, Any]]:
    """Decode one shard of files; write the good ones as one ``.npz``; report every file (an image with a side
    under ``min_side`` is not good: ``small``, with its shape)."""
    report: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, uri in enumerate(uris):
        try:
            fs, path = url_to_fs(uri)
            with storage_op("read", uri), fs.open(path, "rb") as f:  # an outage stops the run, not this file
                data = f.read()
            arr, change = decode_image_noting(data, mode, size, fit, alpha)
        except ValueError as e:
            report.append({"ok": False, "reason": str(e)})
            continue
        except OSError as e:
            report.append({"ok": False, "reason": f"cannot read: {e}"})
            continue
        if min(arr.shape[1:]) < min_side:
            report.append({"ok": False, "small": True, "shape": list(arr.shape)})
            continue
        arrays[f"i{i:06d}"] = arr
        report.append({"ok": True, "shape": list(arr.shape), "change": change})
    if out_uri is not None and arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_uri(out_uri, buf.getvalue())
    return report


def shard_spans(sizes: Sequence[int], count: int, max_bytes: float) -> list[range]:
    """Consecutive files grouped into shards of at most ``count`` files and ``max_bytes`` of file bytes
    (a file larger than that alone); every file in exactly one shard, in order."""
    spans: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= count or total + size > max_bytes):
            spans.append(range(start, i))
            start, total = i, 0
        total += size
    if len(sizes):
        spans.append(range(start, len(sizes)))
    return spans


def load_images(source: ImageSource, load: ImageLoadConfig, *, run: RunDir | None, prefix: str, min_side: int = 1,
                too_small_for: str = "the network") -> ImageSet:
    """Decode ``source`` on the Dask client into shards under ``{run}/{prefix}/``.

    An image whose shorter side is under ``min_side`` (what the network needs, ``too_small_for`` in words)
    is refused like a file that does not decode, and with ``load.skip_bad`` left out and listed like one.

    Raises:
        InputError: the first file that does not decode or is too small, by name (unless ``load.skip_bad``),
            or every file bad.
    """
    uris = [f.path for f in source.files]
    spans = shard_spans([f.size for f in source.files], load.shard_size, load.shard_mb * 2**20)
    groups = [uris[span.start : span.stop] for span in spans]
    out_uris: list[str | None] = [f"{run.uri_of(prefix)}/shard-{i:05d}.npz" for i in range(len(groups))] if run else [None] * len(groups)
    if run is not None:
        run.makedirs(prefix)
    jobs = [dask.delayed(_decode_shard)(g, load.mode, load.size, load.fit, u, load.alpha, min_side)
            for g, u in zip(groups, out_uris, strict=True)]
    reports = compute_settled(*jobs, progress=f"decoding {len(uris):,} images ({source.uri})", unit="shards")
    bad: list[dict[str, str]] = []
    small: set[int] = set()  # which of bad are images too small for the network
    converted: dict[str, int] = {}
    keep_rel, keep_labels, keep_paths, shapes, shards, counts = [], [], [], [], [], []
    for gi, (rep, out) in enumerate(zip(reports, out_uris, strict=True)):
        ok_here = 0
        for j, r in enumerate(rep):
            k = spans[gi].start + j
            if r.get("small"):
                _, h, w = r["shape"]
                small.add(len(bad))
                bad.append({"path": uris[k], "reason": f"{w}x{h} pixels, too small for {too_small_for}: "
                                                       f"{source.role} images need at least {min_side}x{min_side}"})
                continue
            if not r["ok"]:
                bad.append({"path": uris[k], "reason": r["reason"]})
                continue
            ok_here += 1
            keep_rel.append(source.rel[k])
            keep_paths.append(uris[k])
            keep_labels.append(source.labels[k])
            shapes.append(tuple(r["shape"]))
            if r.get("change"):
                converted[r["change"]] = converted.get(r["change"], 0) + 1
        if ok_here and out is not None:
            shards.append(out)
            counts.append(ok_here)
    if bad and not load.skip_bad:
        n = len(bad) - 1
        more = f" (and {n} more bad file{'' if n == 1 else 's'})" if n else ""
        if 0 in small:
            raise InputError(f"{bad[0]['path']} is {bad[0]['reason']}{more}; resize or remove it, or pass --skip-bad "
                             "to leave such images out")
        # Which input it is in: the same file name can be in --apply-to and in the clean reference.
        raise InputError(f"{bad[0]['path']}: {bad[0]['reason']}{more}; {source.role} {source.uri} must hold only "
                         "decodable PNG/JPEG images: fix or remove it, or pass --skip-bad to leave such files out")
    if not keep_rel:
        large = f" of at least {min_side}x{min_side} pixels ({len(small)} too small for {too_small_for})" if small else ""
        raise InputError(f"{source.role} {source.uri}: none of the {len(uris)} files is a decodable PNG/JPEG image{large}")
    skipped = tuple(bad) + tuple({"path": p, "reason": not_an_image(p)} for p in source.not_images)
    labels_ok = all(lbl is not None for lbl in keep_labels) and len(set(keep_labels)) > 1
    return ImageSet(
        source_uri=source.uri,
        role=source.role,
        shards=tuple(shards),
        counts=tuple(counts),
        rel=tuple(keep_rel),
        labels=tuple(keep_labels),
        shapes=tuple(shapes),  # type: ignore[arg-type]
        skipped=skipped,
        has_labels=labels_ok,
        paths=tuple(keep_paths),
        converted=dict(sorted(converted.items(), key=lambda kv: (_conversion_rank(kv[0]), kv[0]))),
    )


def image_notes(imset: ImageSet, shown: int = 3) -> list[str]:
    """What a run's notes say about how an image set was read: the files ``--skip-bad`` left out (the first
    ``shown`` by name, a warning) and the images converted beyond the mode asked for, counted by kind."""
    notes = []
    if imset.skipped:
        base = imset.source_uri.rstrip("/") + "/"
        names = [s["path"].removeprefix(base) for s in imset.skipped]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        notes.append(f"warning: --skip-bad left out {len(names)} file{'s' if len(names) > 1 else ''} of {imset.role} "
                     f"{imset.source_uri}: {', '.join(names[:shown])}{more} (each with its reason under skipped in "
                     "the manifest)")
    if imset.converted:
        said = "; ".join(describe_conversion(change, n) for change, n in imset.converted.items())
        notes.append(f"{imset.role} {imset.source_uri}: {said}")
    return notes


@task(name="load-images", task_run_name="load-images-{prefix}", **IO_TASK)
def load_images_task(source: ImageSource, load: ImageLoadConfig, run: RunDir, prefix: str, min_side: int = 1,
                     too_small_for: str = "the network") -> ImageSet:
    """Prefect task over :func:`load_images` (validation errors are not retried)."""
    return load_images(source, load, run=run, prefix=prefix, min_side=min_side, too_small_for=too_small_for)


MIN_TRAIN_IMAGES = 2
"""Fewest decoded images an image model is trained on (one can be held out for validation). An
application that validates on held-out crops instead of images (compress) sets its own
``min_train_images``."""


def check_training_images(imset: ImageSet, minimum: int = MIN_TRAIN_IMAGES) -> None:
    """Refuse a training set too small to train and validate on (e.g. a single image).

    Raises:
        InputError: fewer than ``minimum`` images; the message gives the minimum.
    """
    if len(imset) < minimum:
        left_out = f" ({len(imset.skipped)} left out as bad)" if imset.skipped else ""
        raise InputError(
            f"{imset.role} {imset.source_uri}: {len(imset)} decodable image(s){left_out} are too few to train and "
            f"validate on: training needs at least {minimum} images"
        )


def iter_images(imset: ImageSet) -> Iterator[np.ndarray]:
    """Decoded images one at a time, in order (one shard in memory at a time)."""
    for i in range(len(imset.shards)):
        yield from shard_images(imset, i)


def shard_images(imset: ImageSet, index: int) -> list[np.ndarray]:
    """The decoded images of shard ``index``, in order."""
    data = np.load(io.BytesIO(read_uri(imset.shards[index])), allow_pickle=False)
    return [data[key] for key in sorted(data.files)]


def shard_rels(imset: ImageSet, index: int) -> tuple[str, ...]:
    """The relative paths of shard ``index``'s images, in order."""
    start = sum(imset.counts[:index])
    return imset.rel[start : start + imset.counts[index]]


def read_images(imset: ImageSet) -> list[np.ndarray]:
    return list(iter_images(imset))


def images_of(imset: ImageSet, idx: Sequence[int] | np.ndarray | None = None) -> list[np.ndarray]:
    """The decoded images ``idx`` of ``imset`` (all of them when None), in the order of ``idx``.

    Only the shards that hold them are read, one at a time: a sample of a large set costs the
    sample's memory, not the set's."""
    if idx is None:
        return read_images(imset)
    want = [int(i) for i in idx]
    starts = np.cumsum((0, *imset.counts))
    got: dict[int, np.ndarray] = {}
    for shard in sorted({int(np.searchsorted(starts, i, side="right")) - 1 for i in want}):
        images = shard_images(imset, shard)
        got.update({i: images[i - int(starts[shard])] for i in want if starts[shard] <= i < starts[shard + 1]})
    return [got[i] for i in want]


def image_shape(imset: ImageSet) -> tuple[int, int, int]:
    """The one ``(C, H, W)`` shape of every image of ``imset``.

    Raises:
        InputError: the images differ in mode (one grayscale file and one colour file are named:
            set a mode) or in size (set a size to resize them).
    """
    shapes = set(imset.shapes)
    channels = {c for c, _, _ in shapes}
    if len(channels) > 1:
        first = {}
        for k, (c, _, _) in enumerate(imset.shapes):
            first.setdefault(c, k)
        kinds = ", ".join(f"{imset.path_of(k)} is {'grayscale' if c == 1 else 'RGB'}" for c, k in sorted(first.items()))
        sizes = {(h, w) for _, h, w in shapes}
        also = "; they differ in size too: set a size to resize them" if len(sizes) > 1 else ""
        raise InputError(f"{imset.source_uri}: images have different modes ({kinds}); "
                         f"pass --mode gray or --mode rgb to convert them to one{also}")
    if len(shapes) > 1:
        raise InputError(f"{imset.source_uri}: images have different shapes {sorted(shapes)[:3]}...; set a size to resize them")
    return next(iter(shapes)) if shapes else (1, 1, 1)


def stack_images(imset: ImageSet, idx: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Images ``idx`` (all when None) as one ``(N, C, H, W)`` uint8 array; they must share one shape
    (e.g. with ``size``). Only the shards holding them are read (:func:`images_of`)."""
    shape = image_shape(imset)
    images = images_of(imset, idx)
    return np.stack(images) if images else np.zeros((0, *shape), np.uint8)
