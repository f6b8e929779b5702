"""Run the app on Flower's Deployment Engine on this machine: one SuperLink, N SuperNodes.

Simulation (`localrun.py`) runs every ClientApp inside the SuperLink's process tree. Here each
SuperNode is a real `flower-supernode` process that connects to the SuperLink's Fleet API over
loopback, exactly as a remote node would, and spawns `flwr-clientapp` for each task (isolation
`subprocess`). That exercises what simulation cannot: TLS, SuperNode authentication, nodes that
come and go. Every process is started here and stopped here by PID, with its whole tree, also
on errors and Ctrl-C; each writes its own log file.

Flower 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one HTTP port
(`--host`/`--port`); SuperNodes (`--superlink`), the `flwr` CLI (the connection's `address`) and
the SuperLink's own ServerApp executor all use it. Each SuperNode serves its own Runtime API
(formerly the ClientAppIo API) on a port of its own (`--port`), for its ClientApp executor.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .localrun import (
    APP_DIR,
    RunStatus,
    descendants,
    env_script,
    free_ports,
    is_alive,
    latest_run_status,
    processes_under,
    run_config_arg,
    signal_all,
    stop_leftovers,
    stop_on_signals,
    stop_process_group,
    stop_trees,
)

CONNECTION = "deploy"  # the SuperLink connection's name in $FLWR_HOME/config.toml
HOST = "127.0.0.1"


# -- TLS material and SuperNode keys ---------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """A self-signed CA and a server certificate it signed, for 127.0.0.1 and localhost."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's EC key pair in OpenSSH format (what flower-supernode and flwr read)."""

    private_key: Path
    public_key: Path


def make_tls_files(folder: Path, days: int = 7) -> TlsFiles:
    """A throwaway CA plus a server certificate with SAN IP:127.0.0.1, DNS:localhost.

    TLS clients check the SAN, not the CN, so the SAN must name the address clients dial.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbat-flwr local CA")])
    ca_cert = (
        _certificate_builder(ca_name, ca_name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
    )
    server_cert = (
        _certificate_builder(server_name, ca_name, server_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_private(server_key, serialization.PrivateFormat.PKCS8))
    return files


def _certificate_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_node_keys(folder: Path, name: str) -> NodeKeys:
    """An EC P-384 key pair, as `ssh-keygen -t ecdsa -b 384` would make it."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(folder / name, folder / f"{name}.pub")
    _write_private(keys.private_key, _pem_private(key, serialization.PrivateFormat.OpenSSH))
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys.public_key.write_bytes(public + f" {name}\n".encode())
    return keys


