"""`make demo`: tiny checkpoint -> repository -> a real Triton -> images and a contact sheet, on a CPU.

Run as `python -m flux2_klein.demo DIR`; everything it writes stays under DIR. The tiny checkpoint has
random weights, so every image looks like coloured noise; the contact sheet shows that the prompt, the
seed and a reference image each still change it, i.e. that they reach the networks.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .progress import log, setup_logging, step
from .server import TritonNotReady, TritonProcess

SIZE = (1024, 1024)
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
OTHER_PROMPT = "a red fox in the snow, photograph"
THUMB = 320  # pixels a side of each picture on the sheet
CAPTION = 88  # pixels of text under each
DIFF_GAIN = 4  # the difference maps' brightness: |difference| x 4, so small changes show


@dataclass(frozen=True)
class DemoRequest:
    name: str
    prompt: str
    seed: int
    references: tuple[str, ...] = field(default=())
    changed: str = ""  # what differs from the first request

    def label(self) -> list[str]:
        import textwrap

        ref = f", reference {Path(self.references[0]).name}" if self.references else ""
        return [f"{self.name}: seed {self.seed}{ref}", *textwrap.wrap(f"prompt: {self.prompt}", 48)[:2]]


def requests(reference: Path) -> list[DemoRequest]:
    """The first request, then one change at a time: seed, prompt, a reference image."""
    return [
        DemoRequest("1", PROMPT, 42),
        DemoRequest("2", PROMPT, 7, changed="seed"),
        DemoRequest("3", OTHER_PROMPT, 42, changed="prompt"),
        DemoRequest("4", PROMPT, 42, (str(reference),), changed="reference"),
    ]


def reference_picture(path: Path) -> Path:
    """A simple drawn picture (sky, sea, sun) to edit from: structure the noise can't have."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (768, 768), (250, 170, 90))
    draw = ImageDraw.Draw(img)
    for y in range(384):  # a sky fading from orange to dark blue
        t = y / 383
        draw.line([(0, y), (767, y)], fill=(int(250 - 220 * t), int(170 - 120 * t), int(90 + 60 * t)))
    draw.rectangle([0, 384, 767, 767], fill=(20, 60, 110))
    draw.ellipse([284, 240, 484, 440], fill=(255, 230, 120))
    img.save(path)
    return path


def _tile(image: np.ndarray, lines: list[str]):
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (THUMB, THUMB + CAPTION), "white")
    tile.paste(Image.fromarray(image).resize((THUMB, THUMB)), (0, 0))
    draw = ImageDraw.Draw(tile)
    for i, line in enumerate(lines):
        draw.text((6, THUMB + 4 + 17 * i), line, fill="black")
    return tile


def contact_sheet(results: list[tuple[DemoRequest, np.ndarray]], reference: Path, path: Path) -> Path:
    """One PNG. Top row: the reference input, then each request's image with its settings. Bottom row:
    under each later request, where its image differs from the first (|difference| x DIFF_GAIN, and the
    mean absolute difference per channel value, 0..255)."""
    from PIL import Image, ImageDraw

    first = results[0][1].astype(np.int16)
    top = [_tile(np.asarray(Image.open(reference).convert("RGB")), ["input: the reference of request 4",
                                                                    "(drawn by the demo)"])]
    bottom = [None, None]
    for req, image in results:
        top.append(_tile(image, req.label()))
        if req.changed:
            diff = np.abs(image.astype(np.int16) - first)
            shown = np.clip(diff * DIFF_GAIN, 0, 255).astype(np.uint8)
            bottom.append(_tile(shown, [f"{req.name} vs 1: only the {req.changed} changed",
                                        f"mean |difference| {float(diff.mean()):.1f} of 255",
                                        f"(black: equal; shown x{DIFF_GAIN})"]))
    header = 44
    row = THUMB + CAPTION
    sheet = Image.new("RGB", (THUMB * len(top), header + 2 * row), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), "flux2-klein demo, tiny random checkpoint: every image is noise by design (random weights).\n"
                      "Each change of prompt, seed or reference changes the noise (bottom row): the inputs reach "
                      "the networks.", fill="black")
    draw.text((6, header + row + 6), "differences from\nrequest 1 ->", fill="black")
    for i, tile in enumerate(top):
        sheet.paste(tile, (THUMB * i, header))
    for i, tile in enumerate(bottom):
        if tile is not None:
            sheet.paste(tile, (THUMB * i, header + row))
    sheet.save(path)
    return path


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
    from .client import Flux2KleinClient
    from .client.images import save_image

    reference = reference_picture(out / "reference.png")
    results = []
    with server, Flux2KleinClient(server.grpc_url) as client:
        for req in requests(reference):
            with step(f"request {req.name}: seed {req.seed}, {req.prompt!r}"
                      + (f", reference {req.references[0]}" if req.references else "")):
                results.append((req, client.generate(req.prompt, width=SIZE[0], height=SIZE[1], seed=req.seed,
                                                     references=req.references)))
            save_image(results[-1][1], out / f"request-{req.name}.png")
    save_image(results[0][1], image)
    sheet = contact_sheet(results, reference, out / "contact-sheet.png")
    log.info("image written to %s; the four requests side by side with their settings: %s", image, sheet)
    log.info("random weights: every image is noise by design; the sheet shows that prompt, seed and "
             "reference each change it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
