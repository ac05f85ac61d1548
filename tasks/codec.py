"""The learned codec at the task layer: images in and out, ``.aec`` files, models by run or identity.

Plain functions (Pillow, fsspec through the artifact store, the pure-torch codec
in :mod:`models.codec` and :mod:`models.codec_hyperprior`); the CLI's ``aeflow compress``/``decompress`` and the
``compress`` batch job both call them. Every error a user can cause names the
file and says what is wrong (:class:`~tasks.errors.InputError`,
:class:`~tasks.errors.ModelMismatchError`).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models import build_model
from models.aec import AecFile, AecFormatError, parse
from models.codec import CodecBase, CodecConfig, load_codec_state
from models.codec_hyperprior import HyperpriorConfig
from models.entropy_coding import EntropyCodingError
from models.image_ops import as_rgb
from models.metrics import ms_ssim, psnr
from tasks.errors import ConfigError, InputError, ModelMismatchError, StorageError
from tasks.storage import MODEL_DIR, ArtifactStore, open_model_source, url_to_fs

# -- images --------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Decode PNG/JPEG bytes to uint8 (H, W) for grayscale or (H, W, 3) for colour, and the mode.

    The shared image decoder (:func:`tasks.images.decode_image`, mode ``keep``) with
    transparency refused: the codec has no alpha plane, and silently dropping it
    would lose data.

    Raises:
        InputError: naming ``name`` when the bytes do not decode or have alpha.
    """
    img, mode, _change = decode_image_bytes_noting(data, name)
    return img, mode


def decode_image_bytes_noting(data: bytes, name: str) -> tuple[np.ndarray, str, str | None]:
    """:func:`decode_image_bytes`, and how the image was converted to L or RGB (a palette, 16 bits, CMYK:
    :func:`tasks.images.decode_image_noting`; None when it was L or RGB already)."""
    from tasks.images import decode_image_noting

    try:
        chw, change = decode_image_noting(data, "keep", alpha="refuse")
    except ValueError as e:
        raise InputError(f"{name}: {e}") from e
    return (*from_chw(chw), change)


def from_chw(chw: np.ndarray) -> tuple[np.ndarray, str]:
    """A decoded ``(C, H, W)`` array as the codec's (H, W) "L" or (H, W, 3) "RGB" image."""
    if chw.shape[0] == 1:
        return chw[0], "L"
    return np.ascontiguousarray(chw.transpose(1, 2, 0)), "RGB"


def read_image(uri: str) -> tuple[np.ndarray, str]:
    fs, path = url_to_fs(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise InputError(f"{uri}: no such file") from e
    return decode_image_bytes(data, uri)


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def to_model_input(img: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (H, W[, 3]) -> float (1, 3, H, W) in [0, 1] (grayscale replicated)."""
    x = torch.from_numpy(np.array(as_rgb(img), copy=True)).permute(2, 0, 1).float().div(255.0)
    return x.unsqueeze(0).to(device)


def from_model_output(x_hat: torch.Tensor, mode: str) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> uint8 image in ``mode`` (grayscale: the channel mean)."""
    a = x_hat[0].detach().float().cpu()
    if mode == "L":
        a = a.mean(0, keepdim=True)
    arr = torch.round(a.clamp(0, 1) * 255.0).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[:, :, 0] if mode == "L" else arr


# -- the codec -------------------------------------------------------------------------------


# The codec kinds (``kind`` in a model's config.json; the batch job's ``app.codec`` names them
# "factorized" and "hyperprior") and their config classes.
CODEC_KINDS: dict[str, type[CodecConfig]] = {"codec": CodecConfig, "hyperprior": HyperpriorConfig}
CODEC_NAMES = {"factorized": "codec", "hyperprior": "hyperprior"}


def new_codec(name: str, **settings: object) -> CodecBase:
    """A fresh, untrained codec of kind ``name`` ("factorized" or "hyperprior") with these config fields."""
    try:
        kind = CODEC_NAMES[name]
    except KeyError as e:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODEC_NAMES)}") from e
    return build_model(kind, CODEC_KINDS[kind](**settings).to_dict())  # type: ignore[arg-type, return-value]


