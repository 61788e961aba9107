"""`flux2-klein serve`: fails loudly when a model cannot load, stops cleanly on SIGTERM; and a base
(undistilled) checkpoint served with classifier-free guidance equals diffusers; and `TritonProcess` (its one
retry, its environment, its timeout) with a stand-in tritonserver."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ServeCommand, free_port
from flux2_klein.client.triton_client import Flux2KleinClient


def test_sigterm_stops_the_server_cleanly(triton_repo, tmp_path):
    server = ServeCommand(triton_repo, log_path=tmp_path / "log").start()
    server.wait_ready()
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 60


def test_a_model_that_cannot_load_fails_serve_with_its_error(triton_repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(triton_repo, broken)
    (broken / "vae_decoder" / "1" / "model.onnx").write_bytes(b"this is not a graph")
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "serve", "--repository", str(broken),
                        "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                        "--metrics-port", str(free_port())],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "vae_decoder" in r.stdout + r.stderr and "tritonserver exited" in r.stderr


def test_serve_refuses_a_folder_that_is_no_repository(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "serve", "--repository", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "flux2-klein build" in r.stderr


@pytest.fixture(scope="module")
def base_server(tiny_base_ckpt, tmp_path_factory):
    from flux2_klein.repository import build_repository

    repo = build_repository(tiny_base_ckpt, tmp_path_factory.mktemp("base") / "repo")
    server = ServeCommand.started(repo, tmp_path_factory.mktemp("base-logs"))
    yield server
    server.stop()


def test_base_checkpoint_with_guidance_equals_diffusers(base_server, tiny_base_ckpt):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_base_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with Flux2KleinClient(base_server.grpc_url) as client:
        got = client.generate("a base model prompt", width=1248, height=832, seed=11, steps=4, guidance=4.0)
        unguided = client.generate("a base model prompt", width=1248, height=832, seed=11, steps=4, guidance=1.0)
    want = pipe(prompt="a base model prompt", width=1248, height=832, num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(11)).images[0]
    diff = np.abs(got.astype(int) - np.asarray(want).astype(int)).max()
    assert diff <= 2, diff
    assert np.abs(got.astype(int) - unguided.astype(int)).mean() > 2  # guidance really ran


def _stand_in(tmp_path, body: str):
    """A tritonserver stand-in: a script that counts its starts and does `body`."""
    from flux2_klein.server import TritonInstall

    script = tmp_path / "tritonserver"
    script.write_text(f"#!/bin/sh\necho start >> {tmp_path / 'starts'}\n{body}\n")
    script.chmod(0o755)
    return TritonInstall(script)


def test_triton_process_retries_once_on_lock_exception_only(tmp_path):
    from flux2_klein.server import TritonNotReady, TritonProcess

    install = _stand_in(tmp_path, "echo 'terminate called: boost::interprocess::lock_exception'; exit 134")
    with pytest.raises(TritonNotReady) as info:
        TritonProcess.launch(tmp_path, log_path=tmp_path / "logs" / "triton.log", timeout_s=30, install=install)
    assert (tmp_path / "starts").read_text().count("start") == 2
    assert info.value.exited and "lock_exception" in str(info.value)
    assert (tmp_path / "logs" / "triton-2.log").is_file()

    (tmp_path / "starts").unlink()
    install = _stand_in(tmp_path, "echo 'failed to load vae_decoder'; exit 1")
    with pytest.raises(TritonNotReady) as info:
        TritonProcess.launch(tmp_path, log_path=tmp_path / "other.log", timeout_s=30, install=install)
    assert (tmp_path / "starts").read_text().count("start") == 1, "another failure earns no retry"
    assert info.value.exited and "vae_decoder" in info.value.log_tail and "status 1" in str(info.value)


def test_triton_process_environment_and_timeout(tmp_path):
    from flux2_klein.server import TritonNotReady, TritonProcess

    install = _stand_in(tmp_path, 'echo "PATH=$PATH"; echo "LD=$LD_LIBRARY_PATH"; echo "CWD=$(pwd)"; sleep 30')
    (tmp_path / "work").mkdir()
    server = TritonProcess(tmp_path, env={"PATH": "/usr/bin:/bin", "KEEP": "1"}, path=["/first"],
                           library_path=["/libs"], log_path=tmp_path / "t.log", cwd=tmp_path / "work", install=install)
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    env = server.environment()
    assert env["PATH"] == "/first:/usr/bin:/bin" and env["LD_LIBRARY_PATH"] == "/libs" and env["KEEP"] == "1"
    start = time.monotonic()
    with pytest.raises(TritonNotReady) as info:
        server.start().wait_ready(timeout_s=2)
    assert not info.value.exited and time.monotonic() - start < 20, "a live but unready server is stopped"
    assert server.process.returncode is not None
    assert f"CWD={tmp_path / 'work'}" in info.value.log_tail and "PATH=/first:" in info.value.log_tail


def test_server_command_binds_loopback_and_keys_the_dangerous_apis(tmp_path):
    from flux2_klein.server import TritonInstall, TritonProcess
    from flux2_klein.watchdog import ADMIN_HEADER, RestartBudget

    server = TritonProcess(tmp_path, install=TritonInstall(tmp_path / "tritonserver"))
    argv = server.command()
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            "--model-control-mode=explicit", "--load-model=*"} <= set(argv)
    apis = "shared-memory,model-repository,trace,logging"
    assert f"--http-restricted-api={apis}:{ADMIN_HEADER}={server.admin_key}" in argv
    assert f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={server.admin_key}" in argv
    assert len(server.admin_key) >= 32 and TritonProcess(tmp_path).admin_key != server.admin_key
    wide = TritonProcess(tmp_path, install=server.install, address="0.0.0.0", metrics_address="0.0.0.0").command()
    assert "--http-address=0.0.0.0" in wide and "--metrics-address=0.0.0.0" in wide

    budget = RestartBudget(limit=2, window_s=60)
    assert budget.allow() and budget.allow() and not budget.allow(), "restarts are bounded"


def test_serve_prints_a_ready_line(triton_server):
    text = triton_server.log_path.read_text()
    line = next(l for l in text.splitlines() if l.startswith("flux2-klein serve: ready in"))
    assert f"127.0.0.1:{triton_server.grpc_port}" in line and "flux2_klein" in line and "transformer" in line
    from flux2_klein.target import gpu_facts

    assert ("expected on a CPU-only machine" in line) == (gpu_facts()[0] == "cpu")
