#!/usr/bin/env bash
# Run the app on a Flower simulation SuperLink of its own, then stop every process it started.
#
#   bash scripts/run_local.sh [--num-supernodes N] [--run-config "method='fedavg' ..."]
#
# The run config is checked first (unknown keys, values, every option of the method,
# min-train-nodes against the SuperNodes, data-dir, output-dir), so a bad one fails in seconds.
# Then a SuperLink starts on free ports with a private Flower home and runtime dependency
# installation disabled (.venv already holds everything), the run streams to the console and to
# <run dir>/log.txt, and the SuperLink, its simulation and Ray processes are stopped by PID when
# the run ends, fails or on Ctrl-C. The exit status is 0 only if the run wrote all its results;
# otherwise the last line says why (the traceback is in the log) and <run dir>/FAILED holds it.
# A relative output-dir is relative to the folder this is called from. The console leaves out
# Flower's and Ray's routine lines (--verbose prints them; log.txt has them all).
# NUM_SUPERNODES=N works as --num-supernodes N; --stop-flwr-superlink only stops the SuperLink
# plain `flwr run .` left running.
set -euo pipefail
app="$(cd "$(dirname "$0")/.." && pwd)"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec "$app/.venv/bin/python" -m fedbat_tools.localrun --num-supernodes "${NUM_SUPERNODES:-10}" "$@"
