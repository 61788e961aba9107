"""An edit without width and height keeps its shape: the size is the supported one nearest in aspect ratio to
the first reference (contract.size_for_reference), chosen in request validation, so the Triton model, gRPC and
HTTP users and DirectPipeline all get it. Through Triton: tests/test_openai_api.py."""

import io

import numpy as np
import pytest
from PIL import Image

from flux2_klein.contract import size_for_reference
from flux2_klein.request import parse_request
from flux2_klein.sizes import DEFAULT_SIZE, SIZES


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


def request(refs, **sizes):
    inputs = {"prompt": np.array([b"edit"], dtype=object)}
    if refs:
        inputs["reference_images"] = np.array(refs, dtype=object)
    for name, value in sizes.items():
        inputs[name] = np.array([value], dtype=np.int32)
    return parse_request(inputs)


def test_every_supported_size_maps_to_itself_and_extremes_to_the_ends():
    for size in SIZES:
        assert size_for_reference(*size) == size
        assert size_for_reference(size[0] * 3, size[1] * 3) == size  # the ratio counts, not the pixels
    assert size_for_reference(8000, 1000) == SIZES[-1] and size_for_reference(1000, 8000) == SIZES[0]
    assert size_for_reference(1, 1) == DEFAULT_SIZE


@pytest.mark.parametrize("first,want", [((1200, 800), (1248, 832)), ((800, 1200), (832, 1248)),
                                        ((640, 480), (1184, 880)), ((500, 500), (1024, 1024)),
                                        ((1920, 1080), (1392, 752))])
def test_the_first_reference_picks_the_size(first, want):
    got = request([png(*first), png(600, 1800)])  # the second one's shape does not count
    assert (got.width, got.height) == want


def test_a_given_size_or_no_reference_keeps_the_old_rules():
    assert (request([]).width, request([]).height) == DEFAULT_SIZE
    wide = png(1600, 800)
    given = request([wide], width=832, height=1248)
    assert (given.width, given.height) == (832, 1248)
    # One of the two alone: the other's default, as before (1024x1024 here), not the reference's shape.
    one = request([wide], width=1024)
    assert (one.width, one.height) == (1024, 1024)
