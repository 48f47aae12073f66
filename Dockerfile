# syntax=docker/dockerfile:1
# nexlify-train: the controller (`nexlify train --executor kubernetes`) and the workers
# (`nexlify worker train`) run from this one image. Build: docker build -t nexlify-train:0.1.0 .

# The base is pinned by tag, not by a floating "latest": it fixes the CUDA runtime (12.4, drivers >= 550),
# cuDNN 9, Python 3.11 (pyproject needs >= 3.11) and the torch build (2.5.1 >= pyproject's 2.4), so a
# rebuild gives the same stack. Pin by digest too where your registry policy asks for it
# (--build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime@sha256:...).
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ---- builder: the project's wheel, nothing else ---------------------------------------------------
FROM ${BASE_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nexlify ./nexlify
COPY controller ./controller
# --no-deps: only our own (pure-Python) wheel; the dependencies come pinned in the runtime stage.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime --------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="nexlify-train" \
      org.opencontainers.image.description="Train reinforcement-learning crypto-trading agents as a resumable pipeline, locally or as Kubernetes Jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/nexlify/nexlify-train" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Caches (torch, pip) go to /tmp: the chart mounts an emptyDir there and makes / read-only. numba's kernels
# are compiled at the build into NUMBA_CACHE_DIR, owned by the image's user; where / is read-only, the first
# kernel copies them into $XDG_CACHE_HOME/numba (nexlify.env.fused_portfolio.seed_cache_dir) and uses them there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    NUMBA_CACHE_DIR=/home/nexlify/.cache/numba \
    NEXLIFY_LOG_FORMAT=auto \
    PATH=/opt/nexlify/bin:${PATH}

# A virtual environment that sees the base image's site-packages (torch with CUDA) but holds our
# pinned dependencies itself, so they never replace or fight the base image's own packages.
# 1. the exact closure of our dependencies (--no-deps: the file IS the resolution; torch is not in it);
# 2. our wheel with --no-index: pip must find every requirement already satisfied (torch by the base
#    image, the rest by step 1), so an incomplete lock fails the build here instead of at run time.
COPY requirements/docker.txt /tmp/requirements-docker.txt
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --system-site-packages /opt/nexlify \
    && /opt/nexlify/bin/python -m pip install --no-cache-dir --no-deps -r /tmp/requirements-docker.txt \
    && /opt/nexlify/bin/python -m pip install --no-cache-dir --no-index --find-links /wheels nexlify-train \
    && rm /tmp/requirements-docker.txt \
    && nexlify --help > /dev/null

# uid/gid 10001: controller.config.RUN_AS_ID, which the chart's securityContexts also use (tests/test_defaults.py)
RUN groupadd --gid 10001 nexlify \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/nexlify --shell /usr/sbin/nologin nexlify
USER 10001:10001
WORKDIR /home/nexlify

# The environment's kernels compiled now, as the user that runs them, so that no run starts with minutes of
# compiling: the serial build (one thread, the default) and the threaded one (--threads > 1, 4,096 episodes or
# more), on the bundled candles. numba's cache is per CPU model: a node with another CPU compiles once more.
RUN nexlify bench env --pairs BTC/USDT --batch-size 1 --steps 1 --json > /dev/null \
    && nexlify bench env --pairs BTC/USDT --batch-size 4096 --steps 1 --threads 2 --json > /dev/null \
    && test -n "$(find "${NUMBA_CACHE_DIR}" -name '*.nbi' -print -quit)"

ENTRYPOINT ["nexlify"]
CMD ["--help"]
