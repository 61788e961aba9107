"""The container image's TensorRT install recipe, run on a CPU: the pip lines of the Dockerfile's step 1,
read from the Dockerfile with its default version, install from PyPI into a scratch folder and give
`import tensorrt` the bindings package. Without the image's libnvinfer the import stops at loading that
library, which is as far as a CPU can go; TensorRT-RTX stands in for the Builder (test_trt_rtx.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile"


def install_recipe() -> tuple[list[list[str]], str]:
    """The step-1 pip install commands, with the Dockerfile's default TensorRT version and CUDA major
    substituted for what the image's libnvinfer package would say; and that version."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (TENSORRT_\w+)=(\S+)", text, re.M))
    step = text.split("# 1. TensorRT", 1)[1].split("\n# 2.", 1)[0]
    commands = []
    for line in re.findall(r"pip install ([^;|&]+)", step):
        words = [w.replace("${cuda}", args["TENSORRT_CUDA"]).replace("${trt}", args["TENSORRT_VERSION"])
                 for w in shlex.split(line)]
        commands.append(words)
    return commands, args["TENSORRT_VERSION"]


def test_the_recipe_names_the_frontend_and_bindings_at_one_version():
    commands, version = install_recipe()
    packages = [w for c in commands for w in c if not w.startswith("-")]
    cuda = re.search(r"tensorrt-cu(\d+)", packages[0]).group(1)
    assert packages == [f"tensorrt-cu{cuda}-bindings=={version}", f"tensorrt-cu{cuda}=={version}",
                        f"tensorrt-cu{cuda}-libs=={version}"]
    assert commands[1][0] == "--no-deps"  # the frontend alone: the libraries come from the image


def test_the_recipe_installs_a_module_that_imports_as_tensorrt(tmp_path):
    commands, version = install_recipe()
    target = tmp_path / "site"
    for words in commands[:2]:  # bindings and frontend; the -libs wheel (GBs) is the image's fallback
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", str(target), *[w for w in words if w != "--no-deps"]],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 and any(s in r.stderr for s in ("No matching distribution", "Could not", "Network")):
            pytest.skip(f"PyPI not reachable from here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "tensorrt" / "__init__.py").is_file() and (target / "tensorrt_bindings").is_dir()
    probe = ("from flux2_klein.export.tensorrt.library import import_trt\n"
             "try:\n    import_trt('tensorrt')\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    # Found as `tensorrt` (the frontend) and as `tensorrt_bindings`; each stops only at the image's library.
    assert r.stdout.count("libnvinfer.so.10") == 2, r.stdout + r.stderr
    assert "tensorrt: " in r.stdout and "tensorrt_bindings: " in r.stdout
