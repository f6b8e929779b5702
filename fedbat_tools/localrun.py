"""Run the app through Flower's own runtime on this machine, owning every process started.

`flwr run .` starts a detached local SuperLink and leaves it running. Tests, sweeps and scripts
instead start the SuperLink themselves (same command line as Flower's CLI, runtime dependency
installation disabled because the environment already holds the app), submit runs with
`flwr run`, and stop it by PID when done — also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.preflight import preflight
from fedbat_flwr.results import FAILED_FILE, default_run_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

APP_DIR = Path(__file__).resolve().parent.parent
FLOWER_CONFIG = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'


def app_config_defaults(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """Every run-config key Flower accepts, with its default: pyproject's [tool.flwr.app.config].

    Flower refuses `--run-config` keys its pyproject does not list, so that table is the
    authority; RunConfig's fields fill in if the package is installed without its pyproject.
    """
    return dict(_app_config_defaults(app_dir))


@functools.lru_cache(maxsize=4)
def _app_config_defaults(app_dir: Path) -> dict[str, Any]:
    defaults = {f.name.replace("_", "-"): f.default for f in fields(RunConfig) if f.name != "extra"}
    path = app_dir / "pyproject.toml"
    if path.exists():
        with open(path, "rb") as fh:
            defaults.update(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    return defaults


def env_script(name: str) -> str:
    """A console script of this environment (works without an activated venv)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def toml_value(value: Any) -> str:
    """A run-config value as TOML, for `--run-config "key=value"`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


class LocalSuperLink:
    """A simulation-mode SuperLink on loopback, with its own Flower home and ports."""

    def __init__(self, http_port: int | None = None, control_port: int | None = None) -> None:
        # Free ports by default, so tests and sweeps never meet a user's SuperLink (39091/39093).
        free = free_ports(2)
        self.http_port = http_port or free[0]
        self.control_port = control_port or free[1]
        self.home = Path(tempfile.mkdtemp(prefix="fedbat-flwr-home-"))
        (self.home / "config.toml").write_text(FLOWER_CONFIG)
        self.log_path = self.home / "superlink.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for `flwr` commands that talk to this SuperLink."""
        env = dict(os.environ)
        # The SuperLink spawns flower-superexec, flwr-serverapp, ... by name: this env's first.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(
            FLWR_HOME=str(self.home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.http_port),
            FLWR_LOCAL_CONTROL_API_PORT=str(self.control_port),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            # The checkout a run's code comes from, for its recorded commit (provenance.py).
            FEDBAT_FLWR_SOURCE=str(APP_DIR),
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        if self.process is not None:
            raise RuntimeError(f"this SuperLink was already started (pid {self.process.pid})")
        command = [
            env_script("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--disable-runtime-dependency-installation",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process' lifetime
        self.process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"flower-superlink not ready after {timeout}s; see {self.log_path}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> list[int]:
        """Stop the SuperLink and everything it spawned, by PID; returns stragglers stopped.

        Stragglers are processes that escaped the tree (e.g. Ray agents adopted by init when
        stopped mid start-up); they inherited this SuperLink's unique FLWR_HOME.
        """
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process)
        return stop_leftovers(self.home)

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        num_supernodes: int,
        app_dir: Path = APP_DIR,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
        federation: Mapping[str, Any] | None = None,
    ) -> int:
        """Submit one run with `flwr run --stream` and wait for it; returns the exit code.

        `federation` adds `--federation-config` keys, e.g. `{"client-resources-num-cpus": 1}`
        (Flower's default of 2 CPUs a ClientApp runs one ClientApp at a time on 2 cores).
        """
        federation_config = {"num-supernodes": num_supernodes, **(federation or {})}
        command = [
            env_script("flwr"),
            "run",
            str(app_dir),
            "--stream",
            "--federation-config",
            run_config_arg(federation_config),
        ]
        if run_config:
            command += ["--run-config", run_config_arg(run_config)]
        proc = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if on_line is not None:
                    on_line(line.rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run did not finish within {timeout}s")
            return proc.wait()
        finally:
            if proc.poll() is None:
                stop_process_group(proc)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_leftovers(home: Path, grace: float = 5.0) -> list[int]:
    """Stop, by PID, processes still running with FLWR_HOME=<home> (unique per SuperLink)."""
    pids = processes_under(home)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and processes_under(home):
        time.sleep(0.1)
    signal_all(processes_under(home), signal.SIGKILL)  # re-listed: never signal a reused PID
    return pids


def processes_under(home: Path) -> list[int]:
    """Living processes (not zombies) whose environment has FLWR_HOME=<home> (Linux /proc)."""
    marker = f"\0FLWR_HOME={home}\0".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        if marker in environ and pid != os.getpid() and is_alive(pid):
            found.append(pid)
    return found


def descendants(pid: int) -> list[int]:
    """PIDs of every living descendant of `pid` (Linux /proc), parents before children.

    Flower starts some children detached (a new session), so a process-group kill misses them;
    walking the parent links finds them all.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def stop_process_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop `proc` and all its descendants by PID: SIGTERM, wait `grace` s, then SIGKILL."""
    stop_trees([proc], grace)


def stop_trees(procs: Sequence[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """SIGTERM every process of every tree, one shared grace period, then SIGKILL the rest.

    Stopping the trees one after another would add up N grace periods.
    """
    live = [proc for proc in procs if proc.poll() is None]
    pids = [pid for proc in live for pid in (proc.pid, *descendants(proc.pid))]
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
        for proc in live:
            proc.poll()  # reap our direct children as they exit
        time.sleep(0.1)
    signal_all([pid for pid in pids if is_alive(pid)], signal.SIGKILL)
    for proc in live:
        proc.wait()


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- stopping on signals ---------------------------------------------------------------------
class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: unwind, so that `finally` blocks stop what we started."""


@contextmanager
def stop_on_signals(cleanup: Callable[[], Any]) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` while the block runs; then always `cleanup()`.

    Signals are ignored during the clean-up, so an impatient second Ctrl-C cannot leave a
    half-stopped run behind. Call from the main thread (Python's signal rule).
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            cleanup()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# -- did the run succeed? --------------------------------------------------------------------
@dataclass(frozen=True)
class RunStatus:
    """A run as the SuperLink reports it (`flwr ls --format json`)."""

    run_id: str
    status: str  # e.g. "finished:completed", "finished:failed", "running"
    details: str  # Flower's status details: the exception message of a failed run


def latest_run_status(flwr_ls: Sequence[str], env: Mapping[str, str]) -> RunStatus | None:
    """The most recently submitted run of a SuperLink; `flwr_ls` = the `flwr ls` arguments
    that reach it (e.g. a connection name). None if the SuperLink cannot tell."""
    try:
        result = subprocess.run(
            [env_script("flwr"), "ls", *flwr_ls, "--format", "json"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        runs = json.loads(result.stdout)["runs"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    if not runs:
        return None
    latest = max(enumerate(runs), key=lambda item: (item[1].get("pending-at") or "", item[0]))[1]
    return RunStatus(
        str(latest.get("run-id")), str(latest.get("status")), str(latest.get("status-details"))
    )


def failure_reason(
    run_dir: Path, num_rounds: int, exit_code: int, status: RunStatus | None
) -> str | None:
    """None if the run wrote its complete results; otherwise one line saying why not.

    `flwr run --stream` exits 0 whatever happened to the run, so success is read from the
    results contract (summary.json with every round) and the reason from the SuperLink.
    """
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if summary is not None and summary.get("rounds_completed") == num_rounds:
        return None
    if status is not None and status.status.endswith("failed") and status.details.strip():
        details = status.details.strip().splitlines()
        return details[-1] if details[-1].strip() else details[0]
    if status is not None and status.status.endswith("stopped"):
        return f"run {status.run_id} was stopped"
    if exit_code != 0:
        return f"flwr run exited with status {exit_code}"
    return f"the run ended without writing {run_dir / 'summary.json'}"


def mark_failed(run_dir: Path, reason: str) -> None:
    """Leave `<run dir>/FAILED` with the reason, if the run made its folder: beside log.txt
    and the rounds done so far (resumable from checkpoint.npz), never a summary.json."""
    if run_dir.is_dir():
        (run_dir / FAILED_FILE).write_text(reason + "\n")


# -- the command behind scripts/run_local.sh -------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_local.sh",
        description="Check the run config, run the app on a simulation SuperLink owned by this "
        "command, stop every process it started, and exit non-zero if the run failed.",
    )
    parser.add_argument(
        "--num-supernodes", type=int, default=10, help="simulated SuperNodes (default 10)"
    )
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help="overrides, as for `flwr run`, e.g. \"method='fedavg' local-epochs=2\"",
    )
    parser.add_argument(
        "--federation-config",
        action="append",
        default=[],
        help='as for `flwr run`, e.g. "num-supernodes=5 client-resources-num-cpus=1"',
    )
    parser.add_argument("--stream", action="store_true", help="accepted; output always streams")
    parser.add_argument("--timeout", type=float, help="seconds before the run is stopped")
    return parser


def plan_run(overrides: dict[str, Any], known: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Fix output-dir (absolute) and run-name in the overrides, so the run dir is known here."""
    config = {**known, **overrides}
    if config.get("resume-from"):
        return overrides, Path(str(config["resume-from"])).expanduser().resolve()
    output_dir = Path(str(config["output-dir"])).expanduser().resolve()
    name = str(config.get("run-name") or "") or default_run_name(
        str(config["method"]), str(config["dataset"]), str(config["partitioner"]), output_dir
    )
    planned = {**overrides, "output-dir": str(output_dir), "run-name": name}
    return planned, output_dir / name


def main(argv: Sequence[str] | None = None) -> int:
    """Pre-flight, run, report: the last line printed says where the results are or why not."""
    from flwr.common.config import parse_config_args

    args = _parser().parse_args(argv)
    try:
        overrides = parse_config_args(args.run_config)
        federation = parse_config_args(args.federation_config)
        num_nodes = int(federation.pop("num-supernodes", args.num_supernodes))
        known = app_config_defaults()
        overrides, run_dir = plan_run(overrides, known)
        config = preflight(overrides, known, num_nodes=num_nodes)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return run_and_report(
        overrides, run_dir, config.num_server_rounds, num_nodes, federation, args.timeout
    )


def run_and_report(
    overrides: Mapping[str, Any],
    run_dir: Path,
    num_rounds: int,
    num_nodes: int,
    federation: Mapping[str, Any],
    timeout: float | None,
) -> int:
    """One run on a SuperLink of our own; its output is streamed and kept in <run dir>/log.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    log_path = run_dir / "log.txt"
    link = LocalSuperLink()
    code, status, reason, interrupted = 1, None, None, False
    with open(log_path, "a") as log:

        def on_line(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        try:
            with stop_on_signals(link.stop):
                link.start()
                code = link.run(
                    overrides,
                    num_supernodes=num_nodes,
                    on_line=on_line,
                    timeout=timeout,
                    federation=federation,
                )
                status = latest_run_status([], link.env)
        except Interrupted as exc:
            reason = f"interrupted ({exc}); every process the run started is stopped"
            interrupted = True
        except (TimeoutError, RuntimeError) as exc:
            reason = str(exc)
    reason = reason or failure_reason(run_dir, num_rounds, code, status)
    if reason is None:
        print(f"results in {run_dir}", flush=True)
        return 0
    mark_failed(run_dir, reason)
    print(f"error: {reason} (log: {log_path})", file=sys.stderr, flush=True)
    return 130 if interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
