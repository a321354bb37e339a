# recsys-dist:cpu -- the image of the CPU overlays (k8s/components/cpu sets recsys-dist:cpu).
#
#   make image-cpu      # = docker build -f docker/cpu.Dockerfile -t recsys-dist:cpu .   (repo root)
#
# In it: the job code (launcher/, recsys_dist/, shards/), configs/ and the benchmark scripts at
# /workspace/recsys-dist (the pods' workingDir), laid out as in a checkout, and the pinned CPU
# stack of launcher/install.sh -- torch 2.13.0+cpu, fbgemm-gpu-cpu 1.8.0, torchrec 1.9.2 installed
# --no-deps over the fbgemm-gpu shim (so never the CUDA fbgemm-gpu), deepspeed 0.19.8 -- in the
# venv RECSYS_DIST_VENV, first on PATH: `python -m launcher ...` runs with it. Non-root user.
# No credentials are baked in: the pods get the S3 keys from the Secret recsys-dist-s3 at run
# time (k8s/README.md); `docker run` takes them with -e / --env-file.
FROM python:3.11.13-slim-bookworm

# Where launcher/install.sh puts the venv, and the repository root as the pods expect it.
ENV RECSYS_DIST_VENV=/opt/recsys-dist/venv \
    PATH=/opt/recsys-dist/venv/bin:$PATH \
    PYTHONPATH=/workspace/recsys-dist \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# A non-root user owning the venv and the checkout (it writes runs/ and the shim's build files;
# in the pods runs/ and /dev/shm are emptyDirs, writable by any uid).
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash recsys \
 && mkdir -p /opt/recsys-dist /workspace/recsys-dist/launcher/fbgemm_gpu_shim \
 && chown -R recsys:recsys /opt/recsys-dist /workspace/recsys-dist
USER 10001:10001
WORKDIR /workspace/recsys-dist

# 1) The install. Only its inputs come first, so this layer (the whole pip stack) is rebuilt
#    when a pin changes, not on every code change.
COPY --chown=10001:10001 pyproject.toml requirements.txt README.md ./
COPY --chown=10001:10001 launcher/install.sh launcher/install.sh
COPY --chown=10001:10001 launcher/fbgemm_gpu_shim/pyproject.toml launcher/fbgemm_gpu_shim/pyproject.toml
# torch's CPU build (2.13.0+cpu) comes from PyTorch's CPU wheel index; everything else from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN RECSYS_DIST_CUDA=0 TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash launcher/install.sh \
 && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"

# 2) What the jobs read: the packages, the configs (the k8s pods mount the configs ConfigMap over
#    this copy) and the benchmark scripts. .dockerignore keeps out runs/, shards_out/,
#    benchmarks/out/, caches and .git.
COPY --chown=10001:10001 launcher/ launcher/
COPY --chown=10001:10001 recsys_dist/ recsys_dist/
COPY --chown=10001:10001 shards/ shards/
COPY --chown=10001:10001 configs/ configs/
COPY --chown=10001:10001 benchmarks/ benchmarks/
# The editable install again, now that the packages are here (step 1 registered none), then
# the stack as the jobs import it.
RUN python -m pip install --disable-pip-version-check --no-deps -e . \
 && python -m pip check \
 && python -c "import launcher, recsys_dist, shards, torchrec, fbgemm_gpu, deepspeed"

CMD ["python", "-m", "launcher", "--help"]
