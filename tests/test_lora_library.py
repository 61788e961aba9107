"""The LoRA library (flux2_klein/lora_library.py) without a server: its files checked by name at build time, the
`loras` wire form, the builds that cannot serve it refused by name before any work, and the DiT's adapters: a
set active equals diffusers' load_lora_weights + set_adapters, none active the plain transformer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import LORA_LIBRARY
from flux2_klein.lora import LoraError
from flux2_klein.lora_library import (
    MAX_PER_REQUEST, Adapters, Library, format_choice, parse_choice, scan, served_names,
)
from flux2_klein.request import InvalidInput, parse_request


@pytest.fixture
def folder(lora_folder, tmp_path):
    """A copy of the library to spoil."""
    copy = tmp_path / "library"
    shutil.copytree(lora_folder, copy)
    return copy


def test_a_library_lists_its_files_by_name_with_their_hashes(lora_folder, tiny_ckpt):
    library = scan(lora_folder, tiny_ckpt)
    assert library.names == tuple(sorted(LORA_LIBRARY))
    assert all(f.path == lora_folder / f"{f.name}.safetensors" and len(f.sha256) == 64 for f in library.files)
    assert Library.from_json(library.to_json()) == library
    assert served_names({"lora_names": '["a", "b"]'}) == ("a", "b") and served_names({}) == ()


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))


def test_bad_files_are_refused_by_name(folder, tiny_ckpt):
    from diffusers import Flux2Transformer2DModel

    inner = Flux2Transformer2DModel.load_config(tiny_ckpt / "transformer")["num_attention_heads"] * \
        Flux2Transformer2DModel.load_config(tiny_ckpt / "transformer")["attention_head_dim"]
    q = "transformer.transformer_blocks.0.attn.to_q"
    cases = {
        "notes.txt": (lambda p: p.write_text("hi"), "only <name>.safetensors LoRA files belong"),
        "old.bin": (lambda p: p.write_bytes(b"x"), "pickled weights are not loaded"),
        "broken.safetensors": (lambda p: p.write_bytes(b"not safetensors"), "not a LoRA file diffusers' Flux2 loader reads"),
        "weights.safetensors": (lambda p: _save(p, {"transformer_blocks.0.attn.to_q.weight": (inner, inner)}),
                                "not a LoRA or LoKr file"),
        "te.safetensors": (lambda p: _save(p, {"text_encoder.layers.0.q_proj.lora_A.weight": (4, 8)}),
                           "transformer only"),
        "other.safetensors": (lambda p: _save(p, {"transformer.no_such_block.to_q.lora_A.weight": (4, inner),
                                                  "transformer.no_such_block.to_q.lora_B.weight": (inner, 4)}),
                              "not in this checkpoint's transformer"),
        "big.safetensors": (lambda p: _save(p, {f"{q}.lora_A.weight": (4, 3072), f"{q}.lora_B.weight": (inner, 4)}),
                            "a LoRA for another model"),
        "Style.safetensors": (lambda p: shutil.copy(folder / "style.safetensors", p), "clashes with"),
        "flux2_klein.safetensors": (lambda p: shutil.copy(folder / "style.safetensors", p), "the served model's own name"),
        "two words.safetensors": (lambda p: shutil.copy(folder / "style.safetensors", p), "cannot name a LoRA"),
    }
    for name, (make, says) in cases.items():
        bad = folder / name
        make(bad)
        with pytest.raises(LoraError) as e:
            scan(folder, tiny_ckpt)
        assert str(bad) in str(e.value) and says in str(e.value), (name, str(e.value))
        bad.unlink()
    scan(folder, tiny_ckpt)  # and clean again
    with pytest.raises(LoraError, match="holds no"):
        scan(_empty(folder), tiny_ckpt)
    with pytest.raises(LoraError, match="is not a folder"):
        scan(folder / "style.safetensors", tiny_ckpt)


def _empty(folder):
    empty = folder.parent / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("ignored")
    return empty


def test_the_wire_form():
    assert parse_choice("style:0.8, detail ,") == (("style", 0.8), ("detail", 1.0))
    assert parse_choice("") == () and parse_choice(" , ") == ()
    assert parse_choice("ink.v2:-1.5", ("ink.v2",)) == (("ink.v2", -1.5),)
    for text, says in (("a:x", "not a number"), ("a:nan", "outside"), ("a:inf", "outside"), ("a:8.5", "outside"),
                       ("a,a:0.5", "named twice"), ("a b", "not a LoRA name"), (":1", "not a LoRA name"),
                       (",".join("abcde"), f"at most {MAX_PER_REQUEST}")):
        with pytest.raises(ValueError, match=says):
            parse_choice(text)
    with pytest.raises(ValueError, match="'c' is not in this server's LoRA library; served: a, b"):
        parse_choice("a,c", ("a", "b"))
    for choice in ("a:0.5,b", {"a": 0.5, "b": 1}, [("a", 0.5), "b"]):
        assert parse_choice(format_choice(choice)) == (("a", 0.5), ("b", 1.0))


def _loras(text):
    return {"prompt": np.array([b"p"], dtype=np.object_), "loras": np.array([text], dtype=np.object_)}


def test_a_request_names_loras_of_the_served_library_only():
    assert parse_request(_loras(b"style:0.5"), lora_names=("style",)).loras == (("style", 0.5),)
    assert parse_request(_loras(b""), lora_names=()).loras == ()  # "" is none, served or not
    assert parse_request({"prompt": np.array([b"p"], dtype=np.object_)}).loras == ()
    for value, names, says in ((b"style", (), "not served by this repository: it was built without a LoRA library"),
                               (b"sketch", ("style",), "'sketch' is not in this server's LoRA library"),
                               (b"\xff", ("style",), "not UTF-8"), (b"x" * 5000, ("style",), "at most 4096")):
        with pytest.raises(InvalidInput) as e:
            parse_request(_loras(value), lora_names=names)
        assert e.value.field == "loras" and says in str(e.value), str(e.value)
    with pytest.raises(InvalidInput, match="loras: expected BYTES"):
        parse_request({"prompt": np.array([b"p"], dtype=np.object_), "loras": np.array([1], np.int32)},
                      lora_names=("style",))


def test_builds_that_cannot_serve_a_library_are_refused_by_name_before_any_work(lora_folder, folder, tiny_ckpt,
                                                                                tmp_path):
    from flux2_klein.repository import BuildOptions, build_repository

    for kwargs, says in ((dict(runtime="onnxruntime"), "torch runtime only"),
                         (dict(runtime="tensorrt"), "torch runtime only"),
                         (dict(runtime="torch", compile=True), "not with torch.compile"),
                         (dict(runtime="torch", device="gpu", precision="fp8"), "not with FP8")):
        with pytest.raises(ValueError, match=f"lora_library: .*{says}"):
            BuildOptions(lora_library=lora_folder, **kwargs).resolved()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(LoraError, match="notes.txt"):
        build_repository(tiny_ckpt, tmp_path / "repo", runtime="torch", device="cpu", lora_library=folder)
    assert not (tmp_path / "repo").exists()


def test_the_cli_reads_the_library_from_its_variable(lora_folder, tiny_ckpt, tmp_path, monkeypatch):
    import json

    from flux2_klein.cli import main

    monkeypatch.setenv("FLUX2_KLEIN_LORA_LIBRARY", str(lora_folder))
    assert main(["build", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "repo"), "--runtime", "torch"]) == 0
    build = json.loads((tmp_path / "repo" / "build.json").read_text())
    assert [x["name"] for x in build["lora_library"]["loras"]] == sorted(LORA_LIBRARY)
    assert '"lora_names"' in (tmp_path / "repo" / "preprocess" / "config.pbtxt").read_text()
    assert 'name: "loras"' in (tmp_path / "repo" / "transformer" / "config.pbtxt").read_text()


def _dit(transformer, seed=0):
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 64, cfg.in_channels, generator=g),
                           encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                           timestep=torch.tensor([0.5]), img_ids=torch.zeros(64, 4), txt_ids=torch.zeros(8, 4),
                           return_dict=False)[0]


def test_adapters_switch_between_diffusers_sets_and_the_plain_transformer(lora_folder, tiny_ckpt):
    from diffusers import Flux2Transformer2DModel

    load = lambda: Flux2Transformer2DModel.from_pretrained(tiny_ckpt / "transformer")  # noqa: E731
    plain = _dit(load())
    transformer = load()
    adapters = Adapters(transformer, scan(lora_folder, tiny_ckpt))
    assert torch.equal(_dit(transformer), plain)  # loaded, none active: the plain numbers
    oracle = load()
    oracle.load_lora_adapter(str(lora_folder / "style.safetensors"), adapter_name="s", prefix="transformer")
    oracle.load_lora_adapter(str(lora_folder / "ink.v2.safetensors"), adapter_name="i", prefix="transformer")
    oracle.set_adapters(["s", "i"], weights=[0.8, -0.5])
    adapters.activate(parse_choice("style:0.8,ink.v2:-0.5", adapters.names))
    got = _dit(transformer)
    assert (got - _dit(oracle)).abs().max() < 1e-5 and (got - plain).abs().max() > 1e-2
    adapters.activate(())
    assert torch.equal(_dit(transformer), plain)
    with pytest.raises(ValueError, match="'sketch' is not loaded here"):
        adapters.activate((("sketch", 1.0),))
