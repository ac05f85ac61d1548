"""The ``.aec`` container: one learned-codec bitstream per file.

Layout (little-endian). Version 1 (the factorized codec, kind ``codec``: the files every
aeflow has written, still written byte for byte the same)::

    offset size  field
    0      4     magic  b"\\x89AEC"
    4      1     format version (1)
    5      8     model identity: first 8 bytes of SHA-256 of the codec's config and tensors
    13     1     quality level (0 = lowest rate)
    14     1     image mode: 1 = L (grayscale), 3 = RGB
    15     4     width  (uint32)
    19     4     height (uint32)
    23     4     payload length in bytes (uint32)
    27     n     payload: the range coder's 32-bit words
    27+n   4     CRC-32 of every byte before it

Version 2 (every other model kind) adds one byte after the version, the model kind
(:data:`KINDS`: 1 = ``hyperprior``), and shifts the rest by one: 32 bytes of overhead
instead of 31. The kind lets a reader say which kind of codec a file needs before it
has the model; the identity still binds the file to one model.

The CRC turns any corruption into a clear error instead of garbage pixels; the length
field tells a truncated file from a corrupted one. Pure Python (struct, zlib): no torch
needed to read a header.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89AEC"
VERSION = 1  # the factorized codec's version (kept: older readers read those files)
VERSIONS = (1, 2)
# Model kinds (as saved in a model's config.json) and their version-2 codes.
KINDS = {"codec": 0, "hyperprior": 1}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
_HEADER = struct.Struct("<4sB8sBBIII")
_HEADER_V2 = struct.Struct("<4sBB8sBBIII")
HEADER_SIZE = _HEADER.size
OVERHEAD = HEADER_SIZE + 4  # of a version-1 file; AecFile.overhead for any file
MODES = {"L": 1, "RGB": 3}
_MODE_NAMES = {v: k for k, v in MODES.items()}
MAX_SIDE = 1 << 16
# A crafted header must not make the decoder allocate gigabytes before failing. No file aeflow writes
# exceeds these: its image loader refuses more pixels than Pillow's decompression-bomb limit, and
# real payloads carry far more than a byte per 65536 pixels (about 290 px/byte on a flat image).
MAX_PIXELS = 89_478_485
MAX_PIXELS_PER_PAYLOAD_BYTE = 1 << 16


class AecFormatError(ValueError):
    """A file is not a valid ``.aec`` bitstream; the message says why."""


@dataclass(frozen=True)
class AecFile:
    """A parsed ``.aec`` file. ``kind`` is the model kind that made it (``codec``: version 1)."""

    model_id: bytes
    quality: int
    mode: str
    width: int
    height: int
    payload: bytes
    kind: str = "codec"

    @property
    def version(self) -> int:
        return 1 if self.kind == "codec" else 2

    @property
    def overhead(self) -> int:
        """Header and checksum bytes of this file."""
        return (HEADER_SIZE if self.version == 1 else _HEADER_V2.size) + 4

    def to_bytes(self) -> bytes:
        if len(self.model_id) != 8:
            raise ValueError(f"model id must be 8 bytes, got {len(self.model_id)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if not (0 < self.width <= MAX_SIDE and 0 < self.height <= MAX_SIDE):
            raise ValueError(f"image size {self.width}x{self.height} is out of range")
        fields = (self.model_id, self.quality, MODES[self.mode], self.width, self.height, len(self.payload))
        if self.version == 1:
            head = _HEADER.pack(MAGIC, 1, *fields)
        else:
            head = _HEADER_V2.pack(MAGIC, self.version, KINDS[self.kind], *fields)
        body = head + self.payload
        return body + struct.pack("<I", zlib.crc32(body))

    @property
    def model_id_hex(self) -> str:
        return self.model_id.hex()


def check_declared_size(width: int, height: int, payload_bytes: int) -> None:
    """Refuse a header whose image is too large to decode, or too large for its payload, before any allocation.

    Raises:
        AecFormatError: more than :data:`MAX_PIXELS` pixels, or more than
            :data:`MAX_PIXELS_PER_PAYLOAD_BYTE` pixels per payload byte.
    """
    pixels = width * height
    if pixels > MAX_PIXELS:
        raise AecFormatError(
            f"the header declares a {width}x{height} image ({pixels:,} pixels), more than the {MAX_PIXELS:,} "
            "this decoder accepts"
        )
    if pixels > MAX_PIXELS_PER_PAYLOAD_BYTE * max(payload_bytes, 1):
        raise AecFormatError(
            f"corrupted: the header declares a {width}x{height} image but carries only {payload_bytes} payload "
            "bytes, far too few for it"
        )


def parse(data: bytes) -> AecFile:
    """Parse and check a ``.aec`` file's bytes (format version 1 or 2).

    Raises:
        AecFormatError: wrong magic, unsupported version, truncated, trailing bytes,
            checksum mismatch or an impossible header.
    """
    if not data:
        raise AecFormatError("empty file (0 bytes), not an .aec file")
    if len(data) < 4 or data[:4] != MAGIC:
        raise AecFormatError("not an .aec file (wrong magic bytes)")
    if len(data) < 5:
        raise AecFormatError("truncated: the header is incomplete")
    version = data[4]
    if version not in VERSIONS:
        raise AecFormatError(f"unsupported .aec format version {version} (this aeflow reads versions "
                             f"{', '.join(map(str, VERSIONS))})")
    header = _HEADER if version == 1 else _HEADER_V2
    if len(data) < header.size:
        raise AecFormatError(f"truncated: {len(data)} bytes, the header alone is {header.size}")
    if version == 1:
        _, _, model_id, quality, mode, width, height, n = header.unpack_from(data)
        kind_code = KINDS["codec"]
    else:
        _, _, kind_code, model_id, quality, mode, width, height, n = header.unpack_from(data)
    expected = header.size + n + 4
    if len(data) < expected:
        raise AecFormatError(f"truncated: {len(data)} bytes, the header says {expected}")
    if len(data) > expected:
        raise AecFormatError(f"corrupted: {len(data) - expected} unexpected bytes after the payload")
    (crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(data[: expected - 4]) != crc:
        raise AecFormatError("corrupted: checksum mismatch")
    if mode not in _MODE_NAMES:
        raise AecFormatError(f"corrupted: unknown image mode code {mode}")
    if version == 2 and (kind_code not in _KIND_NAMES or kind_code == KINDS["codec"]):
        raise AecFormatError(f"unknown model kind code {kind_code} (this aeflow knows {sorted(KINDS)})")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise AecFormatError(f"corrupted: impossible image size {width}x{height}")
    check_declared_size(width, height, n)
    return AecFile(model_id=model_id, quality=quality, mode=_MODE_NAMES[mode], width=width, height=height,
                   payload=data[header.size : expected - 4], kind=_KIND_NAMES[kind_code])
