# The `pfstorer-mlflow:latest` image of infra/k8s/mlflow.yaml: the MLflow server plus the
# PostgreSQL driver and boto3 for the S3 artifact store.
#   docker build -f infra/docker/mlflow.Dockerfile -t <registry>/pfstorer-mlflow:<version> infra/docker
# Keep the MLflow version equal to (or newer than) the clients' mlflow-skinny.
# Not built in CI (no container runtime there): treat as a starting point.
FROM ghcr.io/mlflow/mlflow:v3.17.2
ENV MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PIP_NO_CACHE_DIR=1
RUN pip install psycopg2-binary boto3
EXPOSE 5000
