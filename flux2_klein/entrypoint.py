"""`python -m flux2_klein.entrypoint`: the serving container's documented command (Dockerfile, compose,
Kubernetes, README). The entrypoint itself is the `flux2_klein.container` package."""

import sys

from .container.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
