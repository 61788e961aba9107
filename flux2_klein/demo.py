"""`make demo`: tiny checkpoint -> repository -> a real Triton -> one image, on a CPU, from nothing.

Run as `python -m flux2_klein.demo DIR`; everything it writes stays under DIR.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .progress import log, setup_logging, step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    out = Path((argv or sys.argv[1:] or ["demo"])[0])
    ckpt, repo, image = out / "checkpoint", out / "repository", out / "flux2-klein.png"
    cli = [sys.executable, "-m", "flux2_klein.cli"]
    if not (ckpt / "model_index.json").exists():
        subprocess.run(cli + ["tiny", "--out", str(ckpt)], check=True)
    if not (repo / "build.json").exists():
        subprocess.run(cli + ["build", "--checkpoint", str(ckpt), "--out", str(repo)], check=True)
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    server_log = out / "tritonserver.log"
    with open(server_log, "wb") as logf:
        server = subprocess.Popen(cli + ["serve", "--repository", str(repo), "--http-port", str(http),
                                         "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                                  stdout=logf, stderr=subprocess.STDOUT)
        try:
            from .server import wait_ready

            with step(f"starting Triton (log: {server_log})"):
                if not wait_ready(http, server, timeout_s=600):
                    log.error("Triton did not become ready; the end of its log:\n%s", server_log.read_text()[-3000:])
                    return 1
            start = time.perf_counter()
            subprocess.run(cli + ["generate", "--prompt", "a lighthouse on a cliff at dusk, oil painting",
                                  "--size", "1024x1024", "--seed", "42", "--url", f"localhost:{grpc}",
                                  "--out", str(image)], check=True)
            log.info("image written to %s in %.1f s (random weights: expect colourful noise)", image,
                     time.perf_counter() - start)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
