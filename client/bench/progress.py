"""The benchmark's progress line, and the watcher that feeds it while a level runs."""

from __future__ import annotations

import sys
import threading
import time

from flux2_klein.contract import MODEL_NAME as MODEL

from .stats import snapshot


class Progress:
    """One line on stderr, rewritten in place on a terminal (else printed when it changes)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def update(self, text: str, key: str | None = None) -> None:
        """Show `text`; off a terminal only when `key` (default: the text) changed, so a ticking clock
        does not print a line a second into a log."""
        key = text if key is None else key
        if not self.enabled or (text if self.tty else key) == self._last:
            return
        self._last = text if self.tty else key
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
        self._last = ""


def watch(url: str, baseline: int, total: int | None, label: str, progress: Progress, stop: threading.Event) -> None:
    """Poll the ensemble's success count once a second while a level runs."""
    import tritonclient.grpc as grpcclient

    start = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    try:
        while not stop.is_set():
            try:
                done = snapshot(client).get(MODEL, {}).get("success_count", 0) - baseline
            except Exception:  # noqa: BLE001 - progress is best effort
                done = -1
            shown = (f"{done}" if done >= 0 else "?") + (f"/{total}" if total else "")
            progress.update(f"bench: {label}: {shown} requests, {time.monotonic() - start:.0f} s",
                            key=f"{label} {shown}")
            stop.wait(1.0)
    finally:
        client.close()

