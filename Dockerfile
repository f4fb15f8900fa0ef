# A compress worker: serves the Prefect flow that runs submitted recipes.
#
# Not built here (this machine has no Docker engine); it only repeats what scripts/install.sh and
# the README do. Configuration is by environment only, as on a workstation:
#   PREFECT_API_URL      the Prefect server to take flow runs from (required in a container)
#   MLFLOW_TRACKING_URI  the MLflow server runs are tracked on (required: the container's own
#                        sqlite default would vanish with it)
#   COMPRESS_HOME        stored steps and outputs; mount a volume here to keep them
#
#   docker build -t compress-worker .
#   docker run -e PREFECT_API_URL=http://prefect:4200/api -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#              -v compress-data:/data compress-worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMPRESS_HOME=/data
WORKDIR /opt/compress

# torch first, the CPU build: an unpinned torch would pull several GB of CUDA libraries
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY compress ./compress
COPY flows ./flows
COPY recipes ./recipes
RUN pip install ".[postgres]"

VOLUME /data
CMD ["compress", "serve", "--limit", "2"]
