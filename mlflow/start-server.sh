#!/usr/bin/env bash
# Start an MLflow tracking server for compress (the team setup; alone, compress needs no server).
#
#   MLFLOW_BACKEND_STORE_URI   where runs and the model registry live
#                              default: sqlite:///$COMPRESS_HOME/mlflow-server.db
#                              team:    postgresql+psycopg2://USER@HOST:PORT/DB   (see postgres-dev.sh;
#                                       pip install "compress[postgres]")
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go; clients upload through the server
#                              default: $COMPRESS_HOME/mlflow-artifacts   (an s3:// or gs:// URI works too)
#   MLFLOW_HOST / MLFLOW_PORT  default 127.0.0.1 / 5000
#
# Then point every compress process at it: export MLFLOW_TRACKING_URI=http://HOST:PORT
# One worker: a sqlite store serialises writes anyway, and each worker costs ~0.7 GB of memory.
set -euo pipefail
home="${COMPRESS_HOME:-$HOME/.compress}"
mkdir -p "$home"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow-server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$home/mlflow-artifacts}"
# The server's job runner (huey consumers, ~1.7 GB) serves GenAI evaluation jobs, which compress does not use.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "${PYTHON:-python}" -m mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}"
