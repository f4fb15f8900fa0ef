"""The service around a run: MLflow tracking and the registered model, Prefect submission. Imported
only by tracked runs, so `import compress` and plain runs never load Prefect or MLflow."""
