#!/usr/bin/env bash
# Write docker/.env for the single-host stack: fresh random secrets and your UID/GID, so that
# `docker compose -f docker/docker-compose.yaml up` finds every variable it requires.
# Never overwrites an existing file or a value in it: run on a .env from an older version, it
# adds only the variables that file lacks (say MLflow's account), and refuses when none is missing.
# docker/.gitignore keeps .env out of git.
set -euo pipefail
env_file="$(cd "$(dirname "$0")" && pwd)/.env"
# Hex only: the values go into URIs (the PostgreSQL password) and an ini file (the MLflow
# password) and need no escaping there.
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
umask 077

# Every variable, each after the comment lines that explain it.
entries() {
    cat <<ENV
# Ray token authentication: every node, driver and job CLI of the cluster presents this token.
RAY_AUTH_TOKEN=$(random_hex 32)
# MLflow's PostgreSQL database.
POSTGRES_PASSWORD=$(random_hex 24)
# The MLflow server's account (its basic-auth admin, created at the server's first start): every
# Ray node signs in with it, and so do you: in a shell as these two variables, in a browser at its
# prompt. Then the server's CSRF key.
MLFLOW_TRACKING_USERNAME=ddpm
MLFLOW_TRACKING_PASSWORD=$(random_hex 24)
MLFLOW_FLASK_SERVER_SECRET_KEY=$(random_hex 32)
# MinIO's root credentials; the Ray nodes and MLflow use them as their AWS keys.
MINIO_ROOT_USER=ddpm
MINIO_ROOT_PASSWORD=$(random_hex 24)
# The images' user: files the head writes into the bind-mounted repository stay yours.
DDPM_UID=$(id -u)
DDPM_GID=$(id -g)
ENV
}

if [[ ! -e "$env_file" ]]; then
    {
        echo "# Single-host stack secrets (docker/docker-compose.yaml); written by docker/new-env.sh."
        entries
    } >"$env_file"
    echo "wrote $env_file"
    exit 0
fi

added=()
comments=""
# A last line without its newline would run into the first added one.
if [[ -s "$env_file" && -n "$(tail -c 1 "$env_file")" ]]; then
    echo >>"$env_file"
fi
while IFS= read -r line; do
    if [[ "$line" == \#* ]]; then
        comments+="$line"$'\n'
        continue
    fi
    name="${line%%=*}"
    if ! grep -q "^${name}=" "$env_file"; then
        printf '%s%s\n' "$comments" "$line" >>"$env_file"
        added+=("$name")
    fi
    comments=""
done < <(entries)
if ((${#added[@]} == 0)); then
    echo "$env_file exists and has every variable; delete it first to start over with new secrets" >&2
    exit 1
fi
echo "added ${added[*]} to $env_file; its other values are unchanged"
