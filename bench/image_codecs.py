"""Image encoders side by side: time and size of PNG (lossless, bit-exactness checked), JPEG and WebP from
every candidate package, on realistic images at 1024x1024 and the two extreme sizes of the 17; the samples of
one request encoded in parallel; reference images decoded in preprocess. Writes report.md and report.json.

    python bench/image_codecs.py --out DIR [--tiny] [--repeat N]

Timing: one core (the process is pinned to it; OpenCV and libvips told to use one thread), the median of N
runs after one warm-up, as the thread's CPU time (what the encode costs, whatever else the machine runs) and
as wall time. Candidates whose package is missing are listed as such, not measured.

One file over 400 lines on purpose: it runs as a script beside the package (images, candidates, measuring and the
report together), and nothing else imports it.

Images (synthetic unless --tiny; none is a real photograph, so read sizes as indicative):
  photo   1/f-spectrum colour noise (the power spectrum of natural images) over a vertical gradient, plus sensor
          noise of sigma 2: hard to compress, like a detailed photograph
  smooth  gradients, soft discs and a gentle texture, sigma 0.5 noise: like a clean render or illustration
  flat    a flat background and flat shapes with anti-aliased edges: a poster, a product shot
  tiny    (--tiny) the tiny checkpoint's image for a prompt, by diffusers' pipeline, which the served image
          equals (tests/test_serving.py); noise-like, it compresses worst
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")  # before pyvips loads: one thread, like every other candidate

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((1024, 1024), (672, 1568), (1568, 672))  # the square and the 17's two extreme aspect ratios
QUALITY = 95  # the client's and the gateway's default JPEG/WebP quality


# -- images --------------------------------------------------------------------------------------------------

def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0

    def field():
        spectrum = rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)
        x = np.fft.irfft2(spectrum / f, s=(height, width))
        return (x - x.mean()) / x.std()

    shared = field()  # colour channels of a photograph are strongly correlated
    x = np.stack([0.8 * shared + 0.4 * field() for _ in range(3)], -1) * 40 + 128
    x += np.linspace(-40, 40, height)[:, None, None] + rng.normal(0, 2, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def smooth(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    x = np.stack([60 + 150 * u, 80 + 120 * v, 200 - 120 * u * v], -1)
    for _ in range(6):  # soft discs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(60, 260)
        x += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-70, 70, 3)
    x += 6 * np.sin(xx / 9.0 + 2 * np.sin(yy / 23.0))[..., None]  # gentle texture
    x += rng.normal(0, 0.5, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def flat(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A poster or product shot: a flat background and flat shapes with anti-aliased edges, where PNG's run
    lengths matter most (a coder without matches spends at least a bit per byte even on a flat area)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    x = np.empty((height, width, 3), np.float32)
    x[...] = (240, 236, 228)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 220)
        inside = np.clip(r - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]  # one pixel of edge blend
        x = x * (1 - inside) + inside * rng.integers(0, 256, 3)
    x[height // 2 - 40:height // 2 + 40, width // 8:7 * width // 8] = (30, 30, 30)  # a bar, as for a caption
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def tiny_images(sizes) -> dict[tuple[int, int], np.ndarray]:
    import tempfile

    import torch
    from diffusers import Flux2KleinPipeline

    from flux2_klein.tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp()) / "tiny", seed=0, distilled=True)
    pipe = Flux2KleinPipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return {(w, h): np.asarray(pipe(prompt="a red fox in fresh snow, telephoto photograph", width=w, height=h,
                                    num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images[0])
            for w, h in sizes}


# -- candidates: name -> (format, package, encode(rgb) -> bytes) --------------------------------------------------

def _pil(rgb, fmt, **options):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **options)
    return buf.getvalue()


def _cv2(ext, *named):
    """OpenCV's imencode with ("IMWRITE_...", value) pairs."""
    import cv2

    cv2.setNumThreads(1)
    params = [v for name, value in named for v in (getattr(cv2, name), value)]
    return lambda rgb: cv2.imencode(ext, rgb[..., ::-1], params)[1].tobytes()  # OpenCV wants BGR


def _libdeflate_png(filter_kind, level):
    import struct

    import deflate

    from flux2_klein.client import codecs

    def encode(rgb):
        h, w, _ = rgb.shape
        idat = deflate.zlib_compress(codecs._filtered(rgb, filter_kind).tobytes(), level)
        head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return b"".join((codecs._SIGNATURE, codecs._chunk(b"IHDR", head), codecs._chunk(b"IDAT", idat),
                         codecs._chunk(b"IEND", b"")))
    return encode


