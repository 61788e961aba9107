"""How every ONNX Runtime session of an onnxruntime repository is made: the served leaf and DirectPipeline alike.

    from flux2_klein.ort_session import make_session

    session = make_session("REPO/vae_decoder/1/model.onnx", threads=1)

One function for both, so that the bench's in-process run ("direct") is configured exactly as Triton's leaves
are and "Triton - direct" is what serving adds, nothing else. `describe()` says what it sets (the bench
report prints it). `one_torch_thread()` is the same kind of fact for the sampler's loop math on a CPU (the
Triton sampler and DirectPipeline both call it).

Memory, measured on the tiny checkpoint's VAE decoder (2-core host, one thread, 1024x1024 after every size
was run once, bench/results/ has the report):
  - ORT's defaults (CPU arena, memory patterns) keep the largest buffer of every size: ~2.2 GB per VAE
    instance once 1568x672 and 1024x1024 were both served. Too much per instance.
  - the arena and patterns off (what the leaf did): ~1.1 GB peak, but each of the graph's big intermediates
    is a fresh mmap (glibc serves any block above its 32 MiB cap on M_MMAP_THRESHOLD with mmap and returns
    it with munmap on free), so every run page-faults its whole working set again: ~470,000 minor faults
    per 1024x1024 decode, which made the served decoder about twice as slow as the in-process one.
  - the arena on with `memory.enable_memory_arena_shrinkage` ("cpu:0", a run option: onnxruntime's
    include/onnxruntime/core/session/onnxruntime_run_options_config_keys.h, v1.32) frees the arena's unused
    regions after each run, so the next run faults them in again (~270,000 faults); and the arena with
    arena_extend_strategy kSameAsRequested (OrtArenaCfg through a registered env allocator) still held
    ~2.2 GB across sizes. Neither is both bounded and fault-free.
  - chosen: the arena and patterns off, and glibc told to serve large blocks from its heap and keep what
    is freed (mallopt M_MMAP_MAX = 0: "setting this to zero disables all use of mmap"; M_TRIM_THRESHOLD:
    the free top-of-heap size above which free() gives memory back; GNU C Library manual, "Malloc Tunable
    Parameters"). The next run reuses the same pages: no faults, and the process holds about its peak
    (the largest size's working set plus some fragmentation across sizes) instead of twice that.

The heap's fragmentation across sizes (its peak ~190 MB above the mmap variant's for the tiny VAE decoder)
is more than paid for in Triton by the stub not loading torch (~210 MB per instance; flux2_klein/
triton_tensors.py): a VAE decoder instance peaks at 1,330-1,344 MB after 1568x672 and 672x1568, against
1,500-1,507 MB with torch and mmap per buffer (bench/results/2026-12-03-cpu-ort-leaves-without-torch.md).

mallopt is process-wide: in Triton each instance is its own stub process, so it touches that instance only;
in DirectPipeline it applies to the calling process, as it must for the two to run alike. Where the C
library is not glibc (no mallopt) nothing is changed and `describe()` says so.

Huge pages, measured and not taken: glibc's `glibc.malloc.hugetlb=1` tunable (an environment variable, read
when a process starts) in tritonserver's environment, so every stub had it, put 1.3 GB of each VAE instance's
heap on transparent huge pages ("madvise" mode) but its peak stayed where it was (1,577-1,581 MB against
1,576-1,597 MB without, after 1568x672 and 672x1568; in-process 1,325 against 1,323 MB), and served/in-process
times did not move beyond this host's noise (bench/results/2026-12-03-cpu-hugetlb-and-torch-leaves.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap kept rather than returned: the largest graph's working set and more,
# so that a run never gives back what the next one needs (the heap's peak still bounds the process).
_TRIM_THRESHOLD = 2**31 - 1

_malloc_state: str | None = None


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse (see the module docstring); what was done, in words.
    Idempotent; a no-op where mallopt is unavailable."""
    global _malloc_state
    if _malloc_state is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _malloc_state = "malloc unchanged (no glibc mallopt)"
        else:
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
            _malloc_state = ("glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)" if ok
                             else "malloc unchanged (mallopt refused)")
    return _malloc_state


def session_options(threads: int = 1):
    """The SessionOptions of every leaf: `threads` intra-op threads, one inter-op thread, no CPU arena and
    no memory patterns (their buffers would stay at the largest of every size)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One thread per instance by default: concurrency comes from instances, not from threads fighting.
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    return opts


def make_session(path: str, threads: int = 1):
    """An InferenceSession of the graph at `path` on the CPU, configured as every leaf is."""
    import onnxruntime as ort

    keep_freed_memory()
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def describe(threads: Any = 1) -> str:
    """What make_session sets, for reports (threads: a number, or {network: threads})."""
    return (f"ONNX Runtime intra-op threads {threads}, inter-op 1, CPU arena off, memory patterns off; "
            f"{_malloc_state or 'malloc not configured yet in this process'}")


def one_torch_thread() -> None:
    """One torch intra-op thread for the sampler's loop math on a CPU (the Triton sampler and DirectPipeline).

    Its tensors are small (a few thousand tokens x channels), and with torch's default of one OpenMP thread
    per core each of its few ops per step hands work to threads that slept through the network call: on the
    2-core bench host that cost ~20 ms a step (the sampler's own time 80-90 ms per 4-step request, 3.5 ms
    with one thread, measured in-process with DirectPipeline; the report in bench/results/). Process-wide,
    like mallopt above: in Triton the sampler instance's own stub process."""
    import torch

    torch.set_num_threads(1)
