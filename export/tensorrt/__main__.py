"""`python -m flux2_klein.export.tensorrt --check [--flavour F] [--version V]`: the container image's
install check (docker/Dockerfile step 3, bench/h100_tensorrt.sh): TensorRT's Python API imports, its wheel and
the libnvinfer it loaded are one version, and a Builder parses a graph where a GPU is visible."""

from __future__ import annotations

import argparse
import sys

from .library import FLAVOURS, BuildError, check_install, import_trt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux2_klein.export.tensorrt",
                                description="Check that TensorRT's Python API is installed and works.")
    p.add_argument("--check", action="store_true", required=True)
    p.add_argument("--flavour", choices=tuple(FLAVOURS), default=None)
    p.add_argument("--version", default=None, help="the exact TensorRT version required")
    args = p.parse_args(argv)
    try:
        print(check_install(import_trt(args.flavour), args.version))
    except (ImportError, BuildError) as e:
        print(f"TensorRT check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