def _pem_private(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600 before any byte lands)."""
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


# -- the deployment --------------------------------------------------------------------------
@dataclass
class NodeProcess:
    """One started `flower-supernode`: its partition, process, log and (with auth) keys."""

    partition_id: int
    process: subprocess.Popen[bytes]
    log_path: Path
    runtime_port: int
    keys: NodeKeys | None


class LocalDeployment:
    """A deployment-mode SuperLink and its SuperNodes on loopback, owned by PID.

    `tls` serves every API over TLS with a CA made here; `auth` (needs `tls`, as Flower does)
    enables SuperNode authentication: each node gets an EC key pair whose public key is
    registered with `flwr supernode register` before the node starts. `cuda_devices` gives
    SuperNode i the GPU `cuda_devices[i % len]` through CUDA_VISIBLE_DEVICES.
    """

    def __init__(
        self,
        num_nodes: int,
        *,
        log_dir: Path | None = None,
        tls: bool = False,
        auth: bool = False,
        cuda_devices: Sequence[str] = (),
        app_dir: Path = APP_DIR,
    ) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs --tls (Flower refuses it without)")
        self.num_nodes = num_nodes
        self.app_dir = app_dir
        # A private Flower home: config.toml, installed FABs and credentials never touch ~/.flwr.
        self.home = Path(tempfile.mkdtemp(prefix="fedbat-flwr-deploy-"))
        self.log_dir = log_dir or self.home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The SuperLink's Fleet + Control + Runtime HTTP API, then one Runtime API per node.
        self.port, *self._node_ports = free_ports(num_nodes + 1)
        self.tls = make_tls_files(self.home / "tls") if tls else None
        self.auth = auth
        self.cuda_devices = list(cuda_devices)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: dict[int, NodeProcess] = {}
        self.extra: list[NodeProcess] = []  # started but not members, e.g. unregistered nodes
        self.homes = [self.home]  # FLWR_HOME of the SuperLink, then of each node
        (self.home / "config.toml").write_text(self.flower_config())

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def flower_config(self) -> str:
        """`$FLWR_HOME/config.toml`: where `flwr run . deploy` finds the SuperLink (1.41+)."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "{self.address}"')
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert}"')
        return "\n".join(lines) + "\n"

    def env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """Environment for every process started here: this venv first, a private Flower home."""
        env = dict(os.environ)
        # SuperLink and SuperNodes spawn flower-superexec, flwr-serverapp, ... by name.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(
            FLWR_HOME=str(home or self.home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            **extra,
        )
        return env

    def _spawn(
        self, name: str, command: list[str], env: Mapping[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                command,
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, who stop the tree
            )
        return proc, log_path

    def start(self, timeout: float = 120.0) -> None:
        """SuperLink, then every SuperNode; returns once all N nodes are online."""
        self.start_superlink()
        for partition_id in range(self.num_nodes):
            self.add_node(partition_id)
        self.wait_for_nodes(self.num_nodes, timeout=timeout)

    # -- SuperLink ---------------------------------------------------------------------------
    def superlink_command(self) -> list[str]:
        command = [env_script("flower-superlink"), "--isolation", "subprocess"]
        command += ["--host", HOST, "--port", str(self.port)]
        command += ["--disable-runtime-dependency-installation", *self._server_tls_args()]
        if self.auth:
            command.append("--enable-supernode-auth")
        return command

    def _server_tls_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.tls.ca_cert),
            "--ssl-certfile",
            str(self.tls.server_cert),
            "--ssl-keyfile",
            str(self.tls.server_key),
        ]

    def start_superlink(self, timeout: float = 60.0) -> None:
        self.superlink, log_path = self._spawn("superlink", self.superlink_command(), self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {log_path}")
            if self._healthy():
                return
            time.sleep(0.2)
        raise TimeoutError(f"flower-superlink not ready after {timeout}s; see {log_path}")

    def _healthy(self) -> bool:
        scheme, verify = "http", True
        if self.tls is not None:
            scheme, verify = "https", ssl.create_default_context(cafile=str(self.tls.ca_cert))
        try:
            response = httpx.get(f"{scheme}://{self.address}/health", timeout=0.5, verify=verify)
        except httpx.HTTPError:
            return False
        return response.is_success

    # -- SuperNodes --------------------------------------------------------------------------
    def supernode_command(
        self, partition_id: int, runtime_port: int, keys: NodeKeys | None
    ) -> list[str]:
        command = [env_script("flower-supernode"), "--superlink", self.address]
        command += ["--isolation", "subprocess", "--host", HOST, "--port", str(runtime_port)]
        command += ["--node-config", f"partition-id={partition_id} num-partitions={self.num_nodes}"]
        # A node that cannot connect, or is refused, gives up instead of retrying forever.
        command += ["--max-wait-time", "60"]
        if self.tls is None:
            command.append("--insecure")
        else:
            # Fleet API over TLS, and the node's own Runtime API for its ClientApp executor too.
            command += ["--root-certificates", str(self.tls.ca_cert), *self._server_tls_args()]
        if keys is not None:
            command += ["--auth-supernode-private-key", str(keys.private_key)]
        return command

    def add_node(
        self, partition_id: int, *, register: bool = True, name: str | None = None
    ) -> NodeProcess:
        """Start one SuperNode; with auth, make its keys and (if `register`) register them.

        An unregistered node is kept in `extra`, not `nodes`: it is expected to be refused.
        """
        name = name or f"supernode-{partition_id}"
        keys = make_node_keys(self.home / "keys", name) if self.auth else None
        if keys is not None and register:
            self.register(keys.public_key, name=name)
        runtime_port = self._node_port()
        node_home = self.home / name  # per-node FAB installs: no two nodes write one folder
        node_home.mkdir(exist_ok=True)
        self.homes.append(node_home)
        gpu = {}
        if self.cuda_devices:
            gpu["CUDA_VISIBLE_DEVICES"] = self.cuda_devices[partition_id % len(self.cuda_devices)]
        command = self.supernode_command(partition_id, runtime_port, keys)
        proc, log_path = self._spawn(name, command, self.env(node_home, **gpu))
        node = NodeProcess(partition_id, proc, log_path, runtime_port, keys)
        if register or not self.auth:
            self.nodes[partition_id] = node
        else:
            self.extra.append(node)
        return node

    def _node_port(self) -> int:
        """A free port no node of ours was given (a starting node may not have bound it yet)."""
        if self._node_ports:
            return self._node_ports.pop(0)
        taken = {self.port} | {n.runtime_port for n in [*self.nodes.values(), *self.extra]}
        while (port := free_ports(1)[0]) in taken:
            pass
        return port

    def kill_node(self, partition_id: int) -> None:
        """SIGKILL a SuperNode and its ClientApp processes at once, as a crash would."""
        node = self.nodes.pop(partition_id)
        signal_all([node.process.pid, *descendants(node.process.pid)], signal.SIGKILL)
        node.process.wait()

    # -- the flwr CLI ------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One `flwr` command against this SuperLink; its output goes to logs/flwr-cli.log."""
        result = subprocess.run(
            [env_script("flwr"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with open(self.log_dir / "flwr-cli.log", "a") as log:
            log.write(f"$ flwr {' '.join(args)}  # exit {result.returncode}\n")
            log.write(result.stdout + result.stderr + "\n")
        return result

    def register(self, public_key: Path, *, name: str) -> None:
        """`flwr supernode register`: only registered keys may join an auth-enabled SuperLink."""
        result = self.flwr("supernode", "register", str(public_key), CONNECTION, "--name", name)
        if result.returncode != 0:
            raise RuntimeError(f"registering {public_key} failed:\n{result.stdout}{result.stderr}")

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink sees online (`flwr supernode list --format json`)."""
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Block until `count` nodes are online, so that round 1 samples every node."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.process.poll() is not None:
                    raise RuntimeError(f"a SuperNode exited; see {node.log_path}")
            if self.online_nodes() >= count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout}s")

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        on_line: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """`flwr run <app> deploy --stream`: submit one run, stream its log, return the exit code.

        The stream is also appended to logs/flwr-run.log.
        """
        command = [env_script("flwr"), "run", str(self.app_dir), CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", run_config_arg(run_config)]
        return stream_command(command, self.env(), self.log_dir / "flwr-run.log", on_line, timeout)

    # -- stopping ----------------------------------------------------------------------------
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every process started here, SuperNodes before the SuperLink."""
        nodes = [node.process for node in [*self.nodes.values(), *self.extra]]
        return nodes + ([self.superlink] if self.superlink is not None else [])

    def pids(self) -> list[int]:
        """Living PIDs of the trees started here, plus any process with one of our homes.

        Flower starts some executors detached; one that outlived its parent is no longer in
        the tree, but still carries FLWR_HOME=<a private home of ours> in its environment.
        """
        found: list[int] = []
        for proc in self.processes():
            if proc.poll() is None:
                found += [proc.pid, *descendants(proc.pid)]
        strays = [pid for home in self.homes for pid in processes_under(home)]
        return found + [pid for pid in strays if pid not in found]

    def stop(self, grace: float = 10.0) -> None:
        """Stop every tree started here by PID, all at once, then any stray with our home."""
        stop_trees(self.processes(), grace=grace)
        for home in self.homes:
            stop_leftovers(home)
        self.nodes.clear()
        self.extra.clear()
        if not self.log_dir.is_relative_to(self.home):  # keys and certificates go too
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stream_command(
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> int:
    """Run `command`, copy its output line by line to `log_path` and `on_line`; exit code.

    On timeout or an exception (Ctrl-C included) the command's whole tree is stopped.
    """
    proc = subprocess.Popen(
        list(command),
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{command[0]} did not finish within {timeout}s")
        return proc.wait()
    finally:
        if proc.poll() is None:
            stop_process_group(proc)


def all_gone(pids: Sequence[int]) -> bool:
    """True when none of `pids` is alive (zombies count as gone)."""
    return not any(is_alive(pid) for pid in pids)


def deploy_and_run(
    deployment: LocalDeployment,
    run_config: Mapping[str, Any],
    *,
    on_line: Callable[[str], None] = print,
    timeout: float | None = None,
) -> tuple[int, RunStatus | None]:
    """Start the deployment, run the app once, stop everything (also on Ctrl-C or errors).

    Returns `flwr run`'s exit code and the run's status as the SuperLink saw it (asked before
    the SuperLink stops): `flwr run --stream` exits 0 even when the run failed.
    """
    with stop_on_signals(deployment.stop):
        deployment.start()
        on_line(
            f"[deploy] SuperLink {deployment.address}, {len(deployment.nodes)} SuperNodes online"
        )
        code = deployment.run(run_config, on_line=on_line, timeout=timeout)
        return code, latest_run_status([CONNECTION], deployment.env())
