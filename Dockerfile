# syntax=docker/dockerfile:1
# The illava-tune image. docker-compose.yml runs the schedule service (api), the Ray head and the
# GPU Ray worker from it; only the torch build differs between them (TORCH_INDEX_URL).
#   docker build -t illava-tune:cpu .
#   docker build -t illava-tune:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# CPU wheels by default; a GPU node builds with the CUDA index its driver supports.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# The same Ray in every container: a head turns away nodes and drivers of another Ray version.
ARG RAY_VERSION=2.60.0
# "" or "[cuda]" (flash-attn; without a matching prebuilt wheel it compiles, which needs nvcc, so a
# CUDA "devel" PYTHON_IMAGE; everything works without it).
ARG ILLAVA_EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch alone and first, from its own index, so that the range in pyproject.toml is already met by
# this build when the project installs (PyPI's torch for Linux is a CUDA build).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's dependencies in their own layer, so an edit to the code does not reinstall them;
# ray[default] adds what the dashboard and the per-node agent of `ray start` need.
COPY pyproject.toml /tmp/illava-deps/pyproject.toml
RUN python -c "import tomllib; f = open('/tmp/illava-deps/pyproject.toml', 'rb'); print(*tomllib.load(f)['project']['dependencies'], sep=chr(10))" \
        > /tmp/illava-deps/requirements.txt \
    && pip install "ray[default]==${RAY_VERSION}" -r /tmp/illava-deps/requirements.txt \
    && rm -rf /tmp/illava-deps

# The project itself (a regular install: the packages, the demo checkpoint and the migrations land in
# site-packages, so the source tree is not needed afterwards).
WORKDIR /opt/illava-src
COPY . .
RUN pip install ".${ILLAVA_EXTRAS}" && cd / && rm -rf /opt/illava-src

# Run as an unprivileged user. Its home is the working directory: job drivers write their logs to
# ./.illava-jobs there (docker-compose.yml mounts a volume on it; the directory exists here so that a
# fresh named volume takes over its owner).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin illava
USER illava
ENV HOME=/home/illava
WORKDIR /home/illava
RUN mkdir -p .illava-jobs

EXPOSE 8000 6379 8265
CMD ["illava-tune", "serve", "--host", "0.0.0.0", "--port", "8000"]
