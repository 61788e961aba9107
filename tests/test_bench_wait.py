"""`flux2-klein bench --wait S` waits for Triton as `generate --wait` does, instead of failing at once when it
runs right after `serve ... &` (the real command, against a port where nothing listens yet)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from flux2_klein.server import free_port


def bench(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "flux2_klein.cli", "bench", "--url", f"127.0.0.1:{free_port()}", "--no-direct",
           "--load", "python", "--out", str(tmp_path / "out"), "--quiet", *extra]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return r, time.monotonic() - start


def test_bench_waits_for_triton_and_says_so(tmp_path):
    r, took = bench(tmp_path, "--wait", "6")
    assert r.returncode == 1, r.stderr
    assert took >= 6
    # generate's message, every few seconds while it waits, then why it gave up
    assert "waiting for Triton (5 s of 6 s): nothing listens at" in r.stderr, r.stderr
    assert "not ready after waiting 6 s" in r.stderr, r.stderr


def test_bench_wait_0_fails_at_once(tmp_path):
    r, took = bench(tmp_path, "--wait", "0")
    assert r.returncode == 1
    assert "cannot reach Triton" in r.stderr and "waiting for Triton" not in r.stderr, r.stderr
    assert took < 30
