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


# Sources whose change changes what a build writes: configs, glue, graphs, engines (an image with other
# code must not serve a repository an older one wrote). Anything else (the gateway, the CLI, the container package)
# can change without invalidating a cache.
CODE_FILES = ("repository.py", "specs.py", "triton_config.py", "sizes.py", "triton_tensors.py", "contract.py",
              "tensorrt_build.py")
CODE_PACKAGES = ("flux2_klein.export", "flux2_klein.model_repository")


def code_fingerprint() -> str:
    from .. import __version__

    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).parents[1]  # flux2_klein/
    files = [(f"flux2_klein/{name}", here / name) for name in CODE_FILES]
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)  # finds without importing (export imports torch)
        for location in (spec.submodule_search_locations or []) if spec else []:
            # .py and data alike (FP8 calibration prompts shape the engines too)
            files += [(f"{package}/{p.name}", p) for p in sorted(Path(location).iterdir())
                      if p.is_file() and p.suffix not in (".pyc", ".pyo")]
    for rel, path in sorted(files):
        if path.is_file():
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

