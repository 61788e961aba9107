"""A `perf_analyzer` binary that runs here, and the environment it needs.

tritonclient's manylinux wheels carried `perf_analyzer` up to 2.51; the newer ones need glibc 2.38,
more than Debian 12 has. The Python library stays whatever the project pins (2.73); the binary comes
from a separately downloaded 2.51 wheel, unpacked into a cache folder and never installed as a package:

    python -m flux2_klein.client.perf_analyzer --install     # download, unpack, check it runs
    python -m flux2_klein.client.perf_analyzer               # where it is (exit 1 and why, if nowhere)

What the 2.51 binary links against beyond glibc: libb64.so.0d (Debian: `apt-get install libb64-0d`)
and libcudart.so.12 (`pip install nvidia-cuda-runtime-cu12`; found through LD_LIBRARY_PATH, which
`find_perf_analyzer` sets). It needs no GPU: the CUDA runtime is only loaded.

Where it looks, in order: $PERF_ANALYZER; the cache folder (`cache_dir()`: <venv>/share/perf_analyzer
inside a virtualenv, else $XDG_CACHE_HOME/flux2-klein/perf_analyzer); `perf_analyzer` on PATH (the NGC
SDK container has a working one). Each candidate must answer `--version`; one that does not is skipped
and the reason kept for the error.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# The newest tritonclient wheel whose perf_analyzer runs on glibc 2.36 (Debian 12); 2.44..2.51 all do.
WHEEL_VERSION = "2.51.0"
_WHEEL_PLATFORMS = {"x86_64": "manylinux1_x86_64", "aarch64": "manylinux2014_aarch64"}
_MEMBER = re.compile(r"^tritonclient-[^/]+\.data/data/bin/perf_analyzer$")


class PerfAnalyzerUnavailable(RuntimeError):
    """No working perf_analyzer; str() says precisely why and what to install."""


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str] = field(default_factory=dict)  # the full environment to run it with
    version: str = ""

    def command(self, *args: str) -> list[str]:
        return [str(self.binary), *args]


def cache_dir() -> Path:
    """<venv>/share/perf_analyzer inside a virtualenv, else $XDG_CACHE_HOME/flux2-klein/perf_analyzer."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "share" / "perf_analyzer"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flux2-klein" / "perf_analyzer"


def cached_binary(version: str = WHEEL_VERSION) -> Path:
    return cache_dir() / version / "perf_analyzer"


def cuda_runtime_lib_dir() -> Path | None:
    """The folder of libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, if it is installed."""
    try:
        import nvidia.cuda_runtime as cudart
    except ImportError:
        return None
    for root in getattr(cudart, "__path__", []):
        lib = Path(root) / "lib"
        if any(lib.glob("libcudart.so.12*")):
            return lib
    return None


def runtime_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the CUDA runtime wheel's lib folder prepended to LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    lib = cuda_runtime_lib_dir()
    if lib is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        if str(lib) not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib), *parts])
    return env


def _diagnose(output: str) -> str:
    """What a failed `--version` run's output means, with the fix."""
    missing = re.search(r"error while loading shared libraries: ([^:]+):", output)
    if missing:
        lib = missing.group(1)
        if lib.startswith("libb64"):
            return f"{lib} is missing: install Debian's libb64-0d (apt-get install -y libb64-0d)"
        if lib.startswith("libcudart"):
            return (f"{lib} is missing: pip install nvidia-cuda-runtime-cu12 into this environment "
                    f"({sys.executable}); it is found through LD_LIBRARY_PATH")
        return f"the shared library {lib} is missing"
    glibc = re.search(r"GLIBC_(\d+\.\d+)' not found", output)
    if glibc:
        return (f"it needs glibc {glibc.group(1)}, this system has {platform.libc_ver()[1] or 'an older one'}; "
                f"use the binary of a tritonclient 2.44..2.51 wheel (--install fetches {WHEEL_VERSION})")
    last = output.strip().splitlines()[-1:] or ["no output"]
    return last[0]


