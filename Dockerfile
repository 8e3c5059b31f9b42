# syntax=docker/dockerfile:1
#
# Compactor's images: one Dockerfile, two targets.
#
#   docker build -t compactor .                                  # default target: gateway AND workers
#   docker build --target gateway -t compactor-gateway .          # torch-free, gateway only
#
# The default image (the last stage, `compactor`) holds everything, pinned by pyproject.toml:
# torch==2.14.1 and torchvision==0.29.1. On x86-64, PyPI's torch 2.14.1 wheel is the CUDA build
# (with its nvidia-* runtime wheels), so this one image runs CPU workers anywhere and GPU workers
# under the NVIDIA container runtime, and it runs the gateway too (its default CMD).
#
# Choice for the gateway: docker-compose.yml builds the `gateway` target instead. The gateway
# never imports torch (launcher/cli.py and service/ are torch-free: uploads are checked with
# pickletools and zip/npy headers, jobs go to the workers by Celery task name), so its image
# leaves out torch, torchvision, torch-pruning, safetensors, timm, onnx, onnxscript and
# onnxruntime: a few hundred MB instead of
# several GB, faster to pull and restart, and far less code in the one container that faces the
# network. Same source, same pins for everything else: deploy/requirements.py splits
# pyproject.toml's dependency list (one source of truth), the project itself is installed with
# --no-deps, and tests/test_deploy.py checks that the gateway starts with the left-out packages
# impossible to import.
#
# Build: dependencies go into a venv (/opt/venv) in builder stages, installed before the source is
# copied so that a code change does not reinstall torch; the final stages copy only that venv
# (the project is installed into it, non-editable). No compilers, no pip cache, no tests in the
# image; runs as an unprivileged user (uid 10001); data in the /data volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# -- builders ---------------------------------------------------------------------------------

FROM python-base AS deps-gateway
WORKDIR /build
RUN python -m venv /opt/venv
COPY pyproject.toml deploy/requirements.py ./
RUN python requirements.py pyproject.toml reqs \
 && pip install -r reqs/gateway.txt

FROM deps-gateway AS deps-full
# Both lists in one resolve, so the torch stack cannot silently move a gateway pin.
RUN pip install -r reqs/gateway.txt -r reqs/torch.txt

FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY compactor /src/compactor
COPY launcher /src/launcher
COPY service /src/service
COPY worker /src/worker

FROM deps-gateway AS build-gateway
COPY --from=source /src /build/src
RUN pip install --no-deps /build/src

FROM deps-full AS build-full
COPY --from=source /src /build/src
RUN pip install --no-deps /build/src

# -- runtime ----------------------------------------------------------------------------------

FROM python-base AS runtime
RUN groupadd --system --gid 10001 compactor \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/compactor \
      --shell /usr/sbin/nologin compactor \
 && mkdir /data \
 && chown 10001:10001 /data
# Job store (embedded mode), uploads and artifacts. A new named volume mounted here starts with
# this directory's owner, so the unprivileged user can write to it.
ENV COMPACTOR_DATA_DIR=/data
VOLUME ["/data"]
WORKDIR /home/compactor
USER 10001:10001
EXPOSE 8000
# Liveness of the gateway (slim images have no curl). Workers listen on no port: compose gives
# them their own check; with plain `docker run` of a worker, pass --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# The gateway refuses to listen on 0.0.0.0 without API keys: set COMPACTOR_API_KEYS (or
# COMPACTOR_API_KEYS_FILE). Workers: `compactor worker [--gpu 0]`.
CMD ["compactor", "gateway", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS gateway
COPY --from=build-gateway /opt/venv /opt/venv

# Default target: last in the file.
FROM runtime AS compactor
COPY --from=build-full /opt/venv /opt/venv
