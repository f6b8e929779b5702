#!/usr/bin/env bash
# Run the app on Flower's local simulation SuperLink and stop that SuperLink afterwards.
#
# `flwr run .` starts a detached SuperLink (ports 39091/39093) and leaves it running. This
# script starts it with runtime dependency installation disabled (the .venv already holds
# everything; otherwise every run would `uv sync` torch into a fresh environment), runs the app
# with the arguments given (e.g. --run-config "method='fedavg'"), and stops the SuperLink it
# started, by PID. A SuperLink that was already running is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

superlink_pid() {
  ss -ltnpH "sport = :${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}" 2>/dev/null \
    | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}

started_here=0
if [ -z "$(superlink_pid)" ]; then
  started_here=1
else
  echo "note: a local SuperLink is already running (pid $(superlink_pid)); using it." >&2
  echo "      If it was started without FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 it will" >&2
  echo "      install the app's dependencies for every run." >&2
fi

stop_superlink() {
  local pid
  pid=$(superlink_pid)
  if [ "$started_here" = 1 ] && [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}
trap stop_superlink EXIT INT TERM

flwr run . --stream --federation-config "num-supernodes=${NUM_SUPERNODES:-10}" "$@"
