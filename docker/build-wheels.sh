#!/usr/bin/env bash
# Builds wheels for zeal-asgi (from source: the Cython extension is compiled here) and every
# dependency of its "example" extra into DEST, for an offline install in the runtime image.
# The Dockerfile's build stage runs exactly this; it uses the same build-dependency check as CI.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: docker/build-wheels.sh DEST}
PY=${PYTHON:-python3}

bash scripts/ensure-build-deps.sh
"$PY" -m pip wheel --no-cache-dir --wheel-dir "$DEST" ".[example]"
