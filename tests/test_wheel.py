"""The built wheel, installed (not editable) into a fresh venv: every module it ships imports, from a folder
holding a raw copy of the checkout (where python finds the raw `flux2_klein/`, which has no `export/`,
first: issue 19.1) and from an empty one (where the installed package is what imports); the package data
is in it; and its code key is the checkout's.

The venv gets the wheel alone; its dependencies are the dev venv's, put after its own site-packages by a
.pth line (a plain path: the dev venv's own .pth files, the editable install's finder among them, do not
run). Installing them afresh is tests/test_docker_replay.py's job, minutes that this test need not repeat.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "flux2_klein", "export", "client", "model_repository")  # what the wheel builds from
TOP_LEVEL = ("flux2_klein", "export", "client", "model_repository", "bench", "tests", "docs", "docker", "deploy")
# The stub puts its backend folder on sys.path for the Triton models' glue; the real file, not a stand-in.
PB_UTILS = "pytriton/tritonserver/backends/python"

pytestmark = pytest.mark.slow


def _copy_sources(dst: Path, names) -> None:
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dst / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and egg-info next to the sources, not in the checkout.
    src = tmp / "src"
    src.mkdir()
    _copy_sources(src, SOURCES)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("flux2_klein_triton-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    dev_site = Path(sysconfig.get_path("purelib"))
    (site / "zz-dev-dependencies.pth").write_text(f"{dev_site}\n{dev_site / PB_UTILS}\n")
    raw = tmp / "checkout"  # the checkout's top-level folders, as a user's clone has them
    raw.mkdir()
    _copy_sources(raw, TOP_LEVEL + ("pyproject.toml", "README.md"))
    empty = tmp / "elsewhere"
    empty.mkdir()
    return dict(wheel=wheel, python=python, site=site, raw=raw, empty=empty, src=src)


def _modules(wheel: Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    mods = []
    for name in sorted(n for n in names if n.endswith(".py") and not n.split("/")[0].endswith(".dist-info")):
        parts = name[:-3].split("/")
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


PROBE = """
import importlib, json, sys
files, errors = {}, {}
for m in json.loads(sys.argv[1]):
    try:
        files[m] = importlib.import_module(m).__file__
    except BaseException as e:
        errors[m] = f"{type(e).__name__}: {e}"
print(json.dumps({"files": files, "errors": errors}))
"""


def _import_all(installed, cwd: Path) -> dict:
    mods = _modules(installed["wheel"])
    r = subprocess.run([str(installed["python"]), "-c", PROBE, json.dumps(mods)], cwd=cwd, capture_output=True,
                       text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_checkout_subpackages_are_pyprojects_package_dir():
    import tomllib

    from flux2_klein import CHECKOUT_SUBPACKAGES

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert mapping == {"flux2_klein": "flux2_klein", **{f"flux2_klein.{n}": n for n in CHECKOUT_SUBPACKAGES}}


def test_the_wheel_ships_every_module_and_the_package_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    from flux2_klein import CHECKOUT_SUBPACKAGES

    for folder, inside in [("flux2_klein", "flux2_klein"), *((n, f"flux2_klein/{n}") for n in CHECKOUT_SUBPACKAGES)]:
        for f in (ROOT / folder).rglob("*"):
            rel = f.relative_to(ROOT / folder)
            if f.is_file() and "__pycache__" not in rel.parts and (f.suffix in (".py", ".json", ".txt")):
                assert f"{inside}/{rel.as_posix()}" in names, f"{folder}/{rel} is not in the wheel"


def test_every_module_imports_from_a_raw_checkout(installed):
    """python puts the current folder first: from a checkout root the raw flux2_klein/ is the package,
    and export/, client/, model_repository/ must still resolve (flux2_klein/__init__.py maps them)."""
    got = _import_all(installed, installed["raw"])
    assert not got["errors"], got["errors"]
    assert got["files"]["flux2_klein.export"].startswith(str(installed["raw"] / "export"))


def test_every_module_imports_from_the_installed_wheel_elsewhere(installed):
    got = _import_all(installed, installed["empty"])
    assert not got["errors"], got["errors"]
    outside = {m: f for m, f in got["files"].items() if not f.startswith(str(installed["site"]))}
    assert not outside, f"imported from outside the installed wheel: {outside}"
    # The same code gives the same cache key installed as in a checkout (profile.code_files' names): the
    # wheel's against the copy it was built from.
    r = subprocess.run([str(installed["python"]), "-c",
                        "from flux2_klein.container.profile import code_fingerprint; print(code_fingerprint())"],
                       cwd=installed["empty"], capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    from flux2_klein.container.profile import code_fingerprint

    assert r.stdout.strip() == code_fingerprint(installed["src"] / "flux2_klein")
