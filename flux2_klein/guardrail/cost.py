"""What the guardrail costs per request, for the benchmark's report: the prompt check (blocklist, then the
text classifier if any) and the image check (one image, as the safety model runs it), median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from .core import Guardrail


def _median_s(fn, items: Sequence, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for item in items:
            start = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cost(guard: Guardrail, prompts: Sequence[str], images: Sequence = (), repeats: int = 50) -> dict:
    """{"blocklist_us", "prompt_check_ms", "image_check_ms"}: medians per prompt / per image (None where that
    part is not configured). The first call of each is left out (lazy initialisation)."""
    out: dict[str, float | None] = {"blocklist_us": None, "prompt_check_ms": None, "image_check_ms": None}
    if guard.blocklist is not None and prompts:
        guard.blocklist.match(prompts[0])
        out["blocklist_us"] = _median_s(guard.blocklist.match, prompts, repeats) * 1e6
    if (guard.blocklist is not None or guard.text is not None) and prompts:
        guard.check_prompt(prompts[0])
        out["prompt_check_ms"] = _median_s(guard.check_prompt, prompts, max(1, repeats // 5)) * 1e3
    if guard.image is not None and len(images):
        guard.check_images([images[0]], "output")
        out["image_check_ms"] = _median_s(lambda i: guard.check_images([i], "output"), images,
                                          max(1, repeats // 5)) * 1e3
    return out
