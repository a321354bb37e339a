# recsys-dist:gpu -- the image of the GPU overlays (k8s/components/gpu sets recsys-dist:gpu).
#
#   make image-gpu      # = docker build -f docker/gpu.Dockerfile -t recsys-dist:gpu .   (repo root)
#
# The same layout as docker/cpu.Dockerfile (the repository at /workspace/recsys-dist, the venv
# RECSYS_DIST_VENV first on PATH, a non-root user, no credentials) with the CUDA stack of
# launcher/install.sh (RECSYS_DIST_CUDA=1): the requirements.txt pins without fbgemm-gpu-cpu,
# the CUDA fbgemm-gpu 1.8.0 and torchrec 1.9.2 with its dependencies.
#
# CUDA 13.0 throughout: torch 2.13.0 from PyPI is the CUDA 13.0 build (it requires
# cuda-toolkit==13.0.3), fbgemm-gpu 1.8.0 from PyPI is built against it (libcudart.so.13), and
# the base image is the CUDA 13.0.3 runtime. The node's driver must support CUDA 13.0
# (>= 580). torch brings its own CUDA libraries as wheels; the base adds the CUDA runtime and
# the container toolkit's settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES).
FROM nvidia/cuda:13.0.3-runtime-ubuntu24.04

# Python 3.11, the interpreter of the CPU image and of the tested venv: Ubuntu 24.04 ships
# 3.12 only, so it comes from the deadsnakes PPA.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/*

# Where launcher/install.sh puts the venv, and the repository root as the pods expect it.
ENV RECSYS_DIST_VENV=/opt/recsys-dist/venv \
    PATH=/opt/recsys-dist/venv/bin:$PATH \
    PYTHONPATH=/workspace/recsys-dist \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# A non-root user owning the venv and the checkout (uid 10001: the base's "ubuntu" user has 1000).
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
# GPU mode of install.sh (there is no GPU at build time, so it is not detected: set it). PyPI's
# torch is already the CUDA 13.0 build; TORCH_INDEX_URL (empty) can add an index if needed.
ARG TORCH_INDEX_URL=
RUN PYTHON=python3.11 RECSYS_DIST_CUDA=1 TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash launcher/install.sh \
 && python -c "import torch; v = (torch.__version__, torch.version.cuda); assert v[0].split('+')[0] == '2.13.0' and (v[1] or '').startswith('13.0'), v"

# 2) What the jobs read: the packages, the configs (the k8s pods mount the configs ConfigMap over
#    this copy) and the benchmark scripts. .dockerignore keeps out runs/, shards_out/,
#    benchmarks/out/, caches and .git.
COPY --chown=10001:10001 launcher/ launcher/
COPY --chown=10001:10001 recsys_dist/ recsys_dist/
COPY --chown=10001:10001 shards/ shards/
COPY --chown=10001:10001 configs/ configs/
COPY --chown=10001:10001 benchmarks/ benchmarks/
# The editable install again, now that the packages are here (step 1 registered none). A build
# has no GPU driver, so the CUDA stack is checked by its installed versions, not imported.
RUN python -m pip install --disable-pip-version-check --no-deps -e . \
 && python -m pip check \
 && python -c "import launcher, recsys_dist, shards" \
 && python -c "from importlib.metadata import version as v; got = {p: v(p) for p in ('torchrec', 'fbgemm-gpu', 'deepspeed')}; assert got == {'torchrec': '1.9.2', 'fbgemm-gpu': '1.8.0', 'deepspeed': '0.19.8'}, got"

CMD ["python", "-m", "launcher", "--help"]
