"""The ``.aec`` container: one learned-codec bitstream per file.

Layout (little-endian)::

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

31 bytes of overhead. The CRC turns any corruption into a clear error instead of
garbage pixels; the length field tells a truncated file from a corrupted one.
Pure Python (struct, zlib): no torch needed to read a header.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\x89AEC"
VERSION = 1
_HEADER = struct.Struct("<4sB8sBBIII")
HEADER_SIZE = _HEADER.size
OVERHEAD = HEADER_SIZE + 4
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
    """A parsed ``.aec`` file."""

    model_id: bytes
    quality: int
    mode: str
    width: int
    height: int
    payload: bytes
    version: int = VERSION

    def to_bytes(self) -> bytes:
        if len(self.model_id) != 8:
            raise ValueError(f"model id must be 8 bytes, got {len(self.model_id)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if not (0 < self.width <= MAX_SIDE and 0 < self.height <= MAX_SIDE):
            raise ValueError(f"image size {self.width}x{self.height} is out of range")
        head = _HEADER.pack(MAGIC, self.version, self.model_id, self.quality, MODES[self.mode],
                            self.width, self.height, len(self.payload))
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
    """Parse and check a ``.aec`` file's bytes.

    Raises:
        AecFormatError: wrong magic, unsupported version, truncated, trailing bytes,
            checksum mismatch or an impossible header.
    """
    if len(data) < 4 or data[:4] != MAGIC:
        raise AecFormatError("not an .aec file (wrong magic bytes)")
    if len(data) < 5:
        raise AecFormatError("truncated: the header is incomplete")
    if data[4] != VERSION:
        raise AecFormatError(f"unsupported .aec format version {data[4]} (this aeflow reads version {VERSION})")
    if len(data) < HEADER_SIZE:
        raise AecFormatError(f"truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, model_id, quality, mode, width, height, n = _HEADER.unpack_from(data)
    expected = HEADER_SIZE + n + 4
    if len(data) < expected:
        raise AecFormatError(f"truncated: {len(data)} bytes, the header says {expected}")
    if len(data) > expected:
        raise AecFormatError(f"corrupted: {len(data) - expected} unexpected bytes after the payload")
    (crc,) = struct.unpack_from("<I", data, expected - 4)
    if zlib.crc32(data[: expected - 4]) != crc:
        raise AecFormatError("corrupted: checksum mismatch")
    if mode not in _MODE_NAMES:
        raise AecFormatError(f"corrupted: unknown image mode code {mode}")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise AecFormatError(f"corrupted: impossible image size {width}x{height}")
    check_declared_size(width, height, n)
    return AecFile(model_id=model_id, quality=quality, mode=_MODE_NAMES[mode], width=width, height=height,
                   payload=data[HEADER_SIZE : expected - 4], version=version)
