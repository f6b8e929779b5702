#!/usr/bin/env python
"""Run the app on Flower's Deployment Engine on this machine (loopback), then stop it all.

Checks the run config first (as scripts/run_local.sh does, with --num-nodes as the number of
SuperNodes), then starts a SuperLink (deployment mode) and N SuperNodes on 127.0.0.1 with a
private Flower home and free ports, submits one short run with `flwr run . deploy --stream`,
streams its log, and stops every process it started by PID (whole process trees) when the run
ends, fails, or on Ctrl-C / SIGTERM. Per-process logs go to --log-dir. The exit status is 0 only
if the run wrote all its results; otherwise the last line says why.

    .venv/bin/python scripts/deploy_local.py --num-nodes 3
    .venv/bin/python scripts/deploy_local.py --tls --auth --run-config "num-server-rounds=3"
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from flwr.common.config import parse_config_args

from fedbat_flwr.config import ConfigError
from fedbat_flwr.preflight import preflight
from fedbat_flwr.results import final_line
from fedbat_tools.deploy import LocalDeployment, deploy_and_run
from fedbat_tools.localrun import (
    Interrupted,
    app_config_defaults,
    failure_reason,
    is_noise,
    mark_failed,
    plan_run,
)

# A short run: a few hundred examples a client, so that it finishes in minutes on 2 CPU cores.
SHORT_RUN = {
    "num-server-rounds": 2,
    "max-examples-per-client": 300,
    "max-test-examples": 1000,
    "local-epochs": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-nodes", type=int, default=3, help="SuperNodes (default 3)")
    parser.add_argument(
        "--run-config",
        default="",
        help="overrides, as for `flwr run --run-config`, e.g. \"method='fedavg' local-epochs=2\"",
    )
    parser.add_argument("--tls", action="store_true", help="TLS with a CA made for this run")
    parser.add_argument(
        "--auth", action="store_true", help="SuperNode authentication (implies --tls)"
    )
    parser.add_argument(
        "--gpus",
        default="",
        help="comma-separated CUDA devices; SuperNode i gets device i mod len (e.g. 0,1)",
    )
    parser.add_argument("--log-dir", type=Path, help="default: outputs/deploy-<time>/logs")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the run")
    return parser.parse_args(argv)


def show(line: str) -> None:
    """A line of the run's log on the console, unless it is one of Flower's routine lines
    (logs/flwr-run.log keeps them all)."""
    if not is_noise(line):
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Where the user stands, as run_local.sh and fedbat-sweep write.
    folder = Path("outputs").resolve() / f"deploy-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    log_dir = (args.log_dir or folder / "logs").resolve()
    try:
        known = app_config_defaults()
        overrides = {**SHORT_RUN, "output-dir": str(folder)}
        overrides.update(parse_config_args([args.run_config]))
        run_config, run_dir = plan_run(overrides, known)
        config = preflight(run_config, known, num_nodes=args.num_nodes)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    deployment = LocalDeployment(
        args.num_nodes,
        log_dir=log_dir,
        tls=args.tls or args.auth,
        auth=args.auth,
        cuda_devices=[d for d in args.gpus.split(",") if d],
    )
    print(f"[deploy] logs in {log_dir}", flush=True)
    try:
        code, status = deploy_and_run(deployment, run_config, on_line=show, timeout=args.timeout)
    except Interrupted as exc:
        reason = f"interrupted ({exc}); every process started is stopped"
        mark_failed(run_dir, reason)
        print(f"error: {reason} (logs: {log_dir})", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError) as exc:  # SuperLink or SuperNodes did not come up
        print(f"error: {exc} (logs: {log_dir})", file=sys.stderr)
        return 1
    reason = failure_reason(run_dir, config.num_server_rounds, code, status)
    if reason is not None:
        mark_failed(run_dir, reason)
        print(f"error: {reason} (logs: {log_dir})", file=sys.stderr)
        return 1
    print(f"[deploy] logs in {log_dir}; every process started is stopped")
    print(final_line(json.loads((run_dir / "summary.json").read_text()), run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