@dataclass
class LoadedCodec:
    """A codec ready to code, with its identity and where it came from."""

    model: CodecBase
    identity: bytes
    source: str

    @property
    def identity_hex(self) -> str:
        return self.identity.hex()


def codec_from_files(meta: dict, state_dict: dict, source: str) -> LoadedCodec:
    """A codec of any kind in :data:`CODEC_KINDS` from its config.json (``meta``) and weights.

    Raises:
        ModelMismatchError: not a codec, or one without its integer tables.
    """
    kind = meta.get("kind")
    if kind not in CODEC_KINDS:
        raise ModelMismatchError(f"{source} holds a {kind!r} model, not a learned image codec "
                                 f"(kinds: {', '.join(sorted(CODEC_KINDS))})")
    model: CodecBase = build_model(kind, meta["config"])  # type: ignore[assignment]
    try:
        load_codec_state(model, state_dict)
    except RuntimeError as e:
        raise ModelMismatchError(f"{source}: the weights do not fit its {kind} config: {str(e)[:300]}") from e
    model.eval()
    if not model.has_tables:
        raise ModelMismatchError(f"{source}: the codec has no entropy-coding tables (training did not finish)")
    return LoadedCodec(model=model, identity=model.identity(), source=source)


def load_codec_run(run_uri: str) -> LoadedCodec:
    """The codec saved in a ``compress`` run (``--model RUN``).

    A plain model folder holding ``config.json`` and ``weights.safetensors`` (such as
    the committed benchmark codec, ``benchmarks/weights/codec``) is accepted too. Both go
    through the one model loader (``tasks.storage.open_model_source``), which verifies the
    weights against the hash recorded when they were saved.
    """
    source = open_model_source(run_uri)
    meta, state = source.load_model_files()
    return codec_from_files(meta, state, source.uri)


def find_codec_run(root: str, identity: bytes) -> LoadedCodec | None:
    """Search the complete ``compress`` runs under ``root`` for the codec with this identity."""
    store = ArtifactStore(root)

    def holds_it(run) -> bool:  # its model's config.json first: one small read, the manifest only for a match
        try:
            meta = run.read_json(f"{MODEL_DIR}/config.json")
        except (StorageError, json.JSONDecodeError):
            return False
        return isinstance(meta, dict) and meta.get("codec_id") == identity.hex()

    # the newest complete run that holds it (newest first, stopping there: see ArtifactStore.newest_run)
    found = store.newest_run("compress", where=holds_it)
    return load_codec_run(store.run("compress", found.run_id).uri) if found is not None else None


def check_quality(codec: LoadedCodec, quality: int) -> int:
    """``quality`` if ``codec`` has that level.

    Raises:
        ConfigError: an option out of the model's range (exit 2, like any invalid option).
    """
    levels = codec.model.config.levels
    if not 0 <= quality < levels:
        raise ConfigError(f"--quality must be in 0..{levels - 1} for this model, got {quality}")
    return quality


def check_refine_steps(codec: LoadedCodec, refine_steps: int) -> int:
    """``refine_steps`` if ``codec`` can refine its latents that many steps.

    Raises:
        ConfigError: negative, or refinement asked of a codec that has none (exit 2).
    """
    if refine_steps < 0:
        raise ConfigError(f"--refine-steps must be >= 0, got {refine_steps}")
    if refine_steps and not codec.model.supports_refinement:
        raise ConfigError(f"--refine-steps {refine_steps}: latent refinement is implemented for the factorized "
                          f"codec only; {codec.source} is a {codec.model.kind} codec (use --refine-steps 0)")
    return refine_steps


def _encode(codec: LoadedCodec, img: np.ndarray, mode: str, quality: int, refine_steps: int = 0,
            on_step: Callable[[int, int], None] | None = None) -> tuple[bytes, torch.Tensor]:
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise InputError("empty image")
    check_refine_steps(codec, refine_steps)
    with torch.inference_mode():
        x = to_model_input(img, next(codec.model.parameters()).device)
    enc = codec.model.compress(x, quality, refine_steps, on_step)
    data = AecFile(model_id=codec.identity, quality=quality, mode=mode, width=w, height=h,
                   payload=enc["strings"][0], kind=codec.model.kind).to_bytes()
    return data, enc["latents"]