def candidates() -> dict[str, tuple[str, str, object]]:
    from flux2_klein.client import codecs

    out: dict[str, tuple[str, str, object]] = {}

    def add(name, fmt, package, make):
        try:
            out[name] = (fmt, package, make())
        except ImportError as e:
            out[name] = (fmt, package, f"not installed ({e})")

    for level in (0, 1, 3, 6, 9):
        add(f"pillow png level {level}" + (" (default)" if level == 6 else ""), "png", "pillow",
            lambda level=level: lambda x: _pil(x, "PNG", compress_level=level))
    for ctype, what in ((3, "rle"), (2, "huffman")):
        add(f"pillow png level 1 {what}", "png", "pillow",
            lambda ctype=ctype: lambda x: _pil(x, "PNG", compress_level=1, compress_type=ctype))
    for level, strategy, what in ((1, 0, ""), (3, 0, ""), (1, 3, " rle"), (1, 2, " huffman")):
        add(f"opencv png level {level}{what}", "png", "opencv-python-headless",
            lambda level=level, strategy=strategy: _cv2(".png", ("IMWRITE_PNG_COMPRESSION", level),
                                                         ("IMWRITE_PNG_STRATEGY", strategy)))
    for flt, fname in ((16, "sub"), (32, "up")):
        add(f"imagecodecs png level 1 rle {fname}", "png", "imagecodecs",
            lambda flt=flt: (lambda ic: lambda x: ic.png_encode(x, level=1, strategy=3, filter=flt))(
                __import__("imagecodecs")))
    add("imagecodecs spng level 1", "png", "imagecodecs",
        lambda: (lambda ic: lambda x: ic.spng_encode(x, level=1))(__import__("imagecodecs")))
    for flt, fname in ((8, "none"), (16, "sub")):
        add(f"pyvips png compression 1 {fname}", "png", "pyvips + pyvips-binary",
            lambda flt=flt: (lambda v: lambda x: v.Image.new_from_array(x).pngsave_buffer(
                compression=1, filter=flt))(__import__("pyvips")))
    for flt in ("up", "sub", "avg", "paeth"):
        for strategy in ("rle", "huffman"):
            add(f"numpy {flt} + zlib-ng {strategy}" + (" (chosen)" if (flt, strategy) == (
                codecs.PNG_FILTER, codecs.PNG_STRATEGY) else ""), "png", "zlib-ng",
                lambda flt=flt, strategy=strategy: lambda x: codecs.encode_png(x, filter=flt, strategy=strategy))
    add("numpy up + zlib-ng level 1", "png", "zlib-ng",
        lambda: lambda x: codecs.encode_png(x, filter="up", strategy="default", level=1))
    for flt in ("up", "sub"):
        add(f"numpy {flt} + libdeflate level 1", "png", "deflate", lambda flt=flt: _libdeflate_png(flt, 1))

    add("pillow jpeg (default)", "jpeg", "pillow", lambda: lambda x: _pil(x, "JPEG", quality=QUALITY))
    add("simplejpeg", "jpeg", "simplejpeg", lambda: (lambda s: lambda x: s.encode_jpeg(
        x, QUALITY, colorsubsampling="420"))(__import__("simplejpeg")))
    add("simplejpeg fastdct", "jpeg", "simplejpeg", lambda: (lambda s: lambda x: s.encode_jpeg(
        x, QUALITY, colorsubsampling="420", fastdct=True))(__import__("simplejpeg")))
    add("opencv jpeg", "jpeg", "opencv-python-headless", lambda: _cv2(".jpg", ("IMWRITE_JPEG_QUALITY", QUALITY)))
    add("imagecodecs jpeg8", "jpeg", "imagecodecs", lambda: (lambda ic: lambda x: ic.jpeg8_encode(
        x, level=QUALITY, subsampling="420"))(__import__("imagecodecs")))
    add("pyvips jpeg", "jpeg", "pyvips + pyvips-binary", lambda: (lambda v: lambda x: v.Image.new_from_array(
        x).jpegsave_buffer(Q=QUALITY))(__import__("pyvips")))

    for method in range(7):
        add(f"pillow webp method {method}" + (" (default)" if method == 4 else ""), "webp", "pillow",
            lambda method=method: lambda x: _pil(x, "WEBP", quality=QUALITY, method=method))
    add("opencv webp", "webp", "opencv-python-headless", lambda: _cv2(".webp", ("IMWRITE_WEBP_QUALITY", QUALITY)))
    add("imagecodecs webp method 0", "webp", "imagecodecs", lambda: (lambda ic: lambda x: ic.webp_encode(
        x, level=QUALITY, lossless=False, method=0, numthreads=1))(__import__("imagecodecs")))
    add("pyvips webp effort 0", "webp", "pyvips + pyvips-binary", lambda: (lambda v: lambda x: v.Image.new_from_array(
        x).webpsave_buffer(Q=QUALITY, effort=0))(__import__("pyvips")))
    return out


