"""The marker walk against Pillow on many kinds of JPEG: same size, components and orientation."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from handler.decode.jpeg_header import read_jpeg_header
from helpers import encode

COMPONENTS = {"L": 1, "RGB": 3, "CMYK": 4}


def pillow_view(data: bytes):
    """(width, height, components, orientation) as Pillow reads them, or None if it cannot."""
    try:
        image = Image.open(io.BytesIO(data))
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:
        return None
    return image.width, image.height, COMPONENTS[image.mode], orientation if 1 <= orientation <= 8 else 1


def ours(data: bytes):
    header = read_jpeg_header(data)
    return None if header is None else (header.width, header.height, header.components, header.orientation)


def photo(mode: str = "RGB", size=(37, 23)) -> Image.Image:
    values = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values).convert(mode)


def big_endian_exif(orientation: int, kind: int = 3) -> bytes:
    """A Motorola-order EXIF block (Pillow writes Intel order) with one orientation entry."""
    value = struct.pack(">HH", orientation, 0) if kind == 3 else struct.pack(">I", orientation)
    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, kind, 1) + value + struct.pack(">I", 0)
    return b"MM\x00*" + struct.pack(">I", 8) + ifd


def variants() -> dict[str, bytes]:
    cases: dict[str, bytes] = {}
    for mode in ("RGB", "L", "CMYK"):
        cases[mode] = encode(photo(mode), "JPEG")
    cases["progressive"] = encode(photo(), "JPEG", progressive=True)
    cases["optimized-q30"] = encode(photo(size=(640, 480)), "JPEG", optimize=True, quality=30)
    cases["subsampling-444"] = encode(photo(), "JPEG", subsampling=0)
    cases["restart-markers"] = encode(photo(size=(200, 120)), "JPEG", restart_marker_blocks=2)
    cases["icc-profile"] = encode(photo(), "JPEG", icc_profile=b"\x00" * 3000)
    cases["comment"] = encode(photo(), "JPEG", comment=b"made by a test")
    for orientation in range(0, 10):
        exif = Image.Exif()
        exif[0x0112] = orientation
        exif[0x010F] = "maker"  # another tag before it in the IFD
        cases[f"exif-{orientation}"] = encode(photo(), "JPEG", exif=exif)
    for orientation, kind in ((6, 3), (8, 3), (3, 4)):
        cases[f"exif-MM-{orientation}-type{kind}"] = encode(photo(), "JPEG",
                                                            exif=b"Exif\x00\x00" + big_endian_exif(orientation, kind))
    cases["exif-garbage"] = encode(photo(), "JPEG", exif=b"Exif\x00\x00" + b"XX" + b"\x00" * 30)
    base = encode(photo(), "JPEG")
    cases["fill-bytes"] = base[:2] + b"\xff\xff" + base[2:]
    cases["truncated-header"] = base[:60]
    cases["png"] = encode(photo(), "PNG")
    cases["empty"] = b""
    cases["soi-only"] = b"\xff\xd8"
    return cases


@pytest.mark.parametrize("name", list(variants()))
def test_header_matches_pillow(name):
    data = variants()[name]
    want, got = pillow_view(data), ours(data)
    if name in ("png", "empty", "soi-only", "truncated-header"):
        assert got is None
    else:
        assert want is not None and got == want


def test_a_garbled_frame_is_refused_not_misread():
    data = bytearray(encode(photo(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 2 : sof + 4] = b"\x00\x01"  # segment length below its own size field
    assert read_jpeg_header(bytes(data)) is None


def test_arithmetic_and_lossless_frames_go_to_the_cpu():
    data = bytearray(encode(photo(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    for marker in (0xC3, 0xC9):
        data[sof + 1] = marker
        assert read_jpeg_header(bytes(data)) is None


def test_a_12_bit_frame_goes_to_the_cpu():
    data = bytearray(encode(photo(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    assert read_jpeg_header(bytes(data)) is not None
    data[sof + 4] = 12  # sample precision
    assert read_jpeg_header(bytes(data)) is None
