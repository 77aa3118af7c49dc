#!/usr/bin/env bash
# Makes sure this machine can compile the extension: a C compiler, the Python headers and venv.
# On a fresh Debian machine these come from apt (build-essential, python3-dev, python3-venv).
set -euo pipefail

PY=${PYTHON:-python3}
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || missing+=(python3-dev)
"$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "zeal-asgi: missing ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "zeal-asgi: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