# -- measuring ------------------------------------------------------------------------------------------------

def timed(fn, repeat: int):
    """(median CPU ms of the process, median wall ms, last result) over `repeat` runs after one warm-up."""
    result = fn()
    cpu, wall = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3, result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure_encoders(images, cands, repeat: int) -> list[dict]:
    from flux2_klein.client.codecs import decode

    rows = []
    for (kind, size), rgb in images.items():
        for name, (fmt, package, fn) in cands.items():
            row = {"image": kind, "size": "{}x{}".format(*size), "candidate": name, "format": fmt, "package": package}
            if isinstance(fn, str):
                rows.append({**row, "error": fn})
                continue
            try:
                cpu, wall, data = timed(lambda: fn(rgb), repeat)
                back = decode(data)
            except Exception as e:  # noqa: BLE001 - a candidate that fails is a finding, not the end
                rows.append({**row, "error": f"{type(e).__name__}: {e}"})
                continue
            row.update(cpu_ms=cpu, wall_ms=wall, bytes=len(data))
            if fmt == "png":
                row["bit_exact"] = bool(back.shape == rgb.shape and np.array_equal(back, rgb))
            else:
                row["psnr_db"] = psnr(back, rgb) if back.shape == rgb.shape else None
            rows.append(row)
            print(f"{kind} {row['size']} {name}: {cpu:.1f} ms cpu, {len(data) / 1e6:.2f} MB", file=sys.stderr)
    return rows


def parallel(images, repeat: int) -> list[dict]:
    """1, 2 and 4 images of one request through the codecs' pool (all cores), wall time: what `samples` costs."""
    from flux2_klein.client import codecs

    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    rgb = images[("photo", (1024, 1024))]
    rows = []
    for label, fn in (("png (chosen)", lambda x: codecs.encode(x, "png")),
                      ("jpeg (chosen)", lambda x: codecs.encode(x, "jpeg")),
                      ("webp (chosen)", lambda x: codecs.encode(x, "webp")),
                      ("pillow png default", lambda x: _pil(x, "PNG"))):
        times = {}
        for n in (1, 2, 4):
            arrays = [rgb.copy() for _ in range(n)]
            _, wall, _ = timed(lambda: list(codecs.ENCODE_POOL.map(fn, arrays)), repeat)
            times[n] = wall
        rows.append({"encoder": label, "pool_threads": codecs.ENCODE_POOL._max_workers, "wall_ms": times,
                     "ratio_4_vs_1": times[4] / times[1], "ratio_2_vs_1": times[2] / times[1], **gil_gap(fn, rgb)})
    return rows


def gil_gap(fn, rgb) -> dict:
    """Whether `fn` lets other Python threads run while it encodes: it encodes in a thread while this one runs
    bytecode and records the longest stretch in which it could not. A call that holds the GIL stalls this thread
    for about its whole duration; one that releases it, only for scheduling (or the brief parts that hold it)."""
    import threading

    def longest_stall(work) -> tuple[float, float]:
        done = threading.Event()
        thread = threading.Thread(target=lambda: (work(), done.set()))
        gap, start = 0.0, time.perf_counter()
        last = start
        thread.start()
        while not done.is_set():
            now = time.perf_counter()
            gap, last = max(gap, now - last), now
        thread.join()
        return gap * 1e3, (time.perf_counter() - start) * 1e3

    fn(rgb)
    stalls = [longest_stall(lambda: fn(rgb)) for _ in range(5)]
    gap, wall = min(stalls)  # the least disturbed of five: other processes' scheduling only adds stalls
    return {"longest_stall_ms": gap, "encode_wall_ms": wall, "releases_gil": gap < 0.5 * wall}


