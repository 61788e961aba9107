"""The one way ONNX Runtime sessions are made (flux2_klein/ort_session.py), for the served leaf and DirectPipeline:
its settings, and what they are for: a graph run again does not page-fault its working set in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flux2_klein import ort_session

ROOT = Path(__file__).resolve().parents[1]


def big_graph(path: Path, n: int) -> None:
    """x [n] -> a few elementwise ops with n-float intermediates -> a sum: each intermediate is larger than
    glibc's mmap threshold can ever be (32 MiB), like the VAE's activations."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Mul", ["x", "x"], ["a"]), helper.make_node("Add", ["a", "x"], ["b"]),
             helper.make_node("Mul", ["b", "a"], ["c"]), helper.make_node("Sub", ["c", "b"], ["d"]),
             helper.make_node("ReduceSum", ["d"], ["y"], keepdims=1)]
    graph = helper.make_graph(nodes, "big", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_session_options_are_the_leafs(tmp_path):
    path = tmp_path / "g.onnx"
    big_graph(path, 1024)
    session = ort_session.make_session(path, threads=1)
    opts = session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    assert session.get_providers() == ["CPUExecutionProvider"]
    (y,) = session.run(None, {"x": np.ones(1024, np.float32)})
    assert y[0] == 0.0  # (1 * 1 + 1) * 1 - 2


def test_the_served_leaf_and_direct_make_their_sessions_with_it():
    # The leaf runs inside a Triton stub (no pb_utils here): its source must call the shared function, and
    # build no SessionOptions of its own, or the bench's in-process run would no longer be configured alike.
    for path in ("model_repository/onnxruntime_leaf.py", "flux2_klein/direct.py"):
        text = (ROOT / path).read_text()
        assert "make_session(" in text, path
        assert "SessionOptions(" not in text, path


FAULTS = textwrap.dedent("""
    import sys
    import numpy as np
    from flux2_klein import ort_session
    path, shared = sys.argv[1], sys.argv[2] == "make_session"
    if shared:
        session = ort_session.make_session(path, threads=1)
    else:  # the same options without the malloc setting
        import onnxruntime as ort
        session = ort.InferenceSession(path, ort_session.session_options(1), providers=["CPUExecutionProvider"])
    feed = {"x": np.ones(int(sys.argv[3]), np.float32)}
    def minor_faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
    # Warm-up: the heap grows until its free chunks fit the graph's requests. ORT allocates 64-byte aligned
    # (posix_memalign), and glibc cannot put an aligned request back into the exact chunk it freed, so with
    # this graph the plateau is several times the working set, reached after about 8 runs (the VAE's, with
    # many more buffers of many sizes, sits within a few percent of its working set: bench/results/).
    for _ in range(10):
        session.run(None, feed)
    before = minor_faults()
    for _ in range(3):
        session.run(None, feed)
    print((minor_faults() - before) // 3)
""")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts page faults from /proc")
def test_a_graph_run_again_does_not_fault_its_memory_in_again(tmp_path):
    n = 12 * 1024 * 1024  # 48 MiB per intermediate
    path = tmp_path / "big.onnx"
    big_graph(path, n)

    def faults(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, str(path), how, str(n)], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, check=True)
        return int(out.stdout.split()[-1])

    pages = n * 4 // 4096  # one intermediate's worth of 4 KiB pages
    without, shared = faults("options_only"), faults("make_session")
    assert without > 2 * pages  # without it every run maps and faults its intermediates in again
    assert shared * 4 < without, (shared, without)
