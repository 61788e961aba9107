"""Shared fixtures: one tiny checkpoint of each kind per test session, made once and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two CPU cores in CI: let torch and ONNX Runtime use both without oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A distilled (4-step) tiny checkpoint."""
    from flux2_klein.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, distilled=True)


@pytest.fixture(scope="session")
def tiny_base_ckpt(tmp_path_factory) -> Path:
    """An undistilled ("base") tiny checkpoint: classifier-free guidance with an empty negative prompt."""
    from flux2_klein.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-base", seed=1, distilled=False)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    """diffusers' own pipeline on the tiny checkpoint: the oracle."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def onnx_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """All four networks of the tiny checkpoint exported to ONNX (fp32), once per session."""
    from flux2_klein.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_ckpt, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def ort_session():
    """ONNX Runtime sessions, one per graph path, shared by every test."""
    import onnxruntime as ort

    cache = {}

    def get(path):
        path = str(path)
        if path not in cache:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            cache[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return cache[path]

    return get
