"""The profile key: what a built repository depends on (the target, the precision and runtime, a
fingerprint of the checkpoint and one of the code that writes repositories), as a readable folder name."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator, Mapping

from ..lora import fingerprint as lora_fingerprint
from ..target import Target
from .settings import Settings

KEY_SCHEMA = 1  # bump when the meaning of a profile component changes
SMALL_FILE_BYTES = 4 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20  # larger ones: the first and the last MiB (after a safetensors header, whole)


def _visible_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file below root, sorted, skipping dot-files and dot-folders:
    huggingface_hub's `.cache/` download metadata (timestamps), `.git`, Kubernetes' `..data` links."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return iter(sorted(found))


def checkpoint_fingerprint(root: str | Path) -> str:
    """SHA-256 over the checkpoint's file names, sizes and contents, reading at most ~2 MiB per large file.

    Files up to 4 MiB (configs, tokenizer, index files) are hashed whole. A larger file (the weights)
    contributes its size, its safetensors header (every tensor's name, dtype, shape and offsets) and its
    first and last MiB. No mtimes: the same checkpoint copied to another volume or node gets new ones,
    which would make replicas sharing one engine cache rebuild for nothing, while `cp -p` and rsync keep
    old mtimes on new content. What this cannot see: weights edited in place in the middle of a file with
    the same size and header (a partial fine-tune saved over the original); set FLUX2_KLEIN_CHECKPOINT_REVISION
    (or FLUX2_KLEIN_REBUILD=1) for those. Reading 16 GB on every start to be exact was the alternative.
    """
    root = Path(root)
    h = hashlib.sha256()
    for rel, path in _visible_files(root):
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SMALL_FILE_BYTES:
                h.update(hashlib.sha256(f.read()).digest())
                continue
            if rel.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                if 0 < n <= min(size - 8, 256 << 20):
                    h.update(hashlib.sha256(f.read(n)).digest())
            f.seek(0)
            h.update(hashlib.sha256(f.read(SAMPLE_BYTES)).digest())
            f.seek(size - SAMPLE_BYTES)
            h.update(hashlib.sha256(f.read(SAMPLE_BYTES)).digest())
    return h.hexdigest()


# The code fingerprint hashes whole folders, never a list of files that can go stale (issue 19.8: a list
# left out guardrail/repository.py, which writes into the repository): every file of the installed package
# and its subpackages (.py, the shipped configs/*.json, the guardrail's blocklist, the calibration prompts),
# wherever it lies, except these subpackages, which neither write into a repository nor run inside Triton:
# the HTTP gateway, benchmark and client (`client/`) and this entrypoint (`container/`). Anything else that
# changes (a new module included) rebuilds on the next start: an image with other code must not serve a
# repository an older one wrote, and a needless rebuild costs time, never correctness.
PACKAGE = "flux2_klein"
CODE_EXCLUDED = ("client", "container")


def _package_files(folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    """(`prefix/relative path`, path) of every file below `folder`, minus byte code, caches and dot-files."""
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.is_file() and path.suffix not in (".pyc", ".pyo") \
                and not any(p == "__pycache__" or p.startswith(".") for p in parts):
            yield f"{prefix}/{'/'.join(parts)}", path


def code_files(package_dir: Path | None = None) -> list[tuple[str, Path]]:
    """What code_fingerprint hashes, as (name inside the package, path): the same names for a wheel, an
    editable install and a raw checkout, so each gives the same key for the same code. `package_dir`:
    another copy of the package folder, its subpackages beside it as in a checkout (tests)."""
    from .. import CHECKOUT_SUBPACKAGES

    here = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    roots = {"": here}
    for name in CHECKOUT_SUBPACKAGES:
        if name in CODE_EXCLUDED or (here / name).is_dir():
            continue  # left out, or inside the package folder (a wheel), where the walk finds it
        if package_dir is not None:
            roots[name] = here.parent / name
        else:  # a checkout: wherever the import system finds it (without importing: export imports torch)
            spec = importlib.util.find_spec(f"{PACKAGE}.{name}")
            roots.update({name: Path(loc) for loc in (spec.submodule_search_locations or [])[:1]} if spec else {})
    files = {}
    for sub, folder in roots.items():
        for rel, path in _package_files(folder, f"{PACKAGE}/{sub}".rstrip("/")):
            if rel.split("/")[1] not in CODE_EXCLUDED:
                files[rel] = path
    return sorted(files.items())


def code_fingerprint(package_dir: Path | None = None) -> str:
    from .. import __version__

    h = hashlib.sha256(__version__.encode())
    for rel, path in code_files(package_dir):
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def profile_components(settings: Settings, target: Target, checkpoint_hash: str, code_hash: str) -> dict:
    return {
        "schema": KEY_SCHEMA,
        "gpu": target.gpu,
        "compute_capability": target.compute_capability,
        "tensorrt": target.tensorrt,
        "precision": settings.precision,
        "runtime": settings.runtime,
        "checkpoint": checkpoint_hash,
        "checkpoint_revision": settings.checkpoint_revision,
        "code": code_hash,
        # A changed LoRA or guardrail is another repository (the guardrail is written into it, and its
        # classifiers load with the models).
        "loras": lora_fingerprint(list(settings.loras)),
        # (As JSON keeps it: the stored components are compared with these to tell a stale repository.)
        "guardrail": json.loads(json.dumps(settings.guardrail.to_dict())) if settings.guardrail is not None else None,
    }


def profile_key(components: Mapping) -> str:
    """`<runtime>-<precision>-<arch>-<16 hex digits>`: readable in a listing of the cache, the digest over
    every component (the readable part is for people deleting old profiles, not for identity)."""
    blob = json.dumps(dict(components), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    cc = str(components.get("compute_capability", "none"))
    arch = "sm" + cc.replace(".", "") if cc.replace(".", "").isdigit() else "cpu"
    return f"{components.get('runtime')}-{components.get('precision')}-{arch}-{digest}"

