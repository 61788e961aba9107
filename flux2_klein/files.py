"""A file's SHA-256, streamed: the one hash that ties exported graphs (export/onnx_export.py's model.json) and
TensorRT engines (export/tensorrt/build.py's metadata) to the bytes on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
