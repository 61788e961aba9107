"""A clean Python environment for the Triton Python models: only what they import, and what that needs.

Triton's Python-backend stub embeds CPython and takes its packages from the first `python3` on PATH. On a
machine with a system Python full of unrelated packages, whatever those packages drag in is imported too:
transformers imports scikit-learn when it can, scikit-learn imports scipy, and a scipy built for numpy 2
fails beside the numpy 1.x that the stub needs - so every model failed to load on our GPU machine. Hiding
packages one by one (scipy, then scikit-learn, ...) only moves the failure to the next machine. Instead the
models get a venv whose site folder links exactly the distributions in the requirement closure of
MODEL_DISTRIBUTIONS (markers evaluated, extras ignored), preceded by `first` folders (e.g. numpy 1.x
installed with `pip --target`). Anything else installed on the machine does not exist for them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Iterable, Sequence

from packaging.requirements import InvalidRequirement, Requirement

# What the Triton models of a repository import (preprocess, sampler, the torch and ONNX Runtime leaves),
# by distribution name; absent optional ones (onnxruntime on a GPU box, torchao on a CPU) are skipped.
# This project itself is linked without its own requirements (the gateway's, the bench's are not needed).
PROJECT = "flux2-klein-triton"
MODEL_DISTRIBUTIONS = ("torch", "numpy", "diffusers", "transformers", "tokenizers", "safetensors", "pillow",
                       "huggingface-hub", "onnxruntime", "torchao")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(name: str, path: Sequence[str] | None = None) -> metadata.Distribution | None:
    found = metadata.distributions(name=name) if path is None else metadata.distributions(name=name, path=list(path))
    for dist in found:
        return dist
    return None


def requirement_closure(roots: Iterable[str], path: Sequence[str] | None = None) -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from `roots` through their unconditional requirements."""
    found: dict[str, metadata.Distribution] = {}
    stack = [_canonical(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        dist = _distribution(name, path)
        if dist is None:
            continue  # an optional root, or a requirement this machine satisfies some other way
        found[name] = dist
        for line in dist.requires or ():
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # extras and other platforms
            stack.append(_canonical(req.name))
    return found


def top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The files and folders a distribution put directly into its site folder (packages, modules, .pth
    files, its dist-info), as absolute paths."""
    base = Path(dist.locate_file("")).resolve()
    entries: set[Path] = set()
    for f in dist.files or ():
        parts = Path(f).parts
        if not parts or parts[0] in ("..", "/") or parts[0].startswith("__pycache__"):
            continue  # scripts in bin/, headers, data files outside the site folder
        entries.add(base / parts[0])
    if not entries:  # no RECORD (some distro-packaged distributions): top_level.txt names the modules
        for name in (dist.read_text("top_level.txt") or "").split():
            for candidate in (base / name, base / f"{name}.py"):
                if candidate.exists():
                    entries.add(candidate)
    info = getattr(dist, "_path", None)  # the .dist-info folder: metadata.version() must find it
    if info is not None:
        entries.add(Path(info).resolve())
    return {e for e in entries if e.exists()}


def _link(src: Path, dst: Path) -> None:
    """Link src at dst; a folder that two distributions share (a namespace package such as nvidia/) becomes a
    real folder of links to both sides' children."""
    if not (dst.exists() or dst.is_symlink()):
        dst.symlink_to(src)
        return
    if dst.is_symlink() and dst.resolve() == src.resolve():
        return
    if not (src.is_dir() and dst.is_dir()):
        return  # a plain file both claim: the first distribution's wins
    if dst.is_symlink():
        previous = dst.resolve()
        dst.unlink()
        dst.mkdir()
        for child in previous.iterdir():
            (dst / child.name).symlink_to(child)
    for child in src.iterdir():
        _link(child, dst / child.name)


def project_entries() -> set[Path]:
    """This project's own importable files, without its requirements: from its installed distribution, or,
    for a copy on PYTHONPATH with no metadata, the folder `flux2_klein` is imported from."""
    dist = _distribution(PROJECT, [p for p in sys.path if p not in ("", ".", os.getcwd())])
    if dist is not None and dist.files:
        return top_level_entries(dist)
    spec = importlib.util.find_spec("flux2_klein")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("flux2_klein: not importable here, so the Triton models could not import it")
    return {Path(next(iter(spec.submodule_search_locations))).resolve()}


def make_model_env(target: Path, first: Sequence[Path] = (), roots: Sequence[str] = MODEL_DISTRIBUTIONS) -> Path:
    """Create (anew) at `target` a venv for the Triton Python models; return its python3.

    Its site folder holds links to the closure of `roots` and this project; `first` folders come before
    it on sys.path. Put the returned interpreter's folder first on tritonserver's PATH.
    """
    target = Path(target).resolve()
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(target)
    python = target / "bin" / "python3"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    site_dir = target / "models-site"
    site_dir.mkdir()
    search = [p for p in sys.path if p not in ("", ".", os.getcwd())]  # never the checkout's raw folders
    # What a `first` folder provides is taken from there alone (numpy 1.x, not the machine's numpy 2).
    provided = {_canonical(d.metadata["Name"]) for d in metadata.distributions(path=[str(f) for f in first])}
    entries = set(project_entries())
    for name, dist in requirement_closure(roots, search).items():
        if name not in provided:
            entries |= top_level_entries(dist)
    for entry in sorted(entries):
        _link(entry, site_dir / entry.name)
    chain = [str(Path(d).resolve()) for d in first] + [str(site_dir)]
    (purelib / "zz_flux2_klein_models.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in chain) + "\n")
    return python
