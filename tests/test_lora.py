"""LoRAs fused into a checkpoint (flux2_klein/lora.py): a tiny LoRA trained-shape with peft on the tiny
checkpoint, saved as diffusers saves klein LoRAs; the fused checkpoint's image equals diffusers'
`load_lora_weights` + `fuse_lora` on the original, and differs from the image without the LoRA."""

import json

import numpy as np
import pytest
import torch

from flux2_klein.lora import LORA_MANIFEST, LoraError, LoraSpec, fingerprint, fuse_loras, manifest

STEPS = 2


def make_lora(checkpoint, out, seed: int, targets=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")):
    """A LoRA as training leaves it: peft adapters on the transformer (random A and B, so it changes the
    image), saved with Flux2KleinPipeline.save_lora_weights."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel.from_pretrained(checkpoint / "transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    out.mkdir(parents=True)
    Flux2KleinPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out / "pytorch_lora_weights.safetensors"


def image(pipe, seed=4) -> np.ndarray:
    result = pipe(prompt="a lighthouse", height=1024, width=1024, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (result.images[0] * 255).round().astype(np.uint8)


def pipeline(path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loras(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return make_lora(tiny_ckpt, root / "a", seed=1), make_lora(tiny_ckpt, root / "b", seed=2, targets=("to_v",))


def test_fused_checkpoint_equals_diffusers_load_and_fuse(tiny_ckpt, loras, tmp_path):
    specs = [LoraSpec.parse(f"{loras[0]}:0.7"), LoraSpec.parse(str(loras[1]))]
    fused = fuse_loras(tiny_ckpt, specs, tmp_path / "fused")

    oracle = pipeline(tiny_ckpt)
    plain = image(oracle)
    oracle.load_lora_weights(str(loras[0]), adapter_name="a")
    oracle.load_lora_weights(str(loras[1]), adapter_name="b")
    oracle.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    oracle.fuse_lora(adapter_names=["a", "b"])
    want = image(oracle)

    got = image(pipeline(fused))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 20, "the LoRAs changed nothing"
    # Both count: the second alone (the first lost) gives another image.
    only_b = image(pipeline(fuse_loras(tiny_ckpt, [specs[1]], tmp_path / "only-b")))
    assert np.abs(got.astype(int) - only_b.astype(int)).max() > 20

    # The other components are the original's; the manifest names the LoRAs and their fingerprint.
    assert (fused / "vae").resolve() == (tiny_ckpt / "vae").resolve()
    info = manifest(fused)
    assert info == json.loads((fused / LORA_MANIFEST).read_text())
    assert info["fingerprint"] == fingerprint(specs) and [x["scale"] for x in info["loras"]] == [0.7, 1.0]
    assert manifest(tiny_ckpt) is None


def test_one_lora_equals_load_lora_weights_and_fuse_lora_with_its_scale(tiny_ckpt, loras, tmp_path):
    oracle = pipeline(tiny_ckpt)
    oracle.load_lora_weights(str(loras[0]))
    oracle.fuse_lora(lora_scale=0.5)
    got = image(pipeline(fuse_loras(tiny_ckpt, [LoraSpec.parse(f"{loras[0]}:0.5")], tmp_path / "fused")))
    assert np.abs(got.astype(int) - image(oracle).astype(int)).max() <= 2


def test_fingerprint_follows_bytes_scale_and_order(loras):
    a, b = LoraSpec(loras[0]), LoraSpec(loras[1])
    prints = {fingerprint([a]), fingerprint([LoraSpec(loras[0], 0.5)]), fingerprint([a, b]), fingerprint([b, a])}
    assert len(prints) == 4 and fingerprint([]) == ""
    assert fingerprint([a]) == fingerprint([LoraSpec(loras[0], 1.0)])


def test_bad_arguments_name_what_is_allowed(tiny_ckpt, loras, tmp_path):
    with pytest.raises(LoraError, match="no such file"):
        LoraSpec.parse(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(LoraError, match="finite number"):
        LoraSpec.parse(f"{loras[0]}:nan")
    assert LoraSpec.parse(f"{loras[0]}:-0.25").scale == -0.25
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    with pytest.raises(LoraError, match=".safetensors"):
        LoraSpec.parse(str(weights))
    from safetensors.torch import save_file

    text_encoder = tmp_path / "te.safetensors"
    save_file({"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)}, str(text_encoder))
    with pytest.raises(LoraError, match="transformer only"):
        fuse_loras(tiny_ckpt, [LoraSpec(text_encoder)], tmp_path / "out")
    with pytest.raises(LoraError, match="exists"):
        fuse_loras(tiny_ckpt, [LoraSpec(loras[0])], tmp_path)


def test_a_served_build_with_lora_equals_diffusers_load_and_fuse(tiny_ckpt, loras, tmp_path):
    """`flux2-klein build --lora FILE:SCALE` (the real command), served by a real tritonserver (torch leaves:
    no export to wait for): the image equals diffusers' load_lora_weights + fuse_lora, not the plain one's."""
    import subprocess
    import sys

    from conftest import ServeCommand
    from flux2_klein.client.triton_client import Flux2KleinClient

    repo = tmp_path / "repo"
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "build", "--checkpoint", str(tiny_ckpt),
                        "--out", str(repo), "--runtime", "torch", "--lora", f"{loras[0]}:0.7"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    build = json.loads((repo / "build.json").read_text())
    assert build["lora"]["fingerprint"] == fingerprint([LoraSpec.parse(f"{loras[0]}:0.7")])
    assert build["checkpoint"] == str((tmp_path / "repo.lora").resolve())
    oracle = pipeline(tiny_ckpt)
    plain = image(oracle)
    oracle.load_lora_weights(str(loras[0]), adapter_name="a")
    oracle.set_adapters(["a"], adapter_weights=[0.7])
    oracle.fuse_lora(adapter_names=["a"])
    want = image(oracle)
    server = ServeCommand.started(repo, tmp_path / "logs")
    try:
        with Flux2KleinClient(server.grpc_url) as client:
            got = client.generate("a lighthouse", width=1024, height=1024, seed=4, steps=STEPS)
    finally:
        server.stop()
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 20


def test_a_bad_build_option_is_refused_before_the_loras_are_fused(tiny_ckpt, loras, tmp_path):
    """build_repository checks every option first (repository.BuildOptions): nothing is fused, nothing
    written, for a build that would be refused."""
    from flux2_klein.repository import BuildOptions, build_repository

    for kwargs, says in [(dict(runtime="tpu"), "runtime: 'tpu'"), (dict(device="tpu"), "device: 'tpu'"),
                         (dict(runtime="onnxruntime", compile=True), "compile: only the torch runtime")]:
        with pytest.raises(ValueError, match=says):
            build_repository(tiny_ckpt, tmp_path / "repo", loras=[LoraSpec(loras[0])], **kwargs)
        assert not (tmp_path / "repo.lora").exists() and not (tmp_path / "repo").exists(), kwargs
    with pytest.raises(TypeError, match="not both"):
        build_repository(tiny_ckpt, tmp_path / "repo", BuildOptions(), runtime="torch")
    resolved = BuildOptions(runtime="torch", device="gpu").resolved()
    assert (resolved.dtype, resolved.boundary, resolved.warm_sizes) == ("bf16", "bfloat16", "1024x1024")
