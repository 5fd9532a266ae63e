#!/bin/sh
# Entry point of the Tether images: prepare per-container state, then become the command.
set -eu

# prometheus_client's multiprocess mode keeps one file per process in this directory; files
# left by the processes of a previous run of the container would be added to the new figures.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    rm -rf "${PROMETHEUS_MULTIPROC_DIR}"
    mkdir -p "${PROMETHEUS_MULTIPROC_DIR}"
fi

# exec: the command replaces this shell as PID 1, so `docker stop`'s SIGTERM reaches it (Celery
# then stops taking jobs and finishes or gives back the current one; uvicorn drains connections).
exec "$@"
