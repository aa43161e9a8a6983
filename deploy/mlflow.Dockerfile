# MLflow tracking server for deploy/docker-compose.yml: the same MLflow release as the platform's
# clients (uv.lock), plus the PostgreSQL driver and boto3 for the S3 (MinIO) artifact store.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

RUN pip install --no-cache-dir \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary>=2.9,<3" \
        "boto3>=1.34,<2" \
    && useradd --system --uid 10002 --home-dir /mlflow --create-home mlflow

USER mlflow
WORKDIR /mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
