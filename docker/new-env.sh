#!/usr/bin/env bash
# Write docker/.env for the single-host stack: fresh random secrets and your UID/GID, so that
# `docker compose -f docker/docker-compose.yaml up` finds every variable it requires.
# Never overwrites an existing file. docker/.gitignore keeps .env out of git.
set -euo pipefail
env_file="$(cd "$(dirname "$0")" && pwd)/.env"
if [[ -e "$env_file" ]]; then
    echo "$env_file exists; delete it first to start over with new secrets" >&2
    exit 1
fi
# Hex only: the values go into URIs (the PostgreSQL password) and need no escaping there.
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
umask 077
cat >"$env_file" <<ENV
# Single-host stack secrets (docker/docker-compose.yaml); written by docker/new-env.sh.
# Ray token authentication: every node, driver and job CLI of the cluster presents this token.
RAY_AUTH_TOKEN=$(random_hex 32)
# MLflow's PostgreSQL database.
POSTGRES_PASSWORD=$(random_hex 24)
# MinIO's root credentials; the Ray nodes and MLflow use them as their AWS keys.
MINIO_ROOT_USER=ddpm
MINIO_ROOT_PASSWORD=$(random_hex 24)
# The images' user: files the head writes into the bind-mounted repository stay yours.
DDPM_UID=$(id -u)
DDPM_GID=$(id -g)
ENV
echo "wrote $env_file"
