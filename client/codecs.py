"""Encoding generated images (PNG, JPEG, WebP): the one home of the gateway's and the client's encoders.

Chosen from bench/image_codecs.py's side-by-side measurement (bench/results/2026-12-02-image-codecs.md):

* PNG: this module's writer. The rows are filtered with numpy (one PNG filter type for the whole image, "sub":
  each byte minus the one 3 to its left, one numpy subtraction), then deflated by zlib-ng (the `zlib-ng`
  package) with its Z_RLE strategy: the fpnge-class trade, a fixed cheap filter and run lengths plus Huffman
  codes instead of a search for matches: 5-23x faster than Pillow's default (by image) at 0.94-1.14x its
  size. Pillow's writer spends much of its time choosing a filter for each row (its compress_level 0, which
  compresses nothing, still takes a quarter of its default's time), so no Pillow setting is fast;
  Z_HUFFMAN_ONLY is a little faster but 16x Pillow's size on flat areas, zlib-ng's level 1 twice it on smooth
  ones. The file is an ordinary 8-bit
  RGB PNG and holds the array bit for bit (tests/test_codecs.py: every one of the 17 sizes, two decoders).
* JPEG: imagecodecs' libjpeg-turbo, 4:2:0: byte for byte the file Pillow writes at the same quality, in
  about three quarters of Pillow's time (the same libjpeg-turbo; the difference is Pillow's work
  around it).
* WebP: Pillow's libwebp, lossy, method 4 (its default). Methods 0-2 are 1.7-2.4x faster but lose 0.9-1.2 dB
  PSNR at the same quality on smooth images, past the 0.5 dB this project allows; WebP stays slow on a CPU.

Each encoder releases the GIL for its heavy part (numpy's ufuncs, zlib-ng's deflate, libjpeg-turbo and libwebp
behind imagecodecs and Pillow; the benchmark checks it), so the images of one request encode in parallel on
`ENCODE_POOL`, a pool of one thread per core.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FORMATS = ("png", "jpeg", "webp")
DEFAULT_QUALITY = 95  # JPEG and WebP, when the request names none
WEBP_METHOD = 4  # libwebp's speed/quality trade-off, 0 (fastest) .. 6; 4 is Pillow's default

PNG_FILTERS = {"none": 0, "sub": 1, "up": 2, "avg": 3, "paeth": 4}  # PNG filter types (PNG spec, 9.2)
PNG_STRATEGIES = ("rle", "huffman", "default", "filtered")
PNG_FILTER, PNG_STRATEGY, PNG_LEVEL = "sub", "rle", 1
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# One thread per core: more would only take turns on the same cores. Bounded and dedicated, so a burst of
# encodes never takes the default executor's threads (asyncio.to_thread) from everything else in the process.
ENCODE_POOL = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="encode")


def _chunk(kind: bytes, data) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + bytes(data) + struct.pack(">I", crc)


def _filtered(rgb: np.ndarray, kind: str) -> np.ndarray:
    """The PNG scanlines of an RGB uint8 image (bit depth 8, 3 bytes per pixel): one filter-type byte, then the
    row filtered by `kind` (PNG spec 9.2; bytes left of the row and above the first row count as 0)."""
    if kind not in PNG_FILTERS:
        raise ValueError(f"PNG filter {kind!r}: expected one of {', '.join(PNG_FILTERS)}")
    height, width, _ = rgb.shape
    raw = rgb.reshape(height, width * 3)
    out = np.empty((height, width * 3 + 1), dtype=np.uint8)
    out[:, 0] = PNG_FILTERS[kind]
    row = out[:, 1:]
    if kind == "none":
        row[...] = raw
    elif kind == "sub":
        row[:, :3] = raw[:, :3]
        np.subtract(raw[:, 3:], raw[:, :-3], out=row[:, 3:])
    elif kind == "up":
        row[0] = raw[0]
        np.subtract(raw[1:], raw[:-1], out=row[1:])
    else:
        left = np.zeros_like(raw)
        left[:, 3:] = raw[:, :-3]
        above = np.zeros_like(raw)
        above[1:] = raw[:-1]
        if kind == "avg":
            predictor = ((left.astype(np.uint16) + above) >> 1).astype(np.uint8)
        elif kind == "paeth":
            corner = np.zeros_like(raw)
            corner[1:, 3:] = raw[:-1, :-3]
            a, b, c = (x.astype(np.int16) for x in (left, above, corner))
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, corner))
        np.subtract(raw, predictor, out=row)
    return out


def encode_png(rgb: np.ndarray, *, filter: str = PNG_FILTER, strategy: str = PNG_STRATEGY,
               level: int = PNG_LEVEL) -> bytes:
    """A lossless PNG of an RGB uint8 [height, width, 3] image. The options are the benchmark's knobs; the
    defaults are its choice."""
    from zlib_ng import zlib_ng

    rgb = _rgb(rgb)
    height, width, _ = rgb.shape
    strategies = {"rle": zlib_ng.Z_RLE, "huffman": zlib_ng.Z_HUFFMAN_ONLY, "default": zlib_ng.Z_DEFAULT_STRATEGY,
                  "filtered": zlib_ng.Z_FILTERED}
    if strategy not in strategies:
        raise ValueError(f"PNG strategy {strategy!r}: expected one of {', '.join(PNG_STRATEGIES)}")
    # Compress.compress releases the GIL around zng_deflate (pycompression/python-zlib-ng,
    # src/zlib_ng/zlib_ngmodule.c, zlib_Compress_compress_impl); the one-shot zlib_ng.compress takes no strategy.
    compressor = zlib_ng.compressobj(level, zlib_ng.DEFLATED, zlib_ng.MAX_WBITS, 9, strategies[strategy])
    scanlines = _filtered(rgb, filter)
    idat = compressor.compress(memoryview(scanlines).cast("B")) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def encode_jpeg(rgb: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """JPEG through imagecodecs' libjpeg-turbo, 4:2:0 chroma: the same bytes as Pillow's at this quality."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(_rgb(rgb), level=quality, subsampling="420")


def encode_webp(rgb: np.ndarray, quality: int = DEFAULT_QUALITY, method: int = WEBP_METHOD) -> bytes:
    """Lossy WebP through Pillow's libwebp."""
    return _pillow(rgb, "WEBP", lossless=False, quality=quality, method=method)


def encode(rgb: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """`fmt` ("png", "jpeg", "webp") of an RGB uint8 image; quality (JPEG/WebP; default 95) is ignored by PNG."""
    if fmt == "png":
        return encode_png(rgb)
    quality = DEFAULT_QUALITY if quality is None else quality
    if fmt == "jpeg":
        return encode_jpeg(rgb, quality)
    if fmt == "webp":
        return encode_webp(rgb, quality)
    raise ValueError(f"image format {fmt!r}: expected one of {', '.join(FORMATS)}")


async def encode_async(rgb: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """`encode` on ENCODE_POOL, off the event loop: the images of one request encode side by side."""
    return await asyncio.get_running_loop().run_in_executor(ENCODE_POOL, encode, rgb, fmt, quality)


def decode(data: bytes) -> np.ndarray:
    """An encoded image (any format Pillow reads) as RGB uint8 [height, width, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _rgb(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image as uint8 [height, width, 3]; got {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)


def _pillow(rgb: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_rgb(rgb)).save(buf, format=fmt, **options)
    return buf.getvalue()