def references(repeat: int) -> list[dict]:
    """Preprocess's decode (and resize) of reference images: flux2_klein.request.decode_reference, one by one and
    four on a thread pool."""
    from flux2_klein.request import decode_reference

    rows = []
    for (w, h) in ((1024, 1024), (2048, 1536)):
        src = photo(w, h, seed=3)
        for fmt in ("PNG", "JPEG"):
            data = _pil(src, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            cpu, wall, out = timed(lambda: decode_reference(data, 0), repeat)
            with ThreadPoolExecutor(4) as pool:
                _, wall4, _ = timed(lambda: list(pool.map(decode_reference, [data] * 4, range(4))), repeat)
            rows.append({"reference": f"{w}x{h} {fmt}", "decoded": "x".join(map(str, out.shape[:2][::-1])),
                         "cpu_ms": cpu, "wall_ms": wall, "four_serial_ms": 4 * wall, "four_pool_ms": wall4})
    return rows


# -- report ---------------------------------------------------------------------------------------------------

def choose(rows: list[dict]) -> dict:
    """Per format, the fastest candidate (mean CPU ms over every image) within the size or quality bounds."""
    ok = [r for r in rows if "error" not in r]
    by = {}
    for r in ok:
        by.setdefault(r["candidate"], []).append(r)
    base = {"png": "pillow png level 6 (default)", "jpeg": "pillow jpeg (default)", "webp": "pillow webp method 4 (default)"}
    ref = {(r["image"], r["size"], r["format"]): r for r in ok if r["candidate"] in base.values()}
    out = {}
    for fmt, base_name in base.items():
        stats = []
        for name, rs in by.items():
            if rs[0]["format"] != fmt:
                continue
            refs = [ref[(r["image"], r["size"], fmt)] for r in rs]
            if fmt == "png":
                fits = all(r["bit_exact"] for r in rs) and all(
                    r["bytes"] <= 1.3 * b["bytes"] for r, b in zip(rs, refs))
            else:
                fits = all(r["psnr_db"] >= b["psnr_db"] - 0.5 for r, b in zip(rs, refs))
            stats.append({"candidate": name, "fits": fits, "mean_cpu_ms": statistics.mean(r["cpu_ms"] for r in rs),
                          "max_size_ratio": max(r["bytes"] / b["bytes"] for r, b in zip(rs, refs)),
                          "min_psnr_delta_db": None if fmt == "png" else min(
                              r["psnr_db"] - b["psnr_db"] for r, b in zip(rs, refs))})
        stats.sort(key=lambda s: s["mean_cpu_ms"])
        best = next((s for s in stats if s["fits"]), None)
        out[fmt] = {"fastest_within_bounds": best and best["candidate"], "ranking": stats}
    return out


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [f"# Image encoders side by side ({s['date']})", "",
             f"- machine: {s['machine']}; commit {s['commit']}; load average {s['load_average_start']} at the start, "
             f"{s['load_average_end']} at the end", f"- packages: {s['packages']}",
             f"- one core, median of {s['repeat']} runs after a warm-up; **cpu ms** is the process's CPU time, "
             "all its threads (libvips encodes on a worker thread of its own; robust to other work on a shared "
             "machine), wall ms the elapsed time; JPEG/WebP at quality "
             f"{QUALITY}, 4:2:0; size ratio against Pillow's default for that format on the same image",
             f"- images: {s['images']}", ""]
    for fmt in ("png", "jpeg", "webp"):
        lines += [f"## {fmt.upper()}", "", "| candidate | package | " + " | ".join(
            f"{k} {z}" for k, z in report["image_keys"]) + " |",
            "|---|---|" + "---:|" * len(report["image_keys"])]
        names = list(dict.fromkeys(r["candidate"] for r in report["encoders"] if r["format"] == fmt))
        cell = {(r["candidate"], r["image"], r["size"]): r for r in report["encoders"]}
        for name in names:
            cells = []
            for k, z in report["image_keys"]:
                r = cell.get((name, k, z))
                if r is None or "error" in r:
                    cells.append((r or {}).get("error", "-")[:40])
                    continue
                q = ("exact" if r["bit_exact"] else "**NOT exact**") if fmt == "png" else f"{r['psnr_db']:.2f} dB"
                cells.append(f"{r['cpu_ms']:.1f} ms ({r['wall_ms']:.0f}), {r['bytes'] / 1e6:.2f} MB, {q}")
            pkg = next(r["package"] for r in report["encoders"] if r["candidate"] == name)
            lines.append(f"| {name} | {pkg} | " + " | ".join(cells) + " |")
        c = report["choice"][fmt]
        lines += ["", f"Fastest within bounds ({'bit-exact, size <= 1.3x Pillow default' if fmt == 'png' else 'PSNR >= Pillow default - 0.5 dB'}): "
                  f"**{c['fastest_within_bounds']}**", "", "| candidate | mean cpu ms | max size ratio | min PSNR delta dB | within bounds |",
                  "|---|---:|---:|---:|---|"]
        for st in c["ranking"]:
            d = "" if st["min_psnr_delta_db"] is None else f"{st['min_psnr_delta_db']:+.2f}"
            lines.append(f"| {st['candidate']} | {st['mean_cpu_ms']:.1f} | {st['max_size_ratio']:.2f} | {d} | "
                         f"{'yes' if st['fits'] else 'no'} |")
        lines.append("")
    lines += ["## Samples of one request in parallel", "",
              "Wall ms to encode N copies of the 1024x1024 photo image on the codecs' pool (all cores), median:", "",
              "| encoder | pool threads | 1 | 2 | 4 | 4 / 1 | 2 / 1 | releases the GIL (longest stall of another "
              "thread / encode wall ms) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["parallel"]:
        w = r["wall_ms"]
        lines.append(f"| {r['encoder']} | {r['pool_threads']} | {w[1]:.1f} | {w[2]:.1f} | {w[4]:.1f} | "
                     f"{r['ratio_4_vs_1']:.2f} | {r['ratio_2_vs_1']:.2f} | {'yes' if r['releases_gil'] else '**no**'} "
                     f"({r['longest_stall_ms']:.1f} / {r['encode_wall_ms']:.1f}) |")
    lines += ["", f"With {s['cores']} cores, an encoder that releases the GIL does 2 images in about the time of 1 and "
              f"4 in about {4 / min(4, s['cores']):.1f}x; 4 <= 1.5x one needs 3 or more cores.", "",
              "## Reference images in preprocess (flux2_klein.request.decode_reference)", "",
              "| reference | decoded to | cpu ms | wall ms | 4 one by one ms | 4 on a 4-thread pool ms |",
              "|---|---|---:|---:|---:|---:|"]
    for r in report["references"]:
        lines.append(f"| {r['reference']} | {r['decoded']} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | "
                     f"{r['four_serial_ms']:.1f} | {r['four_pool_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in ("pillow", "zlib-ng", "deflate", "opencv-python-headless", "imagecodecs", "pyvips", "pyvips-binary",
              "simplejpeg", "numpy"):
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return ", ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for report.md and report.json")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (default 5)")
    ap.add_argument("--tiny", action="store_true", help="also the tiny checkpoint's images (diffusers, ~30 s)")
    ap.add_argument("--only", default="", help="comma-separated substrings: measure only matching candidates")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start_load = round(os.getloadavg()[0], 2)
    images = {}
    for w, h in SIZES:
        images[("photo", (w, h))] = photo(w, h)
        images[("smooth", (w, h))] = smooth(w, h)
        images[("flat", (w, h))] = flat(w, h)
    if args.tiny:
        for size, rgb in tiny_images(SIZES).items():
            images[("tiny", size)] = rgb
    cands = candidates()
    if args.only:
        keep = [k for k in cands if any(s in k for s in args.only.split(",")) or "(default)" in k]
        cands = {k: cands[k] for k in keep}
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    encoders = measure_encoders(images, cands, args.repeat)
    par = parallel(images, args.repeat)
    refs = references(args.repeat)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {
        "setup": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit.strip(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
                             f"Python {platform.python_version()}", "cores": os.cpu_count(),
                  "load_average_start": start_load, "load_average_end": round(os.getloadavg()[0], 2),
                  "repeat": args.repeat, "packages": _versions(),
                  "images": "photo, smooth and flat (synthetic, see bench/image_codecs.py)" + (
                      "; tiny (the tiny checkpoint's output)" if args.tiny else "")},
        "image_keys": [[k, "{}x{}".format(*z)] for k, z in images],
        "encoders": encoders, "choice": choose(encoders), "parallel": par, "references": refs,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(markdown(report))
    print(args.out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
