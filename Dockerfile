ARG BASE_IMAGE=python:3.11-slim
# bnserve serving image: gRPC (Open Inference Protocol) on 8001, Prometheus metrics on 8002.
#
#   docker build -t bnserve .                                   # on python:3.11-slim
#   docker build --build-arg BASE_IMAGE=local/bnserve-base .    # any base with python3 (3.11)
#                                                               # and its venv module
#   docker run --rm -p 8001:8001 -p 8002:8002 bnserve
#   docker run --rm -v "$PWD/my_repo:/models:ro" bnserve        # serve your own repository
#   docker run --rm -p 8001:8001 bnserve --frontend python      # the Python front end (the
#                                                               # default is the C++ one when
#                                                               # every flag suits it: docs/native.md)
#
# Settings come from BNSERVE_* variables (server/config.py) and flags appended to `docker run`
# (flags win). Change the gRPC port with -e BNSERVE_PORT=..., not --port: the HEALTHCHECK reads
# BNSERVE_PORT. Only the serving install goes in (no torch): see docs/deploy.md.

FROM ${BASE_IMAGE} AS build
# The build reaches PyPI the way the host does: pass the host's index/proxy settings as build
# args (deploy/docker-ci.sh does). Empty = pip's defaults. Build args never reach the runtime
# stage.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_DEFAULT_TIMEOUT=120
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# `python3 -m venv` works on both bases (python:3.11-slim: /usr/local/bin/python3; Debian:
# /usr/bin/python3 with python3-venv). The runtime stage has the same python at the same path.
RUN python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    && python3 -m venv /opt/bnserve
WORKDIR /src
# Dependencies first, from the serving lock alone (exact versions, hashes checked; `make lock`):
# this layer stays cached while sources change. setuptools, bnserve's build backend, is in it.
COPY requirements-serve.txt ./
RUN /opt/bnserve/bin/pip install --require-hashes -r requirements-serve.txt
COPY pyproject.toml ./
COPY README.md cli.py __init__.py py.typed ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY training/ training/
# The package itself (serving dependencies only; the `train` extra is not installed), then trim
# what serving never runs: pip/setuptools, test suites and onnx's backend test data.
RUN /opt/bnserve/bin/pip install --no-deps --no-build-isolation . \
    && /opt/bnserve/bin/python -c 'import bnserve.server.app, onnxruntime, grpc' \
    && /opt/bnserve/bin/pip uninstall -y pip setuptools \
    && sp=/opt/bnserve/lib/python3.11/site-packages \
    && rm -rf "$sp"/onnx/backend/test/data "$sp"/onnx/test "$sp"/numpy/*/tests "$sp"/numpy/tests \
              "$sp"/onnxruntime/transformers "$sp"/onnxruntime/quantization "$sp"/onnxruntime/tools \
    && ! /opt/bnserve/bin/python -c 'import torch' 2>/dev/null \
    && /opt/bnserve/bin/python -c 'import bnserve.server.app, bnserve.cli, onnxruntime, onnx'

# The native front end (`--frontend native`, docs/native.md): built against the venv above (it
# links that venv's libonnxruntime), with gRPC C++ from Debian; compilers stay in this stage.
FROM ${BASE_IMAGE} AS native
COPY --from=build /opt/bnserve /opt/bnserve
WORKDIR /src
COPY proto/inference.proto proto/
COPY server/native/ server/native/
RUN VENV=/opt/bnserve OUT=/opt/bnserve/native BNSERVE_NATIVE_CACHE=/tmp/native-cache \
        bash server/native/build.sh \
    && rm -rf /opt/bnserve/native/*.o /opt/bnserve/native/gen /opt/bnserve/native/proto \
    && /opt/bnserve/native/bnserve_native --help 2>&1 | grep -q plan

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="bnserve" \
      org.opencontainers.image.description="frozen BatchNorm ONNX models over gRPC (Open Inference Protocol)"
# gRPC C++'s runtime libraries, for the native front end only (the Python one needs none).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libgrpc++1.51 libprotobuf32 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=build /opt/bnserve /opt/bnserve
COPY --from=native /opt/bnserve/native /opt/bnserve/native
COPY model_repository/ /models/
# Non-root, numeric (Kubernetes runAsNonRoot can verify it); no /etc/passwd entry needed.
USER 10001:10001
ENV PATH=/opt/bnserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    BNSERVE_REPO=/models \
    BNSERVE_HOST=0.0.0.0 \
    BNSERVE_PORT=8001 \
    BNSERVE_METRICS_PORT=8002 \
    BNSERVE_GRACE=10 \
    BNSERVE_NATIVE_BIN=/opt/bnserve/native/bnserve_native
WORKDIR /tmp
EXPOSE 8001 8002
# A shell here is fine (it is not PID 1); it lets the probe follow BNSERVE_PORT.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD bnserve health --target "127.0.0.1:${BNSERVE_PORT:-8001}" --timeout 3 || exit 1
STOPSIGNAL SIGTERM
# Exec form: bnserve is PID 1 and gets SIGTERM itself (graceful drain within BNSERVE_GRACE).
# Give `docker stop -t` more than the grace period (default 10 s): e.g. `docker stop -t 30`.
ENTRYPOINT ["bnserve", "serve"]
CMD []
