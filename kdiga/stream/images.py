"""Encoded image files as shards store them: checked cheaply, or shrunk and re-encoded.

A JPEG is checked by walking its marker segments (no decoding); other formats must open with
PIL, a PNG's chunks must pass their checksums. Errors are :class:`kdiga.shards.ShardError`
naming the file.
"""

from __future__ import annotations

import io

from PIL import Image

from kdiga.shards import ShardError

#: JPEG quality of the images that ``resize_short`` re-encodes.
JPEG_QUALITY = 90
#: The image extensions a shard sample may have -> the one stored ("jpeg" is stored as "jpg").
IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}
#: PIL's format name -> the extension stored; other formats are re-encoded or refused.
PIL_EXTS = {"JPEG": "jpg", "PNG": "png"}

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, walking its marker segments to the scan."""
    pos, size = 2, None
    while True:
        while data[pos : pos + 2] == b"\xff\xff":  # fill bytes
            pos += 1
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ShardError(f"{name}: not a decodable image (no JPEG marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise ShardError(f"{name}: JPEG is truncated (segment at byte {pos} runs past its end)")
        if marker in _SOF_MARKERS and length >= 8:
            size = (
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
            )
        elif marker == 0xDA:
            if size is None:
                raise ShardError(
                    f"{name}: not a decodable image (JPEG scan without a frame header)"
                )
            return size
        elif marker == 0xD9:
            raise ShardError(f"{name}: not a decodable image (JPEG ends before its scan)")
        pos += 2 + length


def probe(data: bytes, name: str) -> tuple[str, int, int]:
    """(PIL format, width, height) of an encoded image, checked cheaply (raises ShardError).

    A JPEG's marker segments must be whole up to its scan, with a frame header giving the
    size, and an end-of-image marker must follow the last scan (neither marker can occur in
    the entropy-coded data, so a truncated JPEG fails). Other formats must open with PIL; a
    PNG's chunks must pass their checksums up to IEND.
    """
    if data[:3] == b"\xff\xd8\xff":
        fmt, (width, height) = "JPEG", _jpeg_size(data, name)
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ShardError(f"{name}: JPEG is truncated (no end-of-image marker after its scan)")
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format or "?", img.size
                if fmt == "PNG":
                    img.verify()
        except Exception as err:  # PIL raises many types on bad bytes
            raise ShardError(
                f"{name}: not a decodable image ({type(err).__name__}: {err})"
            ) from err
    if width < 1 or height < 1:
        raise ShardError(f"{name}: image of size {width}x{height}")
    return fmt, width, height


def _reencode(data: bytes, name: str, short: int) -> bytes:
    """Decode, shrink so the short side is at most ``short`` (bicubic), encode as JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as err:
        raise ShardError(f"{name}: not a decodable image ({type(err).__name__}: {err})") from err
    width, height = rgb.size
    if min(width, height) > short:  # torchvision's Resize(int) sizes: the long side truncated
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return buf.getvalue()


def prepare(data: bytes, name: str, resize_short: int | None) -> tuple[bytes, str]:
    """(bytes, ext) to store for one image file: its own bytes, or a shrunk JPEG."""
    fmt, width, height = probe(data, name)
    ext = PIL_EXTS.get(fmt)
    if resize_short is not None and (ext is None or min(width, height) > resize_short):
        return _reencode(data, name, resize_short), "jpg"
    if ext is None:
        raise ShardError(
            f"{name}: a {fmt} image; shards store JPEG and PNG files as they are: convert it, "
            "or pass resize_short to re-encode it as JPEG"
        )
    return data, ext
