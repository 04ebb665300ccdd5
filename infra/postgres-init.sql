-- Prefect's database next to MLflow's (POSTGRES_DB), as infra/services.sh creates both.
CREATE DATABASE prefect;
