#!/usr/bin/env python3
"""Fill .whl/ with the wheels bench/gpu_hopper.sh needs on a GPU machine that has no network.

    python bench/carry_wheels.py [--out .whl] [--python-version 3.12]

Run where pip reaches the package index. The GPU machine has Python 3.12 with torch (CUDA), numpy 2,
transformers, tokenizers, safetensors, accelerate, Pillow, huggingface-hub and setuptools; it lacks:
  nvidia-pytriton 0.7.0  tritonserver and its Python backend (the stub for this Python version)
  diffusers 0.42.1       the pipeline (the baseline) and the networks (the leaves)
  numpy 1.26.4           for Triton's Python models only: the stub is built for numpy 1 (under numpy 2
                         its BYTES tensors come out garbled)
  torchao 0.18.0         FP8 GEMMs for the torch leaves (its compiled kernels dropped: float8 inference runs
                         on torch._scaled_mm)
  pytest 8.3.5 (+ pluggy, iniconfig)   the GPU test suite (8.3 needs no pygments)
Everything that travels to that machine, the working tree included, must stay under 64 MiB, and the
nvidia-pytriton wheel alone is 55 MB: it is rewritten here without the stubs for other Pythons and the
libpython 3.13 it bundles (a valid wheel still, its RECORD updated), which brings it near 40 MB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = ("nvidia-pytriton==0.7.0", "diffusers==0.42.1", "numpy==1.26.4", "torchao==0.18.0", "pytest==8.3.5",
          "pluggy==1.6.0", "iniconfig==2.1.0")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
BUDGET = 64 << 20  # what the device tool carries, working tree included


def slim_pytriton(wheel: Path, python_version: str) -> Path:
    """Drop from the nvidia-pytriton wheel what only other Python versions use; rewrite it in place."""
    keep_stub = f"python_backend_stubs/{python_version}/"

    def dropped(name: str) -> bool:
        if "/python_backend_stubs/" in name and keep_stub not in name:
            return True
        return name.startswith("nvidia_pytriton.libs/libpython3-")  # the 3.13 stub's own libpython

    return slim_wheel(wheel, dropped)


def slim_torchao(wheel: Path) -> Path:
    """Drop torchao's compiled CUDA extensions: FP8 inference calls torch._scaled_mm, and torchao imports
    without them (it only warns)."""
    return slim_wheel(wheel, lambda name: name.startswith("torchao/") and name.endswith(".so"))


def slim_numpy(wheel: Path) -> Path:
    """Drop numpy's own test suites (a few MiB nobody runs there)."""
    return slim_wheel(wheel, lambda name: "/tests/" in name and name.startswith("numpy/"))


def slim_wheel(wheel: Path, dropped) -> Path:
    """Rewrite `wheel` in place without the files `dropped(name)` selects, its RECORD updated."""
    with zipfile.ZipFile(wheel) as src, tempfile.NamedTemporaryFile(dir=wheel.parent, delete=False) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for info in src.infolist():
                if dropped(info.filename):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not dropped(l.split(",")[0])) + "\n").encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    Path(tmp.name).chmod(0o644)
    Path(tmp.name).replace(wheel)
    return wheel


def working_tree_bytes(root: Path, wheels: Path | None = None) -> int:
    """Tracked and untracked-not-ignored files: what the device tool sends besides the wheels (not counted
    twice when their folder is not git-ignored)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    skip = wheels.resolve() if wheels is not None else None
    files = [root / f for f in out.decode().split("\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file() and not (skip and f.resolve().is_relative_to(skip)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".whl"), help="folder for the wheels (default .whl)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = {w.split("==")[0].replace("-", "_") for w in WHEELS}
    stale = [w for w in args.out.glob("*.whl") if w.name.split("-")[0] in names]
    for w in stale:
        w.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", "-d", str(args.out)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + list(WHEELS), check=True)
    (pytriton,) = args.out.glob("nvidia_pytriton-*.whl")
    slim_pytriton(pytriton, args.python_version)
    (torchao,) = args.out.glob("torchao-*.whl")
    slim_torchao(torchao)
    (numpy,) = args.out.glob("numpy-*.whl")
    slim_numpy(numpy)
    wheels = sorted(args.out.glob("*.whl"))
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.1f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels)
    tree = working_tree_bytes(Path(__file__).resolve().parent.parent, args.out)
    print(f"{total / 2**20:7.1f} MiB  wheels, {tree / 2**20:.1f} MiB working tree, {BUDGET / 2**20:.0f} MiB allowed")
    if total + tree > BUDGET:
        print("too much to carry: the device tool would refuse it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
