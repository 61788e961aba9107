"""The Triton models' clean environment (flux2_klein/model_env.py): whatever else a machine has installed, the
models see only what they import. On our GPU machine scikit-learn (imported by transformers when present,
and importing a scipy built for numpy 2) made every model fail to load beside the stub's numpy 1.x."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flux2_klein.model_env import MODEL_DISTRIBUTIONS, make_model_env, requirement_closure


def _poison(root: Path) -> Path:
    """A machine's extra package that breaks on import, with the metadata that makes it look installed."""
    site = root / "poison"
    (site / "sklearn").mkdir(parents=True)
    (site / "sklearn" / "__init__.py").write_text('raise ImportError("poisoned: built for another numpy")\n')
    info = site / "scikit_learn-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scikit-learn\nVersion: 9.9\n")
    (info / "RECORD").write_text("sklearn/__init__.py,,\nscikit_learn-9.9.dist-info/METADATA,,\n"
                                 "scikit_learn-9.9.dist-info/RECORD,,\n")
    return site


PROBE = """
import importlib.util, sys
import numpy, torch, diffusers, transformers, tokenizers, PIL
import flux2_klein.model_repository, flux2_klein.sampler_io, flux2_klein.torch_runtime, flux2_klein.request
from transformers.utils import is_sklearn_available
from transformers import Qwen3ForCausalLM
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
hidden = [m for m in ("sklearn", "scipy", "fastapi", "matplotlib", "modelopt", "onnx", "tritonclient")
          if importlib.util.find_spec(m) is not None]
print(numpy.__version__, is_sklearn_available(), hidden)
"""


def test_models_see_only_their_closure_and_the_first_folders(tmp_path):
    poison = _poison(tmp_path)
    first = tmp_path / "first"
    (first / "numpy").mkdir(parents=True)  # what --stub-site brings: numpy 1.x first (here a stand-in)
    (first / "numpy" / "__init__.py").write_text("__version__ = 'first'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")])}

    # The machine as it is: the poison is importable, and transformers believes scikit-learn is there.
    r = subprocess.run([sys.executable, "-c", "from transformers.utils import is_sklearn_available as a; "
                        "print(a()); import sklearn"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.stdout.split()[:1] == ["True"] and "poisoned" in r.stderr

    # The models' environment made on that machine: built by a process that sees the poison too.
    make = f"from flux2_klein.model_env import make_model_env; print(make_model_env({str(tmp_path / 'env')!r}))"
    r = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    python = Path(r.stdout.strip())
    # As the stub runs it: isolated (-I: no PYTHONPATH), from a folder that is no checkout.
    r = subprocess.run([str(python), "-I", "-c", PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    version, sklearn, hidden = r.stdout.strip().split(" ", 2)
    assert sklearn == "False" and hidden == "[]"

    # A `first` folder wins over the machine's copy of the same package.
    python = make_model_env(tmp_path / "env2", [first])
    r = subprocess.run([str(python), "-I", "-c", "import numpy; print(numpy.__path__[0])"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == str(first / "numpy")


def test_the_closure_follows_requirements_with_their_markers():
    found = requirement_closure(MODEL_DISTRIBUTIONS)
    assert {"torch", "numpy", "diffusers", "transformers", "tokenizers", "safetensors", "pillow",
            "huggingface-hub"} <= set(found)
    assert {"filelock", "pyyaml", "regex"} <= set(found)  # what they in turn require
    # Extras stay out: transformers' [sklearn], [serving] and the like; and nothing of the gateway's.
    assert not {"scikit-learn", "scipy", "fastapi", "uvicorn", "matplotlib", "nvidia-modelopt"} & set(found)
