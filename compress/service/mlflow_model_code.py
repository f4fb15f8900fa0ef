"""Models-from-code entry point for MLflow: the registered model is built from this file, not
unpickled (see compress/mlflow_model.py)."""

import mlflow.models

from compress.service.mlflow_model import CompressedModel

mlflow.models.set_model(CompressedModel())
