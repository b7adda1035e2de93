# CPU image of ftx (the same setup script as `make setup`). Not built in CI: this machine has no Docker engine.
#   docker build -t ftx . && docker run --rm -it -p 127.0.0.1:8080:8080 ftx recipe run recipes/quickstart.yaml
FROM python:3.11-slim
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
