# Three images. None is built in CI: this machine has no Docker engine.
#
# gateway: ftx's serving gateway alone (python -m ftx.gateway), the sidecar of the Kubernetes manifests that
#   `ftx serve k8s` renders: docker build --target gateway -t ftx-gateway:0.1.0 .
FROM python:3.11-slim AS gateway
WORKDIR /opt/ftx
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home ftx
USER 10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "ftx.gateway"]

# train: the workers of a multi-node training Job (`ftx train RECIPE --k8s-job job.yaml`) on CUDA nodes: PyTorch's
# CUDA image, ftx's training stack and DeepSpeed (its ops compile at first use).
#   docker build --target train -t ftx-train:0.1.0 .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel AS train
WORKDIR /opt/ftx
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir ".[train]" && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
ENV HF_HUB_OFFLINE=1

# ftx (default target): the whole CPU toolchain (the same setup script as `make setup`).
#   docker build -t ftx . && docker run --rm -it -p 127.0.0.1:8080:8080 ftx recipe run recipes/quickstart.yaml
FROM python:3.11-slim AS ftx
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake ninja-build git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ftx
COPY . .
ENV FTX_CACHE=/opt/ftx-cache HF_HUB_OFFLINE=1
# torch: the CPU wheel index keeps the image small (the dev machines take a local torch 2.13.0 CPU wheel)
RUN PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup_env.sh
ENV PATH=/opt/ftx/.venv/bin:$PATH
ENTRYPOINT ["ftx"]
CMD ["--help"]
