"""Progress lines for long steps (loading, export, folding): what started, and how long it took."""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("flux2_klein")


def setup_logging(verbose: bool = False) -> None:
    # Our own lines at INFO; libraries (onnxscript logs every folded constant) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("flux2_klein").setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def step(what: str):
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)
