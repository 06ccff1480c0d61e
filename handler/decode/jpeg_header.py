"""Read what the GPU decode path needs from a JPEG's header, without Pillow.

Routing a JPEG to nvJPEG needs its size, its colour components and its EXIF orientation. With
Pillow (open + getexif) that took about 50 us per photo on the handler thread, the one thread
that feeds the GPU; walking the markers directly takes a few. Anything unusual returns None and
the image takes the CPU path, where Pillow gives the precise per-image error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from handler.decode.images import EXIF_ORIENTATION

# Frame markers nvJPEG decodes: baseline, extended sequential and progressive Huffman.
_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2}
# Every other start-of-frame (lossless, hierarchical, arithmetic-coded): left to Pillow.
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int  # 1: greyscale, 3: colour (YCbCr or RGB), 4: CMYK/YCCK
    orientation: int  # EXIF orientation 1-8 (1 when absent or invalid)


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame's size and components and the EXIF orientation, or None for anything that is
    not a well-formed 8-bit Huffman-coded JPEG header."""
    if not data.startswith(b"\xff\xd8"):
        return None
    position, end = 2, len(data)
    orientation: int | None = None
    frame: tuple[int, int, int] | None = None
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        segment = data[position + 4 : position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker in _OTHER_FRAMES:
            return None
        if marker in _HUFFMAN_FRAMES:
            if frame is not None or len(segment) < 6:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            if precision != 8:  # 12-bit JPEGs: not for nvJPEG's 8-bit output; Pillow says why
                return None
            frame = (width, height, components)
        elif marker == 0xE1 and orientation is None and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment[6:])  # Pillow reads the first Exif block
        position += 2 + length
    if frame is None or frame[0] == 0 or frame[1] == 0:
        return None
    return JpegHeader(frame[0], frame[1], frame[2], orientation if orientation is not None and 1 <= orientation <= 8 else 1)


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block; 1 when absent or unreadable."""
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    try:
        (offset,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, offset)
        for entry in range(offset + 2, offset + 2 + 12 * count, 12):
            tag, kind, _count = struct.unpack_from(order + "HHI", tiff, entry)
            if tag == EXIF_ORIENTATION:
                if kind == 3:  # SHORT
                    return struct.unpack_from(order + "H", tiff, entry + 8)[0]
                if kind == 4:  # LONG
                    return struct.unpack_from(order + "I", tiff, entry + 8)[0]
                return 1
    except struct.error:
        return 1
    return 1
