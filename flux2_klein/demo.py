"""`make demo`: tiny checkpoint -> repository -> a real Triton -> one image, on a CPU, from nothing.

Run as `python -m flux2_klein.demo DIR`; everything it writes stays under DIR.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .progress import log, setup_logging, step
from .server import TritonNotReady, TritonProcess


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    out = Path((argv or sys.argv[1:] or ["demo"])[0])
    ckpt, repo, image = out / "checkpoint", out / "repository", out / "flux2-klein.png"
    cli = [sys.executable, "-m", "flux2_klein.cli"]
    if not (ckpt / "model_index.json").exists():
        subprocess.run(cli + ["tiny", "--out", str(ckpt)], check=True)
    if not (repo / "build.json").exists():
        subprocess.run(cli + ["build", "--checkpoint", str(ckpt), "--out", str(repo)], check=True)
    server_log = out / "tritonserver.log"
    try:
        with step(f"starting Triton (log: {server_log})"):
            server = TritonProcess.launch(repo, log_path=server_log, timeout_s=600)
    except TritonNotReady as e:
        log.error("%s", e)
        return 1
    with server:
        start = time.perf_counter()
        subprocess.run(cli + ["generate", "--prompt", "a lighthouse on a cliff at dusk, oil painting",
                              "--size", "1024x1024", "--seed", "42", "--url", server.grpc_url,
                              "--out", str(image)], check=True)
        log.info("image written to %s in %.1f s (random weights: expect colourful noise)", image,
                 time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
