#!/usr/bin/env bash
# Install the system programs the test suite starts or drives (Debian 12, as root):
# redis-server, redis-sentinel, redis-cli, memcached, chromium + chromedriver, wrk, openssl,
# promtool (checks the metrics exposition).
#
# Idempotent: installs only what is missing and runs `apt-get update` only then. The tests start
# their own servers on free loopback ports, so a redis/memcached daemon that the install itself
# started is stopped again (and disabled under systemd); daemons that were already there are
# reported and left alone. Python packages are not this script's business.
#
# Usage: scripts/install-test-deps.sh [--dry-run]
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

log() { printf 'install-test-deps: %s\n' "$*"; }

# binary:package
REQUIRED=(
  redis-server:redis-server
  redis-sentinel:redis-sentinel
  redis-cli:redis-tools
  memcached:memcached
  chromium:chromium
  chromedriver:chromium-driver
  wrk:wrk
  openssl:openssl
  promtool:prometheus
)

# package:service:default port of the daemons a Debian install may start
DAEMONS=(
  redis-server:redis-server:6379
  redis-sentinel:redis-sentinel:26379
  memcached:memcached:11211
  prometheus:prometheus:9090
)

# /usr/sbin is not on every PATH, and some of these live there on other layouts.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

run() {
  log "+ $*"
  if [ "$DRY_RUN" -eq 0 ]; then
    "${SUDO[@]}" "$@"
  fi
}

listening() {
  # bash's /dev/tcp: no dependency on ss/netstat, which minimal images lack.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

have_systemd() {
  [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

service_running() {
  # Asked of the init system as well as of the port: an init script returns before its daemon
  # has bound the port.
  local service=$1 port=$2
  if have_systemd; then
    systemctl is-active --quiet "$service" 2>/dev/null && return 0
  elif command -v service >/dev/null 2>&1 && [ -x "/etc/init.d/$service" ]; then
    service "$service" status >/dev/null 2>&1 && return 0
  fi
  listening "$port"
}

missing_packages=()
for entry in "${REQUIRED[@]}"; do
  binary=${entry%%:*}
  package=${entry#*:}
  if command -v "$binary" >/dev/null 2>&1; then
    log "ok: $binary ($(command -v "$binary"))"
  elif [[ " ${missing_packages[*]} " != *" $package "* ]]; then
    log "missing: $binary (package $package)"
    missing_packages+=("$package")
  fi
done

SUDO=()
if [ "${#missing_packages[@]}" -gt 0 ] && [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  elif [ "$DRY_RUN" -eq 0 ]; then
    log "error: must run as root (or with passwordless sudo) to install: ${missing_packages[*]}"
    exit 1
  fi
fi

# Daemons (or anything on their ports) that ran before we installed anything are not ours.
declare -A running_before=()
for entry in "${DAEMONS[@]}"; do
  IFS=: read -r package service port <<<"$entry"
  if service_running "$service" "$port"; then
    running_before[$service]=1
  fi
done

if [ "${#missing_packages[@]}" -eq 0 ]; then
  log "nothing to install"
else
  run apt-get update -q
  run apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing_packages[@]}" </dev/null
fi

stop_service() {
  local service=$1
  if have_systemd; then
    run systemctl disable --now "$service" || true
  elif command -v service >/dev/null 2>&1; then
    run service "$service" stop || true
  elif [ -x "/etc/init.d/$service" ]; then
    run "/etc/init.d/$service" stop || true
  fi
}

for entry in "${DAEMONS[@]}"; do
  IFS=: read -r package service port <<<"$entry"
  installed_now=0
  [[ " ${missing_packages[*]} " == *" $package "* ]] && installed_now=1
  if [ -n "${running_before[$service]:-}" ]; then
    log "note: $service (or something on port $port) ran before this script; left alone" \
      "(the tests use their own ports)"
    continue
  fi
  if [ "$installed_now" -eq 1 ] && [ "$DRY_RUN" -eq 0 ] && service_running "$service" "$port"; then
    log "the install started $service (port $port); stopping it"
    stop_service "$service"
    for _ in $(seq 50); do
      service_running "$service" "$port" || break
      sleep 0.1
    done
    if service_running "$service" "$port"; then
      log "error: $service still runs or 127.0.0.1:$port still listens"
      exit 1
    fi
    log "stopped $service"
  fi
done

if [ "$DRY_RUN" -eq 0 ]; then
  for entry in "${REQUIRED[@]}"; do
    binary=${entry%%:*}
    if ! command -v "$binary" >/dev/null 2>&1; then
      log "error: $binary still missing after the install"
      exit 1
    fi
  done
fi
log "done"
