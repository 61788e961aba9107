"""`docker build -f docker/Dockerfile` replayed on a CPU without Docker: steps 2-3 as docker runs them, and
step 4 with the image's ENV, WORKDIR, USER, HEALTHCHECK and ENTRYPOINT as far as a machine without the
NGC image goes (issue 19.1: step 3 failed with "No module named 'flux2_klein.export'").

The Dockerfile is read, not restated: its COPY lines lay out their sources (with the build context's
.dockerignore exclusions) in a scratch folder standing for the image's root, its ARG defaults and ENV
lines become the environment, and its RUN lines run verbatim through its SHELL (`bash -euo pipefail -c`)
in each WORKDIR, in a fresh venv whose `python3` and `pip` come first on PATH. Two stand-ins, both for
the NGC base image: TensorRT-RTX (this machine's, linked into the venv; `FLUX2_KLEIN_TENSORRT` selects
it) for the TensorRT that step 1 installs (tests/test_docker_tensorrt.py runs step 1's pip lines), and
the scratch folder's absolute paths for /opt/flux2-klein and /cache. Step 4's user and group are not
created (that would change this machine); its USER is replayed by running as that uid where we are root.

Slow: step 2 installs the whole dependency list into the fresh venv (about 2.5 minutes here, from this
machine's local package index; PIP_NO_CACHE_DIR, as the Dockerfile sets it, leaves no cache to help).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from flux2_klein import CHECKOUT_SUBPACKAGES

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "docker" / "Dockerfile.dockerignore"
# TensorRT-RTX standing in for the image's TensorRT: the distributions the [test] extra installed.
TRT_STAND_IN = ("tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs")
SUBPACKAGES = ("flux2_klein", *(f"flux2_klein.{n}" for n in CHECKOUT_SUBPACKAGES))

pytestmark = pytest.mark.slow


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) as docker's parser reads them: `\\` continues a line, comment lines (also
    inside a continued instruction) are dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]  # docker removes the escape and the newline
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (the key=value form)."""
    return dict(word.split("=", 1) for word in shlex.split(args.replace("\n", " ")))


def _excluded(rel: Path) -> bool:
    """The context's `**/` exclusions (caches, egg-info) of .dockerignore; its allow-list is test_deploy's."""
    import fnmatch

    patterns = [p.removeprefix("**/") for p in DOCKERIGNORE.read_text().split() if p.startswith("**/")]
    return any(fnmatch.fnmatch(part, p) for part in rel.parts for p in patterns)


def copy_into(srcs: list[str], dest: str, workdir: Path, image_root: Path) -> None:
    """COPY SRC... DEST from the build context (the repository root), as docker does: a folder's contents
    into DEST, files into DEST/ when it ends with `/`; a relative DEST is under WORKDIR."""
    target = (image_root / dest.lstrip("/")) if dest.startswith("/") else workdir / dest
    for src in srcs:
        path = ROOT / src
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and not _excluded(f.relative_to(ROOT)):
                    (target / f.relative_to(path)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target / f.relative_to(path))
        else:
            into = target / path.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


def fresh_venv(where: Path) -> Path:
    """A new venv on this interpreter with only pip in it, and TensorRT-RTX linked in (standing in for
    the TensorRT of the image's step 1)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(where / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if entry.name in TRT_STAND_IN or entry.name.startswith("tensorrt_rtx_cu"):  # + their dist-info
            (site / entry.name).symlink_to(entry)
    return where


def replay_step_4(run: str, image_root: Path) -> None:
    """Step 4's RUN as far as this machine allows: its mkdir, chown and chmod under the scratch root (the
    chown where we are root); groupadd and useradd would change this machine's accounts."""
    for part in (p.strip() for p in run.split("&&")):
        words = shlex.split(part)
        paths = [image_root / w.lstrip("/") for w in words if w.startswith("/")]
        if words[:2] == ["mkdir", "-p"]:
            for path in paths:
                path.mkdir(parents=True, exist_ok=True)
        elif words[0] == "chown" and os.geteuid() == 0:
            uid, gid = (int(x) for x in words[1].split(":"))
            for path in paths:
                os.chown(path, uid, gid)
        elif words[0] == "chmod":
            for path in paths:
                path.chmod(int(words[1], 8))
        else:
            assert words[0] in ("groupadd", "useradd"), f"step 4 does what this replay does not know: {part}"


