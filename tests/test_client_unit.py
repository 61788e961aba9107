"""The client library and `flux2-klein generate`, without Triton: request tensors, image files, errors.

tritonclient runs for real throughout; what needs a server answering is in test_serving.py, against a real
tritonserver.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from flux2_klein.client import generate as gen
from flux2_klein.client.images import EXTENSIONS, image_format, read_reference, save_image
from flux2_klein.client.triton_client import (
    Flux2KleinClient,
    GenerationError,
    build_inputs,
    default_url,
    to_generation_error,
)
from flux2_klein.contract import input_arrays
from flux2_klein.server import free_port

# An encoded "file" that ends in NUL bytes (and holds some inside): an 'S' numpy array would lose the tail.
NUL_TAILED = b"\x89PNG\r\n\x1a\n\x00payload\x00\x00\x00"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux2-klein")
    sub = p.add_subparsers(dest="command", required=True)
    gen.add_generate_parser(sub)
    return p


def _gradient(h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# --size and the generate parser
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1024x1024", (1024, 1024)), ("672x1568", (672, 1568)), ("1568X672", (1568, 672)), (" 944 x 1104 ", (944, 1104)),
])
def test_parse_size(text, expected):
    assert gen.parse_size(text) == expected


@pytest.mark.parametrize("text", ["1024", "1024x", "x1024", "axb", "1024*1024", "1024x1024x3", "0x1024", "-16x16", ""])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        gen.parse_size(text)


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["generate", "--prompt", "p", "--size", "big", "--out", "x.png"])
    assert e.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_generate_parser_defaults_leave_everything_to_the_server():
    args = _parser().parse_args(["generate", "--prompt", "a fox", "--out", "fox.png"])
    assert args.func is gen.run_generate
    assert (args.prompt, args.out, args.protocol) == ("a fox", "fox.png", "grpc")
    assert args.size is args.seed is args.steps is args.guidance is args.url is None
    assert args.reference == []


def test_generate_parser_all_options():
    args = _parser().parse_args([
        "generate", "--prompt", "p", "--size", "1248x832", "--seed", "7", "--steps", "8", "--guidance", "3.5",
        "--reference", "a.png", "--reference", "b.jpg", "--url", "h:9", "--protocol", "http", "--out", "o.webp",
    ])
    assert args.size == (1248, 832) and args.seed == 7 and args.steps == 8 and args.guidance == 3.5
    assert args.reference == ["a.png", "b.jpg"] and args.url == "h:9" and args.protocol == "http"


@pytest.mark.parametrize("argv", [
    ["generate", "--out", "o.png"],                                          # no prompt
    ["generate", "--prompt", "p"],                                          # no out
    ["generate", "--prompt", "p", "--out", "o.png", "--protocol", "ftp"],
    ["generate", "--prompt", "p", "--out", "o.png", "--steps", "four"],
])
def test_generate_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2


def test_default_urls():
    assert default_url("grpc") == "localhost:8001"
    assert default_url("http") == "localhost:8000"
    with pytest.raises(ValueError, match="grpc, http"):
        default_url("ftp")


# ---------------------------------------------------------------------------------------------------------------
# Request tensors
# ---------------------------------------------------------------------------------------------------------------

CONTRACT_TYPES = {
    "prompt": ("BYTES", [1]), "height": ("INT32", [1]), "width": ("INT32", [1]), "seed": ("INT64", [1]),
    "num_inference_steps": ("INT32", [1]), "guidance_scale": ("FP32", [1]), "reference_images": ("BYTES", [2]),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_build_inputs_types_and_shapes(protocol):
    inputs = build_inputs("a fox", width=1248, height=832, seed=2**40, steps=8, guidance=3.5,
                          references=[b"first", NUL_TAILED], protocol=protocol)
    got = {i.name(): (i.datatype(), list(i.shape())) for i in inputs}
    assert got == CONTRACT_TYPES


def test_input_arrays_values_and_dtypes():
    arrays = input_arrays("un renard, 狐", width=1248, height=832, seed=2**40, steps=8, guidance=3.5,
                          references=[NUL_TAILED])
    expected_dtypes = {"prompt": np.object_, "height": np.int32, "width": np.int32, "seed": np.int64,
                       "num_inference_steps": np.int32, "guidance_scale": np.float32, "reference_images": np.object_}
    assert {k: v[1].dtype.type for k, v in arrays.items()} == expected_dtypes
    assert arrays["prompt"][1][0] == "un renard, 狐".encode("utf-8")
    assert arrays["width"][1].tolist() == [1248] and arrays["height"][1].tolist() == [832]
    assert arrays["seed"][1].tolist() == [2**40]
    assert arrays["num_inference_steps"][1].tolist() == [8]
    assert arrays["guidance_scale"][1].tolist() == [3.5]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_omitted_optionals_are_not_sent(protocol):
    inputs = build_inputs("a fox", protocol=protocol)
    assert [(i.name(), i.datatype(), list(i.shape())) for i in inputs] == [("prompt", "BYTES", [1])]
    # each optional alone adds exactly its own input; an empty reference list adds none
    assert [i.name() for i in build_inputs("p", seed=0, references=[], protocol=protocol)] == ["prompt", "seed"]
    assert [i.name() for i in build_inputs("p", width=1024, protocol=protocol)] == ["prompt", "width"]
    assert [i.name() for i in build_inputs("p", guidance=0.0, protocol=protocol)] == ["prompt", "guidance_scale"]


def test_references_are_object_arrays_keeping_trailing_nuls(tmp_path):
    from tritonclient.utils import deserialize_bytes_tensor

    path = tmp_path / "ref.png"
    path.write_bytes(NUL_TAILED)
    refs = [NUL_TAILED, bytearray(b"\x00\x00"), path, str(path)]
    datatype, array = input_arrays("p", references=refs)["reference_images"]
    assert datatype == "BYTES" and array.dtype == np.object_ and array.shape == (4,)
    assert list(array) == [NUL_TAILED, b"\x00\x00", NUL_TAILED, NUL_TAILED]
    # what tritonclient serialises for the wire keeps them too
    (grpc_ref,) = [i for i in build_inputs("p", references=refs, protocol="grpc") if i.name() == "reference_images"]
    assert list(deserialize_bytes_tensor(grpc_ref._get_content())) == list(array)
    (http_ref,) = [i for i in build_inputs("p", references=refs, protocol="http") if i.name() == "reference_images"]
    assert list(deserialize_bytes_tensor(http_ref._get_binary_data())) == list(array)


def test_bad_values_fail_before_sending():
    with pytest.raises(TypeError):
        input_arrays("p", steps=4.5)
    with pytest.raises(TypeError):
        input_arrays(b"bytes prompt")
    with pytest.raises(ValueError, match="INT64"):
        input_arrays("p", seed=2**63)
    with pytest.raises(ValueError, match="INT32"):
        input_arrays("p", width=2**31)
    with pytest.raises(TypeError, match="reference"):
        input_arrays("p", references=[123])
    with pytest.raises(FileNotFoundError):
        input_arrays("p", references=["/nonexistent/ref.png"])


# ---------------------------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt,tolerance", [
    ("out.png", "PNG", 0), ("out.PNG", "PNG", 0), ("out.jpg", "JPEG", 6), ("out.jpeg", "JPEG", 6), ("out.webp", "WEBP", 6),
])
def test_save_image_round_trip(tmp_path, name, fmt, tolerance):
    image = _gradient()
    path = save_image(image, tmp_path / "sub" / name)
    assert path == tmp_path / "sub" / name
    with Image.open(path) as im:
        assert im.format == fmt and im.mode == "RGB" and im.size == (64, 48)
        back = np.asarray(im)
    diff = np.abs(back.astype(int) - image.astype(int))
    assert diff.mean() <= tolerance / 3 and (tolerance > 0 or diff.max() == 0)


@pytest.mark.parametrize("name", ["out.gif", "out.bmp", "out.tiff", "out", "out.png.txt"])
def test_save_image_rejects_other_extensions(tmp_path, name):
    with pytest.raises(ValueError) as e:
        save_image(_gradient(), tmp_path / name)
    for ext in EXTENSIONS:
        assert ext in str(e.value)
    assert not (tmp_path / name).exists()


def test_save_image_rejects_non_rgb_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_image(_gradient().astype(np.float32), tmp_path / "o.png")
    with pytest.raises(ValueError, match="uint8"):
        save_image(_gradient()[..., :1], tmp_path / "o.png")


def test_image_format_and_read_reference(tmp_path):
    assert [image_format(f"x{e}") for e in (".png", ".jpg", ".JPEG", ".webp")] == ["PNG", "JPEG", "JPEG", "WEBP"]
    path = tmp_path / "ref.bin"
    path.write_bytes(NUL_TAILED)
    assert read_reference(path) == NUL_TAILED
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_reference(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,status", [
    ("StatusCode.INVALID_ARGUMENT", "INVALID_ARGUMENT"), ("400", "INVALID_ARGUMENT"),
    ("StatusCode.INTERNAL", "INTERNAL"), ("500", "INTERNAL"), ("StatusCode.NOT_FOUND", "NOT_FOUND"),
    ("404", "NOT_FOUND"), ("418", "HTTP_418"),
])
def test_error_status_mapping(raw, status):
    from tritonclient.utils import InferenceServerException

    err = to_generation_error(InferenceServerException("width must be one of ...", status=raw), "h:1", "grpc")
    assert isinstance(err, GenerationError) and err.status == status
    assert err.invalid_argument == (status == "INVALID_ARGUMENT")
    assert "width must be one of" in err.message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_port_gives_a_clear_error(protocol):
    url = f"localhost:{free_port()}"
    with Flux2KleinClient(url, protocol=protocol, timeout_s=10) as client:
        assert client.is_ready() is False
        with pytest.raises(GenerationError) as e:
            client.generate("a fox")
        assert e.value.status == "UNAVAILABLE" and not e.value.invalid_argument
        assert url in e.value.message and "cannot reach" in e.value.message
        with pytest.raises(GenerationError, match=url):
            client.statistics()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_run_generate_closed_port_exits_1(tmp_path, capsys, protocol):
    url = f"127.0.0.1:{free_port()}"
    args = _parser().parse_args(["generate", "--prompt", "p", "--url", url, "--protocol", protocol,
                                 "--out", str(tmp_path / "o.png"), "--wait", "0"])
    assert args.func(args) == 1
    assert url in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_run_generate_local_mistakes_exit_2_without_a_server(tmp_path, capsys):
    url = f"127.0.0.1:{free_port()}"  # never contacted: the checks come first
    args = _parser().parse_args(["generate", "--prompt", "p", "--url", url, "--out", str(tmp_path / "o.gif")])
    assert args.func(args) == 2
    assert ".png" in capsys.readouterr().err
    args = _parser().parse_args(["generate", "--prompt", "p", "--url", url, "--reference", str(tmp_path / "no.png"),
                                 "--out", str(tmp_path / "o.png")])
    assert args.func(args) == 2
    assert "no.png" in capsys.readouterr().err


def test_client_arguments():
    with pytest.raises(ValueError, match="protocol"):
        Flux2KleinClient(protocol="ftp")
    with pytest.raises(ValueError, match="timeout"):
        Flux2KleinClient(timeout_s=0)
    client = Flux2KleinClient()
    client.close()
    client.close()  # idempotent
    with pytest.raises(GenerationError, match="closed"):
        client.generate("p")
