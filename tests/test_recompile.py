"""No request pays for a compile: the torch leaves warm with the dtypes and shapes the served repository sends,
and count what dynamo compiles after that (flux2_klein/leaf_timing.py).

On a CPU with torch.compile's "eager" backend (FLUX2_KLEIN_COMPILE_BACKEND): dynamo traces and guards exactly
as it does before inductor on a GPU (dtype included), without generating code, so these run in seconds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import ServeCommand
from flux2_klein.checkpoint import load_checkpoint
from flux2_klein.leaf_timing import COMPILES, NETWORK_CALLS, LeafMonitor, parse_metrics, read_metrics
from flux2_klein.specs import example_inputs, network_specs
from flux2_klein.torch_runtime import COMPILE_BACKEND_ENV, WarmShapes, as_served, load_leaf, served_spec
from flux2_klein.triton_config import BF16_BOUNDARY, with_boundary

SIZE = (512, 512)  # the tiny DiT at 1024 tokens: seconds per traced call on a CPU


@pytest.fixture
def eager_backend(monkeypatch):
    """The eager backend, and dynamo's caches emptied: compiled code is cached per code object (every
    TransformerVelocity.forward shares one), so a leaf loaded earlier in this process would answer for it."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "eager")
    torch._dynamo.reset()


def _bf16_dit_inputs(ckpt, rng, batch=1, size=SIZE):
    """What the sampler sends a bf16 DiT: hidden and encoder states in bf16 (BF16_BOUNDARY), the rest as is; made
    in inference mode, as torch_leaf.py reads its inputs (dynamo guards on an inference tensor's dispatch keys)."""
    spec = with_boundary(network_specs(load_checkpoint(ckpt)), "bfloat16")["transformer"]
    with torch.inference_mode():
        return spec, as_served(example_inputs(spec, rng, batch=batch, size=size), spec, torch.device("cpu"))


def test_a_dit_warmed_with_the_served_dtypes_serves_without_compiling(tiny_ckpt, eager_backend):
    spec, _ = _bf16_dit_inputs(tiny_ckpt, np.random.default_rng(0))
    dtypes = {t.name: t.dtype for t in spec.inputs}
    assert dtypes["hidden_states"] == "bfloat16" and dtypes["timestep"] == "float32"
    leaf = load_leaf(str(tiny_ckpt), "transformer", dtype="bf16", device=torch.device("cpu"), compile_mode="default",
                     warm_shapes=WarmShapes.parse("512x512", 2, references=0), input_dtypes=dtypes)
    assert leaf.monitor.warm_compiles > 0 and "graphs compiled while warming" in leaf.summary
    for batch in (1, 2):
        _, args = _bf16_dit_inputs(tiny_ckpt, np.random.default_rng(batch), batch=batch)
        with torch.inference_mode():  # as torch_leaf.py calls it (grad mode is guarded on too)
            leaf(*args)
    assert (leaf.monitor.calls, leaf.monitor.compiles) == (2, 0)
    assert leaf.monitor.seconds > 0


def test_a_dit_warmed_in_float32_compiles_again_for_a_bf16_request_and_it_is_counted(tiny_ckpt, eager_backend):
    """The old warm-up (specs.py's float32 boundary) against what the sampler sends at the bf16 boundary."""
    leaf = load_leaf(str(tiny_ckpt), "transformer", dtype="bf16", device=torch.device("cpu"), compile_mode="default",
                     warm_shapes=WarmShapes.parse("512x512", 1, references=0))
    _, args = _bf16_dit_inputs(tiny_ckpt, np.random.default_rng(3))
    with torch.inference_mode():
        leaf(*args)
    assert leaf.monitor.compiles > 0 and leaf.monitor.last_compiled == leaf.monitor.compiles


def test_served_spec_takes_the_configs_dtypes_and_rejects_names_it_lacks(tiny_ckpt):
    spec = network_specs(load_checkpoint(tiny_ckpt))["transformer"]
    served = served_spec(spec, {n: "bfloat16" for n in BF16_BOUNDARY["transformer"] if n != "velocity"})
    assert [t.dtype for t in served.inputs] == ["bfloat16", "bfloat16", "float32", "int64", "int64"]
    assert served_spec(spec, None) is spec
    with pytest.raises(ValueError, match="transformer: the config names inputs the network lacks: .'latents'."):
        served_spec(spec, {"latents": "float32"})


