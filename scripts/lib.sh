# Shell functions shared by scripts/test, scripts/lock and scripts/upgrade-deps (sourced, not run).
# Every environment they make installs from requirements/test.lock with hashes, so a release
# upstream changes nothing here until scripts/upgrade-deps has moved the pins.

# The Python versions the project supports besides the default one (3.11): CI runs a fast subset
# of the suite on each (scripts/test), and pyproject's classifiers list exactly these and 3.11.
EXTRA_PYTHONS=(3.12 3.13)

# The fast subset of pytest arguments run on each of them: the shared-memory core (the C
# extension, segments, multi-process exactness, kill faults), the compiled host-lock path, the
# contract suite over every backend, and every server model once (uvicorn, uvicorn --workers,
# gunicorn with and without --preload, the launcher). This is the one place that selects it.
FAST_SUBSET=(
  tests/core tests/contract tests/locks/test_compiled_path.py tests/locks/test_host_lock.py
  tests/ratelimit/test_compiled.py
  -k "not test_server_models or test_workers_share_one_memory"
  # It runs the interpreter as user nobody, who cannot load pyenv's libpython3.1x under a 0700
  # /root (3.11 gets by only with Debian's own libpython3.11): a machine matter, not a version's.
  --deselect tests/core/test_segments.py::test_e7_mode_owner_and_other_users
)

# find_python VERSION: the path of an interpreter of that minor version (python3.12 on PATH, or
# pyenv's), or nothing. Each candidate is asked for its version: a pyenv shim of a version that
# is not active exists on PATH but does not run.
find_python() {
  local want=$1 candidate
  for candidate in "$(command -v "python$want" 2>/dev/null || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python; do
    [ -x "$candidate" ] || continue
    if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
      = "$want" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# install_lock PYTHON DIR LOCK: a virtualenv at DIR (made by PYTHON if missing) holding every
# package of LOCK, hashes checked. The build backends come first, from requirements/build.lock,
# and LOCK is installed without build isolation: a package published only as source is built by
# those pinned backends, never by whatever release an isolated build would fetch that day.
install_lock() {
  local py=$1 dir=$2 lock=$3
  [ -x "$dir/bin/python" ] || "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --require-hashes -r requirements/build.lock
  "$dir/bin/python" -m pip install -q --require-hashes --no-build-isolation -r "$lock"
}

# make_venv PYTHON DIR: install_lock with requirements/test.lock, then this package built from
# source (editable) by the locked setuptools and Cython, not by whatever an isolated build
# would fetch.
make_venv() {
  local py=$1 dir=$2
  install_lock "$py" "$dir" requirements/test.lock
  "$dir/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
}
