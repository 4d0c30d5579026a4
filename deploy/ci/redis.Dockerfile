# Redis for `make compose-test` on a machine that cannot pull redis:7.4-alpine: Debian's redis-server on
# the local base image (deploy/ci/compose_test.py builds both). It matches what deploy/docker-compose.yml
# expects of the official image: `redis-server` and `redis-cli` on the PATH, /data owned by 999:1000.
ARG BASE_IMAGE=pso-ci/debian:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# DL3008: the package follows the base's Debian release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown 999:1000 /data
WORKDIR /data
USER 999:1000
CMD ["redis-server"]
