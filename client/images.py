"""Writing generated images and reading reference images.

The output format follows the file's extension (case-insensitive):
  .png          PNG, lossless: the file holds exactly the array the server sent.
  .jpg, .jpeg   JPEG, quality 95 (4:2:0 chroma subsampling, Pillow's default at that quality).
  .webp         WebP, lossy, quality 95.
Anything else is a ValueError that names these extensions, raised before a file is touched. The encoders are
the gateway's (client/codecs.py, which says why these).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flux2_klein.contract import read_reference  # its home: the contract says files go as they are

# extension -> (the format's Pillow name, its name in client/codecs.py)
FORMATS: dict[str, tuple[str, str]] = {
    ".png": ("PNG", "png"),
    ".jpg": ("JPEG", "jpeg"),
    ".jpeg": ("JPEG", "jpeg"),
    ".webp": ("WEBP", "webp"),
}
EXTENSIONS = tuple(FORMATS)


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format ("PNG", "JPEG", "WEBP") that `save_image` writes for this path's extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the image format of {str(path)!r} from its extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(EXTENSIONS)}"
        )
    return FORMATS[suffix][0]


def save_image(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB image, numpy uint8 [height, width, 3], to `path` in the format its extension names
    (see the module's docstring). Missing parent folders are created. Returns the path."""
    from . import codecs

    path = Path(path)
    image_format(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image as uint8 [height, width, 3]; got {array.dtype} {list(array.shape)}")
    data = codecs.encode(array, FORMATS[path.suffix.lower()][1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


__all__ = ["save_image", "read_reference", "image_format", "EXTENSIONS", "FORMATS"]
