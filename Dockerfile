# One image for every component: its entrypoint is `cai` (cai serve policy|critique|judge,
# cai train, cai topics create, ...).
#
#   docker build -t cai-stack:0.1.0-cpu .                                   # CPU
#   docker build -t cai-stack:0.1.0-cuda --build-arg VARIANT=cuda .          # NVIDIA GPUs
#   docker build -t cai-stack:0.1.0-cpu-model --build-arg WITH_DEFAULT_MODEL=1 .
#
# Where the usual bases cannot be pulled, `make image` builds one from Debian with debootstrap and
# passes it as PYTHON_IMAGE (with CPU_PYTHON=/usr/bin/python3). Behind a TLS-inspecting proxy,
# pass its CA bundle for the downloads during the build: --secret id=ca-bundle,src=BUNDLE.
#
# WITH_DEFAULT_MODEL=1 runs `cai models setup` at build time (as `make model` does) and keeps the
# converted SmolLM2-135M-Instruct in $CAI_HOME=/opt/cai; without it no weights are in the image and
# the services take a model folder mounted into the pod, a hub id, or a TGI/OpenAI-compatible server.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---- the two runtime bases; everything after `base` is the same for both ----------------------

FROM ${PYTHON_IMAGE} AS base-cpu
ARG CPU_PYTHON=/usr/local/bin/python3
ENV CAI_PYTHON=${CPU_PYTHON}

FROM ${CUDA_IMAGE} AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV CAI_PYTHON=/usr/bin/python3

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CAI_HOME=/opt/cai \
    XDG_CACHE_HOME=/var/cache/cai \
    HF_HOME=/var/cache/cai/huggingface
RUN groupadd --system --gid 10001 cai \
 && useradd --system --uid 10001 --gid cai --home-dir /home/cai --create-home --shell /usr/sbin/nologin cai \
 && mkdir -p /var/cache/cai \
 && chown cai:cai /var/cache/cai

# ---- dependencies: only pyproject.toml is copied, so a source change keeps this layer ----------

FROM base AS deps
ARG VARIANT
# The CPU variant takes torch from PyTorch's CPU wheel index (a much smaller image); the CUDA
# variant, or TORCH_INDEX_URL="", takes PyPI's Linux wheel, a CUDA build that also runs on CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.15.0
RUN "$CAI_PYTHON" -m venv "$VIRTUAL_ENV"
WORKDIR /src
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && pip install --upgrade pip \
 && if [ "$VARIANT" = "cpu" ] && [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# ---- the project itself: the same `pip install` and `cai models setup` as `make install model` --

FROM deps AS build
ARG WITH_DEFAULT_MODEL=0
# The converter writes the weights readable by their owner only (root here); the runtime user
# 10001 must read them, hence the chmod.
COPY cai ./cai
COPY services ./services
COPY trainer ./trainer
COPY cli ./cli
COPY constitutions ./constitutions
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && pip install . \
 && mkdir -p "$CAI_HOME" \
 && if [ "$WITH_DEFAULT_MODEL" = "1" ]; then cai models setup; fi \
 && chmod -R a+rX "$CAI_HOME" \
 && cai --help > /dev/null

# ---- runtime: the virtualenv and $CAI_HOME, no sources, no compilers, a non-root user -----------

FROM base AS runtime
LABEL org.opencontainers.image.title="cai-stack" \
      org.opencontainers.image.description="Constitutional AI services, stream stages and trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cai /opt/cai
WORKDIR /home/cai
USER 10001:10001
EXPOSE 50051 50052 50053 9091 9092 9093 8081
ENTRYPOINT ["cai"]
CMD ["--help"]
