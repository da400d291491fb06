-- First start only: MLflow gets its own role and database on the same PostgreSQL, with POSTGRES_PASSWORD
-- (read by psql from the environment; nothing secret in this file).
\getenv pw POSTGRES_PASSWORD
CREATE ROLE mlflow LOGIN PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
