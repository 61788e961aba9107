"""LoRAs chosen per request (flux2_klein/lora_library.py), served by a real tritonserver from a torch repository
built with a LoRA library: concurrent requests with different sets, and one with none, each get diffusers' image
for their own set (`load_lora_weights` + `set_adapters`), batched only with requests of the same set; names
outside the library are refused by name and the server keeps serving; a library file changed after the build
keeps the server from starting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ServeCommand, run_concurrently, serve_one_batching_sampler
from flux2_klein.client.triton_client import Flux2KleinClient, GenerationError
from flux2_klein.server import TritonNotReady
from test_lora import pipeline
from test_serving import assert_equal_images

STEPS = 2
PROMPT = "a lighthouse"


def oracle(tiny_ckpt, folder, loras: dict[str, float], seed: int) -> np.ndarray:
    """diffusers' image for `loras` (name -> scale): every file loaded as an adapter, then set_adapters."""
    pipe = pipeline(tiny_ckpt)
    for name in loras:
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name.replace(".", "_"))
    if loras:
        pipe.set_adapters([n.replace(".", "_") for n in loras], adapter_weights=list(loras.values()))
    result = pipe(prompt=PROMPT, height=1024, width=1024, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (result.images[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def lora_server(tiny_ckpt, lora_folder, tmp_path_factory):
    """One sampler that waits up to a second for company: concurrent requests reach one execute() for sure."""
    server = serve_one_batching_sampler(tiny_ckpt, None, tmp_path_factory, "lora", runtime="torch", device="cpu",
                                        lora_library=lora_folder)
    yield server
    server.stop()


def _generate(server, loras, seed):
    with Flux2KleinClient(server.grpc_url) as client:
        return client.generate(PROMPT, width=1024, height=1024, steps=STEPS, seed=seed, loras=loras)


def test_concurrent_requests_each_get_diffusers_image_for_their_own_loras(lora_server, tiny_ckpt, lora_folder):
    jobs = [({"style": 0.8, "detail": 1.0}, 4), ("ink.v2", 5), (None, 6), ("style:0.8,detail", 7)]
    images, sampler, dit = run_concurrently(lora_server, lambda job: _generate(lora_server, *job), jobs)
    wants = [oracle(tiny_ckpt, lora_folder, {"style": 0.8, "detail": 1.0}, 4),
             oracle(tiny_ckpt, lora_folder, {"ink.v2": 1.0}, 5),
             oracle(tiny_ckpt, lora_folder, {}, 6),
             oracle(tiny_ckpt, lora_folder, {"style": 0.8, "detail": 1.0}, 7)]
    for got, want in zip(images, wants):
        assert_equal_images(got, want, max_diff=2)
    # The LoRAs count: each set's image differs from the plain model's for the same seed.
    for got, (loras, seed) in zip(images, jobs):
        if loras:
            plain = oracle(tiny_ckpt, lora_folder, {}, seed)
            assert np.abs(got.astype(int) - plain.astype(int)).max() > 20, f"{loras} changed nothing"
    assert sampler[0] == 4
    if sampler[1] == 1:  # all four in one execute(): three sets, three loops of STEPS DiT calls each
        assert dit[1] == 3 * STEPS, dit


def test_unknown_and_malformed_loras_are_refused_by_name_and_the_server_keeps_serving(lora_server):
    for loras, says in (("sketch", "'sketch' is not in this server's LoRA library; served: detail, ink.v2, style"),
                        ("style:loud", "scale 'loud' is not a number"),
                        ("style:9", "outside -8..8"),
                        ("style,style", "named twice"),
                        ("a,b,c,d,e", "at most 4 per request")):
        with pytest.raises(GenerationError) as e:
            _generate(lora_server, loras, 0)
        assert e.value.invalid_argument and "loras: " in e.value.message and says in e.value.message, e.value.message
    assert _generate(lora_server, "", 0).shape == (1024, 1024, 3)  # "" means none


def test_a_library_file_changed_after_the_build_keeps_the_server_from_starting(tiny_ckpt, lora_folder, tmp_path):
    import shutil

    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Instances

    folder = tmp_path / "library"
    shutil.copytree(lora_folder, folder)
    repo = build_repository(tiny_ckpt, tmp_path / "repo", runtime="torch", device="cpu", lora_library=folder,
                            instances=Instances(preprocess=1, sampler=1, text_encoder=1, transformer=1,
                                                vae_decoder=1, vae_encoder=1))
    shutil.copy(folder / "detail.safetensors", folder / "style.safetensors")
    with pytest.raises(TritonNotReady):
        ServeCommand.started(repo, tmp_path / "logs", timeout_s=240).stop()
    log = (tmp_path / "logs" / "tritonserver.log").read_text()
    assert "style.safetensors: changed since the repository was built" in log


def test_the_generate_command_takes_loras(lora_server, tmp_path):
    """`flux2-klein generate --loras` as a user types it: the client library's image, and a bad name's message."""
    import subprocess
    import sys

    from PIL import Image

    cli = [sys.executable, "-m", "flux2_klein.cli", "generate", "--prompt", PROMPT, "--size", "1024x1024",
           "--steps", str(STEPS), "--seed", "4", "--url", lora_server.grpc_url]
    r = subprocess.run([*cli, "--loras", "style:0.8,detail", "--out", str(tmp_path / "a.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert np.array_equal(got, _generate(lora_server, "style:0.8,detail", 4))
    r = subprocess.run([*cli, "--loras", "sketch", "--out", str(tmp_path / "b.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "loras: 'sketch' is not in this server's LoRA library" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "b.png").exists()