def encode_image(codec: LoadedCodec, img: np.ndarray, mode: str, quality: int, refine_steps: int = 0,
                 on_step: Callable[[int, int], None] | None = None) -> bytes:
    """One image -> the bytes of its ``.aec`` file.

    ``refine_steps > 0`` optimises the latent for this image first
    (:meth:`models.codec.ImageCodec.refine_latent`): fewer bits and higher PSNR for
    a much slower encoder; decoding and the file format are unchanged. ``on_step(done, total)``
    reports its progress.
    """
    return _encode(codec, img, mode, quality, refine_steps, on_step)[0]


def read_aec(data: bytes, name: str) -> AecFile:
    try:
        return parse(data)
    except AecFormatError as e:
        raise InputError(f"{name}: {e}") from e


def check_header(codec: LoadedCodec, f: AecFile, name: str) -> None:
    """An ``.aec`` header that ``codec`` can decode: its codec, a quality level it has.

    Raises:
        ModelMismatchError: the file was made by another model.
        InputError: its quality level does not exist in this model (corrupted).
    """
    if f.model_id != codec.identity or f.kind != codec.model.kind:
        raise ModelMismatchError(
            f"{name}: made by codec {f.model_id_hex} ({f.kind}), but the model given ({codec.source}) is "
            f"{codec.identity_hex} ({codec.model.kind})"
        )
    if f.quality >= codec.model.config.levels:
        raise InputError(f"{name}: corrupted: quality level {f.quality} does not exist in this model")


def decode_aec(codec: LoadedCodec, data: bytes, name: str) -> tuple[np.ndarray, str]:
    """The bytes of an ``.aec`` file -> (uint8 image, mode). Deterministic for a given machine.

    Raises:
        InputError: malformed, truncated or corrupted file.
        ModelMismatchError: the file was made by another model.
    """
    f = read_aec(data, name)
    check_header(codec, f, name)
    s = codec.model.stride
    shape = (-(-f.height // s), -(-f.width // s))
    try:
        with torch.inference_mode():
            x_hat = codec.model.decompress([f.payload], shape, f.quality, (f.height, f.width))
    except EntropyCodingError as e:
        raise InputError(f"{name}: corrupted payload: {e}") from e
    return from_model_output(x_hat, f.mode), f.mode


@dataclass
class CodedImage:
    """One image through the codec: real file size, quality and timings."""

    data: bytes
    decoded: np.ndarray
    bpp: float
    psnr: float
    ms_ssim: float
    encode_s: float
    decode_s: float
    estimate_bits: float

    @property
    def payload_bits(self) -> int:
        return 8 * len(parse(self.data).payload)


def code_image(codec: LoadedCodec, img: np.ndarray, mode: str, quality: int, name: str,
               refine_steps: int = 0) -> CodedImage:
    """Encode (with ``refine_steps`` of latent refinement), decode (from the bytes), and measure one image."""
    t0 = time.perf_counter()
    data, latents = _encode(codec, img, mode, quality, refine_steps)
    t1 = time.perf_counter()
    decoded, _ = decode_aec(codec, data, name)
    t2 = time.perf_counter()
    h, w = img.shape[:2]
    return CodedImage(
        data=data, decoded=decoded, bpp=8 * len(data) / (h * w), psnr=psnr(img, decoded), ms_ssim=ms_ssim(img, decoded),
        encode_s=t1 - t0, decode_s=t2 - t1, estimate_bits=codec.model.estimate_bits(latents, quality),
    )


# -- classical baselines -----------------------------------------------------------------------

JPEG_QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
WEBP_QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)


def pillow_point(img: np.ndarray, fmt: str, quality: int) -> dict[str, float]:
    """bpp (from the encoded size), PSNR and MS-SSIM of Pillow's JPEG or WebP at ``quality``.

    JPEG uses 4:2:0 chroma subsampling and optimised Huffman tables (Pillow's
    ``optimize=True``), WebP its default lossy method 4 — what a user would pick.
    """
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality, optimize=True)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown baseline format {fmt!r}")
    data = buf.getvalue()
    dec = np.asarray(Image.open(io.BytesIO(data)).convert(pil.mode))
    h, w = img.shape[:2]
    return {"bpp": 8 * len(data) / (h * w), "psnr": psnr(img, dec), "ms_ssim": ms_ssim(img, dec)}
