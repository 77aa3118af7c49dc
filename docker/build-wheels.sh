#!/usr/bin/env bash
# Builds the zeal-asgi wheel from source (the Cython extension is compiled here) into DEST, with
# the build backend already installed from the lock: the Dockerfile's build stage installs
# requirements/build.lock first, in a layer of its own, and CI's environment has the same pins
# from requirements/test.lock. No isolated build fetching whatever setuptools is newest.
# The Dockerfile's build stage runs exactly this; it uses the same build-dependency check as CI.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: docker/build-wheels.sh DEST}
PY=${PYTHON:-python3}

bash scripts/ensure-build-deps.sh
"$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir --wheel-dir "$DEST" .
