"""The serving container's entrypoint: `python -m flux2_klein.entrypoint` (the documented command; also
`python -m flux2_klein.container`).

On each start, in order:

1. settings from the environment (`settings.ENV_VARS`; `--help` prints them);
2. the checkpoint mounted at FLUX2_KLEIN_CHECKPOINT is checked: exit 2 with the reason when it is missing
   or not a FLUX.2 [klein] checkpoint;
3. a profile key (`profile.py`) names what a built repository depends on: the target (GPU, compute
   capability, TensorRT), the precision, the runtime, fingerprints of the checkpoint and of the code that
   writes repositories;
4. `<cache>/<key>/repository` is reused when complete and built for exactly that profile, else built in a
   temporary folder and renamed into place under a lock (`cache.py`): a build killed midway leaves no half
   repository that looks finished, and replicas sharing a cache volume build each profile once;
5. tritonserver and the HTTP gateway run as children (`supervisor.py`). If either exits, the other is
   stopped and we exit non-zero; SIGTERM or SIGINT stops both (SIGTERM, then SIGKILL after
   FLUX2_KLEIN_STOP_TIMEOUT seconds) and we exit 0.

Exit status: 0 stopped on request; 1 a build or a child failed (a child's own status when it had one);
2 a setting, the checkpoint or the cache is unusable; 128+N stopped by signal N during a build.
`--build-only` does steps 1-4 and prints the repository's path; `--healthcheck` exits 0 when the gateway
answers /v1/health/ready (Docker's HEALTHCHECK).
"""
