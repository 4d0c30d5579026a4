#!/bin/sh
# Writes the compose deployment's secrets (deploy/docker-compose.yml) into $PSO_SECRETS_DIR (default
# secrets/ at the repository root):
#   redis-password, reward-token   random (48 hex digits), kept if they exist already
#   hf-token                       $HF_TOKEN if set, else empty (no token); kept if it exists already
# The folder is private to you (0700); the files are 0644 because compose bind-mounts them as they are
# and the services read them as their own users (pso 10001, redis 999), not as you.
set -eu
# a relative PSO_SECRETS_DIR is read from deploy/, as compose reads it (deploy/docker-compose.yml's folder)
dir=${PSO_SECRETS_DIR:-../secrets}
case $dir in
    /*) ;;
    *) dir=$(dirname "$0")/$dir ;;
esac
mkdir -p "$dir"
chmod 700 "$dir"
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
for name in redis-password reward-token hf-token; do
    file=$dir/$name
    if [ -e "$file" ]; then
        echo "kept    $file"
        continue
    fi
    case $name in
        hf-token) printf '%s' "${HF_TOKEN:-}" > "$file" ;;
        *) random > "$file" ;;
    esac
    chmod 644 "$file"
    echo "written $file"
done
