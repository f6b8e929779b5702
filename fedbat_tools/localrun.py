"""Run the app through Flower's own runtime on this machine, owning every process started.

`flwr run .` starts a detached local SuperLink and leaves it running. Tests, sweeps and scripts
instead start the SuperLink themselves (same command line as Flower's CLI, runtime dependency
installation disabled because the environment already holds the app), submit runs with
`flwr run`, and stop it by PID when done — also on errors and Ctrl-C — then remove its private
Flower home, the temporary folder of every process it started (Ray's session folders too).
`stop_flower_local_superlink` stops the SuperLink plain `flwr run .` left running.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
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
from typing import IO, Any

import httpx

from fedbat_flwr.config import ConfigError, RunConfig, declared_defaults
from fedbat_flwr.preflight import preflight
from fedbat_flwr.results import FAILED_FILE, clock, default_run_name, final_line

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
    return {**defaults, **declared_defaults(app_dir)}


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
        # Flower home, and the temporary folder of everything started here (Ray's session
        # folders included): stop() removes it.
        self.home = Path(tempfile.mkdtemp(prefix="fedbat-home-"))
        (self.home / "config.toml").write_text(FLOWER_CONFIG)
        self.log_path = self.home / "superlink.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

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
        if fits_ray_sockets(self.home):  # else Ray's default folder, which it leaves behind
            env.update(TMPDIR=str(self.home), RAY_TMPDIR=str(self.home))
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
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process' lifetime
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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
        """Stop the SuperLink and everything it spawned, by PID, then remove its home (Flower's
        state and log, installed app bundles, Ray's session folders); returns stragglers
        stopped.

        Stragglers are processes that escaped the tree (e.g. Ray agents adopted by init when
        stopped mid start-up); they inherited this SuperLink's unique FLWR_HOME.
        """
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process)
        stragglers = stop_leftovers(self.home)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)
        return stragglers

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


# Ray's longest socket path below its temporary folder: /ray/session_<date>_<time>_<us>_<pid>
# /sockets/plasma_store with a 7-digit pid; Linux allows 107 bytes for the whole path.
RAY_SOCKET_TAIL = 68
SOCKET_PATH_MAX = 107


def fits_ray_sockets(folder: Path) -> bool:
    """True if Ray can make its sockets with `folder` as its temporary folder."""
    return len(str(folder).encode()) + RAY_SOCKET_TAIL <= SOCKET_PATH_MAX


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
    return processes_with_env("FLWR_HOME", str(home))


def processes_with_env(name: str, value: str) -> list[int]:
    """Living processes (not zombies), other than this one, whose environment has
    <name>=<value> (Linux /proc)."""
    marker = f"\0{name}={value}\0".encode()
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


def stop_pids(pids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM `pids`, wait up to `grace` s for them to exit, SIGKILL the rest (none of them
    need be our child: their parents, or init, reap them)."""
    signal_all(list(pids), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
        time.sleep(0.1)
    signal_all([pid for pid in pids if is_alive(pid)], signal.SIGKILL)


# -- the SuperLink plain `flwr run .` starts ---------------------------------------------------
def flower_home() -> Path:
    """The Flower home `flwr` uses: $FLWR_HOME, else ~/.flwr."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def flower_local_superlink(home: Path, port: str) -> list[int]:
    """PIDs of what `flwr run` started for a `:local:` connection of Flower home `home`: the
    detached SuperLink (its `--log-file` lies in `<home>/local-superlink/`) and the executors
    of its runs (they dial its port, `--runtime-api-address 127.0.0.1:<port>`), with every
    descendant (simulations, Ray)."""
    marker, address = f"{home / 'local-superlink'}/".encode(), f"127.0.0.1:{port}".encode()
    roots = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        programs = [os.path.basename(arg) for arg in argv[:2]]
        flower = any(name.startswith((b"flower-", b"flwr-")) for name in programs)
        mine = any(arg.startswith(marker) for arg in argv) or address in argv
        if flower and mine:
            roots.append(int(entry.name))
    return sorted({pid for root in roots for pid in (root, *descendants(root))})


def stop_flower_local_superlink(home: Path | None = None) -> list[int]:
    """Stop, by PID, the SuperLink `flwr run .` left running for Flower home `home` (default:
    $FLWR_HOME or ~/.flwr) and every process of its runs; returns the PIDs stopped.

    Flower has no command for it, and a SIGTERM to the SuperLink alone leaves a running
    simulation and its Ray processes behind.
    """
    port = os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    pids = flower_local_superlink(home or flower_home(), port)
    stop_pids(pids)
    return pids


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


# -- the console -----------------------------------------------------------------------------
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# A line Flower's logger wrote: its level, the padding, the message (a tab opens a tree line).
FLOWER_LINE_RE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) *: *(?P<message>.*)$")
# What Flower and Ray print in every run that says nothing to a user of this app.
NOISE_FRAGMENTS = (
    "Starting logstream for run_id",
    "default simulated SuperNodes changed from 10 to 2",  # whatever num-supernodes is
    "To change federation size, use the following command",
    "flwr federation simulation-config",
    "fraction_evaluate is set to 0.0",  # this app evaluates on the server
    "Manually terminating ClientAppActor",
    "FutureWarning: Tip: In future versions of Ray",
    "warnings.warn(",
)
NOISE_MESSAGE_RE = re.compile(
    r"^(Starting \w+ strategy:|\[ROUND \d+/\d+\]|Global evaluation|"
    r"Strategy execution finished in .*|Final results:)$"
)
FAB_INSTALLED_RE = re.compile(r"^Successfully installed \S+ to ")
# The ServerApp's last line (results.final_line); the runner prints its own, with the total.
FINAL_LINE_RE = re.compile(r"^fedbat-flwr: \d+ rounds in .*; results in ")


def is_noise(line: str) -> bool:
    """True for a streamed line the console leaves out unless --verbose (log.txt keeps all):
    Flower's strategy tree and per-round records (this app prints one line a round), its
    federation-size hints, the app bundle's installation, Ray's FutureWarning."""
    text = ANSI_RE.sub("", line)
    if any(fragment in text for fragment in NOISE_FRAGMENTS) or FAB_INSTALLED_RE.match(text):
        return True
    match = FLOWER_LINE_RE.match(text)
    if match is None or match["level"] != "INFO":
        return False
    message = match["message"]
    return (
        not message.strip()
        or message.startswith("\t")
        or bool(NOISE_MESSAGE_RE.match(message) or FINAL_LINE_RE.match(message))
    )


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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print every line Flower and Ray log (the console leaves their routine lines "
        "out; <run dir>/log.txt always has them all)",
    )
    parser.add_argument(
        "--stop-flwr-superlink",
        action="store_true",
        help="only stop the SuperLink plain `flwr run .` left running for $FLWR_HOME "
        "(default ~/.flwr), and every process of its runs, by PID",
    )
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
    if args.stop_flwr_superlink:
        stopped = stop_flower_local_superlink()
        print(f"stopped {len(stopped)} processes of the SuperLink of {flower_home()}")
        return 0
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
        overrides,
        run_dir,
        config.num_server_rounds,
        num_nodes,
        federation,
        args.timeout,
        verbose=args.verbose,
    )


def console_and_log(log: IO[str], verbose: bool) -> Callable[[str], None]:
    """A streamed line goes to `log` always, and to the console unless it `is_noise`."""

    def on_line(text: str) -> None:
        if verbose or not is_noise(text):
            print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    return on_line


def run_and_report(
    overrides: Mapping[str, Any],
    run_dir: Path,
    num_rounds: int,
    num_nodes: int,
    federation: Mapping[str, Any],
    timeout: float | None,
    *,
    verbose: bool = False,
) -> int:
    """One run on a SuperLink of our own; its output is streamed (without `is_noise` lines
    unless `verbose`) and kept whole in <run dir>/log.txt; the SuperLink's home is removed."""
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    log_path = run_dir / "log.txt"
    link = LocalSuperLink()
    code, status, reason, interrupted = 1, None, None, False
    with open(log_path, "a") as log:
        on_line = console_and_log(log, verbose)
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
        summary = json.loads((run_dir / "summary.json").read_text())
        total = clock(time.monotonic() - started)
        print(f"{final_line(summary, run_dir)} ({total} with Flower's start-up)", flush=True)
        return 0
    mark_failed(run_dir, reason)
    print(f"error: {reason} (log: {log_path})", file=sys.stderr, flush=True)
    return 130 if interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
