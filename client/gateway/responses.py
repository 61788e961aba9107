"""The answer's images, for every API: encoded off the event loop (the client's encoders, client/codecs.py),
and written as base64 straight into a 200 JSON body (`ImagesResponse`)."""

from __future__ import annotations

import base64
import json

from starlette.responses import Response

from .. import codecs


def encode_image(array, fmt: str, quality: int | None = None) -> bytes:
    """PNG (lossless), or JPEG/WebP at `quality` (default: the client's, 95); PNG ignores quality. The encoders
    are the client's (client/codecs.py)."""
    return codecs.encode(array, fmt, quality)


async def encode_image_async(array, fmt: str, quality: int | None = None) -> bytes:
    """`encode_image` off the event loop, on the codecs' pool of one thread per core: the samples of a request
    encode side by side, and a burst of encodes cannot take the default executor's threads."""
    return await codecs.encode_async(array, fmt, quality)


class Base64:
    """A file to answer as a base64 JSON string, written by `images_json` straight into the body's bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def images_json(value) -> bytes:
    """`value` (dicts, lists, JSON scalars and Base64 files) as compact JSON bytes. Each image goes in as
    base64.b64encode's bytes, copied once, into the one join at the end: json.dumps would scan and copy each
    3-4 MB string of a 1 MP PNG again (Starlette's JSONResponse, ensure_ascii=False: about 35 ms per image on a
    small CPU, more than encoding it; this: the base64 itself, about 5 ms)."""
    parts: list[bytes] = []
    _json_parts(value, parts)
    return b"".join(parts)


def _json_parts(value, parts: list[bytes]) -> None:
    if isinstance(value, Base64):
        parts += (b'"', base64.b64encode(value.data), b'"')
    elif isinstance(value, dict):
        parts.append(b"{")
        for i, (k, v) in enumerate(value.items()):
            parts.append((b"," if i else b"") + json.dumps(str(k)).encode() + b":")
            _json_parts(v, parts)
        parts.append(b"}")
    elif isinstance(value, (list, tuple)):
        parts.append(b"[")
        for i, v in enumerate(value):
            if i:
                parts.append(b",")
            _json_parts(v, parts)
        parts.append(b"]")
    else:
        parts.append(json.dumps(value, allow_nan=False).encode())


class ImagesResponse(Response):
    """A 200 JSON answer with images (see images_json)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return images_json(content)
