"""client/codecs.py, the gateway's and the client's image encoders: PNG holds the array bit for bit (every one of the
17 sizes, every filter), decoded by Pillow and, where installed, a second decoder; JPEG and WebP within 0.5 dB PSNR
of Pillow's defaults at the same quality; the samples of a request encode on the bounded pool, off the event loop.
Speed is bench/image_codecs.py's business, not a test's."""

import asyncio
import io
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from flux2_klein.client import codecs
from flux2_klein.client.gateway.responses import encode_image, encode_image_async
from flux2_klein.sizes import SIZES


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth areas, hard edges and noise: every PNG filter and byte value gets exercised, wrap-around too."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx ^ yy) & 255], -1)
    x = x + rng.integers(0, 256, x.shape) * (rng.random((height, width, 1)) < 0.2)
    return (x % 256).astype(np.uint8)


def pillow(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_png_is_the_array_bit_for_bit_at_every_size(width, height):
    rgb = picture(width, height, seed=width)
    data = codecs.encode(rgb, "png")
    image = pillow(data)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height)
    assert np.array_equal(np.asarray(image), rgb)
    assert encode_image(rgb, "png") == data  # the gateway's encoder is this one


@pytest.mark.parametrize("kind", sorted(codecs.PNG_FILTERS))
@pytest.mark.parametrize("strategy", codecs.PNG_STRATEGIES)
def test_every_png_filter_and_strategy_round_trips(kind, strategy):
    rgb = picture(67, 41, seed=len(kind))  # odd sizes: row ends and the first row/column matter
    data = codecs.encode_png(rgb, filter=kind, strategy=strategy)
    assert np.array_equal(np.asarray(pillow(data)), rgb)


def test_png_chunks_are_well_formed():
    """Signature, IHDR (8-bit RGB, no interlace), one IDAT, IEND, each with its CRC: strict readers check them."""
    rgb = picture(33, 17)
    data = codecs.encode(rgb, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        if kind == b"IHDR":
            assert body == (33).to_bytes(4, "big") + (17).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
        if kind == b"IDAT":
            raw = zlib.decompress(body)
            assert len(raw) == 17 * (1 + 33 * 3)
        pos += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_png_with_a_second_decoder():
    cv2 = pytest.importorskip("cv2", reason="OpenCV, a second PNG decoder (libpng), is not installed")
    rgb = picture(1024, 1024, seed=5)
    back = cv2.imdecode(np.frombuffer(codecs.encode(rgb, "png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back[..., ::-1], rgb)


def smooth(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    x = np.stack([60 + 150 * xx / width, 80 + 120 * yy / height, 128 + 60 * np.sin(xx / 17 + yy / 29)], -1)
    x += np.random.default_rng(1).normal(0, 3, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt,pillow_options", [
    ("jpeg", {"format": "JPEG"}), ("webp", {"format": "WEBP", "lossless": False}),
])
@pytest.mark.parametrize("quality", [95, 75, 40])
def test_lossy_quality_is_within_half_a_db_of_pillows_default(fmt, pillow_options, quality):
    """Today's encoder was Pillow at its defaults (WebP: method 4) and the same quality setting."""
    rgb = smooth(512, 384)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, quality=quality, **pillow_options)
    before = psnr(np.asarray(pillow(buf.getvalue()).convert("RGB")), rgb)
    data = codecs.encode(rgb, fmt, quality)
    image = pillow(data)
    assert image.format == fmt.upper() and image.size == (512, 384)
    assert psnr(np.asarray(image.convert("RGB")), rgb) >= before - 0.5
    assert encode_image(rgb, fmt, quality) == data


@pytest.mark.parametrize("quality", [100, 95, 75, 40, 5])
def test_jpeg_is_the_file_pillow_writes_at_that_quality(quality):
    """imagecodecs' libjpeg-turbo with Pillow's settings: the switch changed the speed, not one byte."""
    rgb = smooth(320, 200)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    assert codecs.encode(rgb, "jpeg", quality) == buf.getvalue()


def test_default_quality_is_95():
    rgb = smooth(64, 48)
    assert codecs.encode(rgb, "jpeg") == codecs.encode(rgb, "jpeg", 95)
    assert codecs.encode(rgb, "webp", None) == codecs.encode(rgb, "webp", 95)


def test_bad_input_names_what_is_allowed():
    with pytest.raises(ValueError, match="png, jpeg, webp"):
        codecs.encode(smooth(8, 8), "gif")
    with pytest.raises(ValueError, match=r"uint8 \[height, width, 3\]"):
        codecs.encode(np.zeros((8, 8, 4), np.uint8), "png")
    with pytest.raises(ValueError, match=r"uint8 \[height, width, 3\]"):
        codecs.encode(np.zeros((8, 8, 3), np.float32), "jpeg")
    with pytest.raises(ValueError, match="paeth"):
        codecs.encode_png(smooth(8, 8), filter="best")


def test_samples_encode_on_the_bounded_pool_off_the_event_loop():
    """Four images of one request: each on one of the pool's threads (one per core), none on the loop's thread,
    as many at once as the pool has threads (the first ones wait for each other: serial encoding would hang
    them until the barrier's timeout)."""
    width = min(4, codecs._cores())
    barrier = threading.Barrier(width, timeout=20)
    names = []
    lock = threading.Lock()
    real = codecs.encode

    def spy(rgb, fmt, quality=None):
        with lock:
            names.append(threading.current_thread().name)
            first = len(names) <= width
        if first:
            barrier.wait()  # BrokenBarrierError unless `width` encodes are in flight together
        return real(rgb, fmt, quality)

    images = [picture(640, 480, seed=i) for i in range(4)]

    async def request():
        loop_thread = threading.current_thread().name
        out = await asyncio.gather(*(encode_image_async(x, "png") for x in images))
        return loop_thread, out

    codecs.encode = spy
    try:
        loop_thread, out = asyncio.run(request())
    finally:
        codecs.encode = real
    assert [np.array_equal(np.asarray(pillow(d)), x) for d, x in zip(out, images)] == [True] * 4
    assert len(names) == 4 and loop_thread not in names
    assert all(n.startswith("encode") for n in names)
    assert codecs.ENCODE_POOL._max_workers == codecs._cores()


def test_the_answers_json_carries_the_files_as_base64():
    """The /v1/infer and OpenAI answers are written with the images' base64 put straight into the body: the same
    JSON as json.dumps would give, every other value escaped as JSON escapes it."""
    import base64
    import json

    from flux2_klein.client.gateway.responses import Base64, ImagesResponse, images_json

    files = [codecs.encode(picture(40, 30, seed=i), "png") for i in range(2)]
    value = {"created": 1, "data": [{"b64_json": Base64(f), "revised_prompt": None, "seed": 2**40 + i}
                                    for i, f in enumerate(files)],
             "size": "40x30", "note": 'quote " backslash \\ é \u2028', "ok": True, "ratio": 0.5}
    body = images_json(value)
    decoded = json.loads(body)
    assert [base64.b64decode(d["b64_json"], validate=True) for d in decoded["data"]] == files
    plain = {**value, "data": [{**d, "b64_json": base64.b64encode(f).decode()} for d, f in zip(value["data"], files)]}
    assert decoded == json.loads(json.dumps(plain))
    response = ImagesResponse(value)
    assert response.body == body and response.media_type == "application/json"
    with pytest.raises(ValueError):
        images_json({"x": float("nan")})  # not JSON