@pytest.fixture(scope="module")
def image_root():
    # Not pytest's tmp_path: its parents are private to root, and step 4 runs as the image's uid.
    root = Path(tempfile.mkdtemp(prefix="docker-replay-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_shell(shell: list[str], command: str, cwd: Path, env: dict, timeout: float = 900, user: int | None = None):
    argv = [*shell, command]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def replayed(image_root):
    """Steps 2 and 3 replayed (and 4 as far as it goes); what the test checks afterwards."""
    text = DOCKERFILE.read_text()
    steps = instructions(text)
    venv = fresh_venv(image_root / "venv")
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(image_root / "root"),
           "LANG": "C.UTF-8", "FLUX2_KLEIN_TENSORRT": "tensorrt_rtx"}
    # pip's settings of this machine (its local index, find-links) as a user's pip would see them
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    shell, workdir, user, timings = ["/bin/sh", "-c"], image_root, None, {}
    started_step2 = False
    for word, args in steps:
        if word == "ARG":
            name, _, default = args.partition("=")
            env[name] = json.loads(default) if default.startswith('"') else default
        elif word == "ENV":
            # the image's absolute paths, under the scratch root
            env.update({k: str(image_root / v.lstrip("/")) if v.startswith(("/cache", "/models/", "/opt/")) else v
                        for k, v in env_pairs(args).items()})
        elif word == "SHELL":
            shell = json.loads(args)
        elif word == "WORKDIR":
            workdir = image_root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
            started_step2 = True  # the first WORKDIR opens step 2; step 1 (TensorRT) is the stand-in's
        elif word == "COPY" and started_step2:
            *srcs, dest = args.split()
            copy_into(srcs, dest, workdir, image_root)
        elif word == "RUN" and started_step2:
            if "useradd" in args:  # step 4: the user is not created on this machine; its folders are
                replay_step_4(args, image_root)
                continue
            start = time.monotonic()
            r = run_shell(shell, args, workdir, env)
            timings[args.split()[0] + " " + args.split()[1]] = time.monotonic() - start
            assert r.returncode == 0, (f"RUN in {workdir} failed ({r.returncode}):\n{args}\n--- stdout\n"
                                       f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}")
        elif word == "USER":
            uid = int(args.split(":")[0])
            user = uid if os.geteuid() == 0 and shutil.which("setpriv") else None
    print("\nreplayed RUN timings: " + ", ".join(f"{k}... {v:.0f} s" for k, v in timings.items()))
    return dict(steps=steps, env=env, shell=shell, workdir=workdir, user=user, venv=venv, root=image_root)


def test_steps_2_and_3_run_as_docker_runs_them(replayed):
    """The fixture ran every RUN of steps 2-3 verbatim; the package then imports from the venv's
    site-packages from every WORKDIR the image has, not from a copy of the sources left beside it."""
    site = subprocess.run([str(replayed["venv"] / "bin" / "python3"), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    probe = "import importlib, json; print(json.dumps({m: importlib.import_module(m).__file__ for m in %r}))" % (SUBPACKAGES,)
    workdirs = [replayed["root"] / w.lstrip("/") for word, w in replayed["steps"] if word == "WORKDIR"]
    for workdir in workdirs:
        r = run_shell(replayed["shell"], f"python3 -c {shlex.quote(probe)}", workdir, replayed["env"], timeout=120)
        assert r.returncode == 0, f"in {workdir}: {r.stderr[-3000:]}"
        files = json.loads(r.stdout.strip().splitlines()[-1])
        assert all(f.startswith(site) for f in files.values()), f"in {workdir} the package came from {files}"


def test_step_4_the_user_entrypoint_and_healthcheck_start_from_the_cache_folder(replayed):
    steps = replayed["steps"]
    (entry,) = [json.loads(a) for w, a in steps if w == "ENTRYPOINT"]
    assert entry[0] == "/opt/nvidia/nvidia_entrypoint.sh"  # NGC's wrapper, which execs the rest
    (health,) = [a for w, a in steps if w == "HEALTHCHECK"]
    health_cmd = json.loads(health.split(" CMD ", 1)[1])
    cache = replayed["workdir"]
    assert cache.name == "cache"
    if replayed["user"] is not None:
        assert cache.stat().st_uid == replayed["user"]
    r = run_shell(replayed["shell"], shlex.join([*entry[1:], "--help"]), cache, replayed["env"], timeout=120,
                  user=replayed["user"])
    assert r.returncode == 0 and "--healthcheck" in r.stdout, r.stderr[-3000:]
    # Nothing listens on the gateway's port here (or something else does): 1 or 0, never a traceback.
    r = run_shell(replayed["shell"], shlex.join(health_cmd), cache, replayed["env"], timeout=120,
                  user=replayed["user"])
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-3000:]