def test_warm_up_that_does_not_hold_fails_the_load(tiny_ckpt, eager_backend, monkeypatch):
    """A second pass that compiles again (here: a module whose guards fail on every call) stops the load."""
    import torch.nn as nn

    from flux2_klein import torch_runtime

    class Fickle(nn.Module):  # reads a global that changes on every call: dynamo guards on it
        def forward(self, *args):
            Fickle.calls = getattr(Fickle, "calls", 0) + 1
            return args[0] * Fickle.calls

    monkeypatch.setattr(torch_runtime, "compile_module",
                        lambda module, network, mode: torch.compile(Fickle(), backend="eager"))
    with pytest.raises(RuntimeError, match="vae_decoder: warm-up does not hold: a second pass over its 1 shapes"):
        load_leaf(str(tiny_ckpt), "vae_decoder", dtype="fp32", device=torch.device("cpu"), compile_mode="default",
                  warm_shapes=WarmShapes.parse("512x512", 1))


def test_monitor_counts_only_after_warm_up_and_tells_its_sink():
    told = []
    monitor = LeafMonitor(torch.device("cpu"), sink=lambda s, c: told.append((s, c)))
    compiled = torch.compile(lambda x: x + 1, backend="eager")
    monitor.call(compiled, torch.zeros(3))
    assert (monitor.warm_compiles, monitor.calls, told) == (1, 0, [])
    monitor.warmed()
    monitor.call(compiled, torch.zeros(3))
    monitor.call(compiled, torch.zeros(3, dtype=torch.int64))  # a new dtype: dynamo compiles again
    assert (monitor.calls, monitor.compiles, [c for _, c in told]) == (2, 1, [0, 1])


def test_parse_metrics_sums_instances():
    text = "\n".join([
        "# HELP flux2_klein_network_seconds_total Seconds",
        '%s{instance="transformer_0_0",model="transformer"} 1.5' % "flux2_klein_network_seconds_total",
        '%s{instance="transformer_0_1",model="transformer"} 0.5' % "flux2_klein_network_seconds_total",
        f'{NETWORK_CALLS}{{instance="a",model="transformer"}} 8',
        f'{COMPILES}{{instance="a",model="vae_encoder"}} 2',
        'nv_inference_count{model="transformer",version="1"} 8',
    ])
    got = parse_metrics(text)
    assert got["transformer"] == {"network_s": 2.0, "calls": 8.0, "compiles": 0.0}
    assert got["vae_encoder"]["compiles"] == 2.0 and set(got) == {"transformer", "vae_encoder"}


def test_served_bf16_compiled_repository_answers_without_compiling_and_says_so(tiny_ckpt, tmp_path):
    """The served configuration's dtypes end to end on a CPU: bf16 leaves at the bf16 boundary, compiled (eager
    backend), warmed for one size and no references. Triton's metrics port shows each network's own time, and
    zero compiles after warm-up; a request with a reference (the VAE encoder was not warmed for any) shows the
    compile it paid for."""
    from flux2_klein.client.triton_client import Flux2KleinClient
    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Batching, Instances
    from test_serving import encoded, pattern

    one = Instances(preprocess=1, sampler=1, text_encoder=1, transformer=1, vae_decoder=1, vae_encoder=1)
    repo = build_repository(tiny_ckpt, tmp_path / "repo", runtime="torch", device="cpu", dtype="bf16", compile=True,
                            instances=one, warm_sizes="1024x1024", warm_references=0,
                            batching=Batching(max_requests=1, max_dit_rows=1))
    server = ServeCommand.launch(repo, log_path=tmp_path / "tritonserver.log", timeout_s=600,
                                 env={**os.environ, COMPILE_BACKEND_ENV: "eager"})
    try:
        metrics = f"{server.address}:{server.metrics_port}"
        with Flux2KleinClient(server.grpc_url) as client:
            client.generate("a red fox in the snow", width=1024, height=1024, seed=1)
            after_one = read_metrics(metrics)
            client.generate("a fox with a reference", width=1024, height=1024, seed=2,
                            references=[encoded(pattern(256, 256, 1), "PNG")])
            after_ref = read_metrics(metrics)
    finally:
        server.stop()
    log = (tmp_path / "tritonserver.log").read_text(errors="replace")
    assert "graphs compiled while warming" in log
    assert set(after_one) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    assert all(row["compiles"] == 0 for row in after_one.values()), after_one
    assert after_one["transformer"]["calls"] == 4 and after_one["transformer"]["network_s"] > 0
    assert after_ref["vae_encoder"]["compiles"] > 0 and "this request compiled" in log
    # Each leaf's own count at its unload, in the log too.
    assert "flux2-klein transformer: served 8 network calls" in log and "0 graphs compiled after warm-up" in log