def check(binary: str | os.PathLike, env: dict[str, str] | None = None) -> PerfAnalyzer:
    """The binary, if `binary --version` runs; else PerfAnalyzerUnavailable saying why."""
    binary = Path(binary)
    if not binary.is_file():
        raise PerfAnalyzerUnavailable(f"{binary}: no such file")
    if not os.access(binary, os.X_OK):
        raise PerfAnalyzerUnavailable(f"{binary}: not executable")
    env = runtime_env(env)
    try:
        r = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    except OSError as e:  # wrong architecture, not an ELF, ...
        raise PerfAnalyzerUnavailable(f"{binary}: cannot run: {e}") from None
    out = (r.stdout or "") + (r.stderr or "")
    version = re.search(r"Perf Analyzer Version (\S+)", out)
    if r.returncode != 0 or not version:
        raise PerfAnalyzerUnavailable(f"{binary}: `--version` failed (status {r.returncode}): {_diagnose(out)}")
    return PerfAnalyzer(binary, env, version.group(1))


def find_perf_analyzer() -> PerfAnalyzer:
    """The first working perf_analyzer ($PERF_ANALYZER, the cache, PATH), or PerfAnalyzerUnavailable
    naming every candidate tried and why it failed."""
    candidates: list[Path] = []
    explicit = os.environ.get("PERF_ANALYZER")
    if explicit:
        candidates.append(Path(explicit))
    candidates += sorted(cache_dir().glob("*/perf_analyzer"), reverse=True)
    on_path = shutil.which("perf_analyzer")
    if on_path:
        candidates.append(Path(on_path))
    reasons = []
    for candidate in candidates:
        try:
            return check(candidate)
        except PerfAnalyzerUnavailable as e:
            reasons.append(str(e))
    tried = "; ".join(reasons) if reasons else "none found ($PERF_ANALYZER unset, cache empty, not on PATH)"
    raise PerfAnalyzerUnavailable(
        f"no working perf_analyzer: {tried}. Install one with `{sys.executable} -m "
        f"flux2_klein.client.perf_analyzer --install` (needs libb64-0d and nvidia-cuda-runtime-cu12)"
    )


def install_perf_analyzer(version: str = WHEEL_VERSION, *, force: bool = False) -> PerfAnalyzer:
    """Download tritonclient==`version`'s manylinux wheel (no dependencies, nothing installed), unpack its
    perf_analyzer into the cache folder and check that it runs. Idempotent unless `force`."""
    target = cache_dir() / version / "perf_analyzer"
    if target.is_file() and not force:
        try:
            return check(target)
        except PerfAnalyzerUnavailable:
            pass  # e.g. unpacked before its libraries were installed: check again after unpacking
    wheel_platform = _WHEEL_PLATFORMS.get(platform.machine())
    if wheel_platform is None or sys.platform != "linux":
        raise PerfAnalyzerUnavailable(
            f"tritonclient's wheels carry perf_analyzer for Linux x86_64/aarch64 only, not {sys.platform} "
            f"{platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", wheel_platform, "--dest", tmp, f"tritonclient=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(f"tritonclient-{version}-*.whl"))
        if r.returncode != 0 or not wheels:
            raise PerfAnalyzerUnavailable(
                f"`{' '.join(cmd)}` failed (status {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if _MEMBER.match(n)]
            if not members:
                raise PerfAnalyzerUnavailable(f"{wheels[0].name} has no perf_analyzer binary")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    partial.chmod(0o755)
    os.replace(partial, target)
    return check(target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux2_klein.client.perf_analyzer",
                                description="Find (or --install) a perf_analyzer that runs here.")
    p.add_argument("--install", action="store_true",
                   help=f"download tritonclient {WHEEL_VERSION}'s wheel and unpack its perf_analyzer "
                        f"into {cache_dir()}")
    p.add_argument("--wheel-version", default=WHEEL_VERSION,
                   help=f"the tritonclient wheel to take it from with --install (default {WHEEL_VERSION})")
    p.add_argument("--force", action="store_true", help="with --install, download again")
    args = p.parse_args(argv)
    try:
        pa = install_perf_analyzer(args.wheel_version, force=args.force) if args.install else find_perf_analyzer()
    except PerfAnalyzerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lib = cuda_runtime_lib_dir()
    print(f"{pa.binary}\tperf_analyzer {pa.version}\tLD_LIBRARY_PATH+={lib or '(nothing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
