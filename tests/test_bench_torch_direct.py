"""The bench's in-process ("direct") run of a `--runtime torch` repository (client/bench/torch_direct.py): the
torch leaves loaded as the served ones are, the contract's image, and torch's thread count set for the run
only (DirectPipeline itself leaves it alone)."""

from __future__ import annotations

import pytest
import torch

from flux2_klein.client.bench.load import run_direct
from flux2_klein.client.bench.progress import Progress
from flux2_klein.client.bench.torch_direct import is_torch_repository, torch_sessions
from flux2_klein.client.bench.workload import BenchConfig, make_entries
from flux2_klein.direct import DirectPipeline
from flux2_klein.triton_config import Instances
from test_serving import assert_equal_images, oracle

SMALL = Instances(preprocess=1, sampler=1, text_encoder=1, transformer=1, vae_decoder=1, vae_encoder=1)


@pytest.fixture(scope="module")
def torch_repo(tiny_ckpt, tmp_path_factory):
    from flux2_klein.repository import build_repository

    return build_repository(tiny_ckpt, tmp_path_factory.mktemp("torch-direct") / "repo", runtime="torch",
                            device="cpu", instances=SMALL)


def test_torch_direct_image_equals_diffusers(torch_repo, tiny_pipe):
    assert is_torch_repository(torch_repo)
    sessions, threads, config = torch_sessions(torch_repo)
    assert threads == 1 and "torch_leaf.py" in config and "inference_mode" in config
    before = torch.get_num_threads()
    pipe = DirectPipeline(torch_repo, sessions=sessions)
    assert torch.get_num_threads() == before  # constructing the comparison changes nothing process-wide
    prompt = "a lighthouse at dusk, torch direct"
    got = pipe.generate(prompt, width=1248, height=832, seed=3)
    assert_equal_images(got, oracle(tiny_pipe, prompt, width=1248, height=832, seed=3))
    assert set(pipe.last_timings) >= {"text_encoder", "transformer", "vae_decoder", "total"}


def test_bench_direct_runs_a_torch_repository_and_restores_torch_threads(torch_repo):
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = BenchConfig(repository=torch_repo, progress=False, steps=1)
        entries = make_entries(2, [(1024, 1024)], [], "torch-direct", 1)
        result = run_direct(cfg, entries, entries[:1], Progress(False))
        assert torch.get_num_threads() == 2  # one thread for the run, as the leaves and the sampler use
    finally:
        torch.set_num_threads(original)
    assert result["requests"] == 2 and result["latency_ms"]["avg"] > 0
    assert result["stage_ms"]["vae_decoder"] > 0 and result["stage_ms"]["transformer"] > 0
    assert result["session_config"].startswith("torch leaves") and result["threads"]["transformer"] == 1
