"""registry: MLflow tracking and model versions, one way for online and federated code alike."""
