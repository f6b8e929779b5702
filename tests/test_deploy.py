"""Flower's Deployment Engine: a real SuperLink and real SuperNodes on loopback, and docker/.

The e2e test runs one deployment with TLS and SuperNode authentication (private Flower home,
free ports): an unregistered node is refused, then FedBAT runs three rounds with a 4-bit
broadcast while a node is killed; the results contract holds and every process started is gone
afterwards. A plain-HTTP deployment differs only in flags (`--insecure`), checked statically
below like compose.yaml's. Docker cannot run here, so docker/ is checked statically: the compose
file parses, its Dockerfiles exist, every flag it passes exists in the installed Flower binaries
(and is the flag scripts/deploy_local.py uses), and every image pins the installed flwr version.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedbat_flwr.results import METRIC_KEYS, SUMMARY_KEYS
from fedbat_tools.deploy import LocalDeployment, all_gone, make_node_keys
from fedbat_tools.localrun import APP_DIR, env_script

NUM_NODES = 3
SHORT_RUN = {
    "num-server-rounds": 3,
    "max-examples-per-client": 100,
    "max-test-examples": 500,
    "local-epochs": 1,
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """One deployment for the e2e test below: TLS, SuperNode authentication, three nodes.

    Starting a SuperLink and SuperNodes, and each run's ServerApp and ClientApps, is most of
    what a short run costs, so the TLS checks and the killed-node run share it. Afterwards no
    process it started may survive.
    """
    logs = tmp_path_factory.mktemp("deploy") / "logs"
    deployment = LocalDeployment(NUM_NODES, log_dir=logs, tls=True, auth=True)
    try:
        deployment.start()
        yield deployment
    finally:
        pids = deployment.pids()
        deployment.stop()
    assert all_gone(pids), f"processes left behind: {[p for p in pids if not all_gone([p])]}"
    assert deployment.pids() == []


def check_contract(rows: list[dict[str, Any]], summary: dict[str, Any], rounds: int) -> None:
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        assert row["method"] == "fedbat"
        assert 1.0 < row["uplink_bits_per_param"] <= 1.10  # 1-bit signs + fixed framing
        assert 4.0 < row["downlink_bits_per_param"] <= 4.2  # the 4-bit broadcast (issue 21)
        assert row["uplink_bytes"] > 0 and row["round_seconds"] > 0
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["rounds_completed"] == rounds
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)


def trained_rounds(log: Path) -> int:
    """Train replies a SuperNode sent, from its own log (each one a flwr-clientapp run)."""
    return log.read_text().count("Sending: train message")


@pytest.mark.e2e
def test_tls_deployment_refuses_an_unregistered_node_and_survives_a_killed_one(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    """Both checks in one test, so that they share one deployment wherever the test runs
    (the README's command spreads the tests over two pytest-xdist workers, each with module
    fixtures of its own)."""
    tls_and_node_authentication_refuse_an_unregistered_node(deployment)
    fedbat_trains_on_real_supernodes_and_survives_a_killed_one(deployment, tmp_path)


def tls_and_node_authentication_refuse_an_unregistered_node(deployment: LocalDeployment) -> None:
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the SuperLink's port
        httpx.get(f"http://{deployment.address}/health", timeout=5)

    intruder = deployment.add_node(0, register=False, name="unregistered")
    assert intruder.process.wait(timeout=90) != 0, "an unregistered SuperNode was let in"
    assert "Failed to activate SuperNode" in intruder.log_path.read_text()
    superlink_log = (deployment.log_dir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert "Uvicorn running on https://" in superlink_log
    assert deployment.online_nodes() == NUM_NODES, "the registered nodes are in"


def fedbat_trains_on_real_supernodes_and_survives_a_killed_one(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    """Three rounds over TLS on authenticated SuperNodes; one is SIGKILLed as round 2 starts.

    The broadcast is 4-bit (`downlink-bits=4`), so the Deployment Engine path decodes the
    quantized downlink on real SuperNodes too."""
    victim = NUM_NODES - 1
    survivors = [node for pid, node in deployment.nodes.items() if pid != victim]
    before = {node.partition_id: trained_rounds(node.log_path) for node in survivors}

    lines: list[str] = []

    def kill_at_round_two(line: str) -> None:
        lines.append(line)
        if "[ROUND 2/" in line and victim in deployment.nodes:
            deployment.kill_node(victim)  # SIGKILL of its whole tree, like a crash

    config = {
        **SHORT_RUN,
        "fraction-train": 1.0,
        "min-train-nodes": 2,
        "downlink-bits": 4,
        "output-dir": str(tmp_path),
        "run-name": "deploy-kill",
    }
    code = deployment.run(config, on_line=kill_at_round_two, timeout=600)
    assert code == 0, "\n".join(lines[-40:])
    run_dir = tmp_path / "deploy-kill"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())

    check_contract(rows, summary, rounds=3)
    assert victim not in deployment.nodes
    assert rows[0]["num_replies"] == NUM_NODES and rows[0]["num_rejected"] == 0
    # Round 2 was sent to the dead node too: its reply is a "Node Unavailable" error once its
    # heartbeat expires; round 3 samples the two nodes still online.
    assert [r["num_replies"] for r in rows[1:]] == [NUM_NODES - 1] * 2
    assert all(r["model_updated"] for r in rows)
    for node in survivors:  # every round of this run ran on each surviving SuperNode
        trained = trained_rounds(node.log_path) - before[node.partition_id]
        assert trained == 3, node.log_path.read_text()[-2000:]


# -- docker/ (static: no Docker engine on this machine) --------------------------------------
DOCKER = APP_DIR / "docker"
COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
BINARY_OF_IMAGE = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
FLAG = r"(?<![\w-])--[a-z][a-z0-9-]*"


@functools.cache
def cli(binary: str) -> tuple[frozenset[str], dict[str, set[str]], frozenset[str]]:
    """A Flower binary's flags, choices per flag and deprecated flags, from its `--help`."""
    out = subprocess.run(
        [env_script(binary), "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    usage, _, options = out.partition("\n\n")  # usage lists every flag argparse shows
    flags = frozenset(re.findall(FLAG, usage))
    choices = {f: set(c.split(",")) for f, c in re.findall(rf"({FLAG}) \{{([^}}]*)\}}", usage)}
    deprecated = set()
    for block in re.split(r"\n(?=  -)", options):  # one block per option
        if "deprecated" in block.lower():
            deprecated |= set(re.findall(FLAG, block.strip().split("\n")[0].split("  ")[0]))
    return flags, choices, frozenset(deprecated)


def compose_services() -> dict[str, dict[str, Any]]:
    """Services of every compose file, merged the way `docker compose -f a -f b` merges."""
    services: dict[str, dict[str, Any]] = {}
    for name in COMPOSE_FILES:
        for key, service in yaml.safe_load((DOCKER / name).read_text())["services"].items():
            services.setdefault(key, {}).update(service)
    return services


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("Dockerfile*[!e]"))  # not the .dockerignore files


def binary_of(service: dict[str, Any]) -> str:
    """The Flower binary a service runs: its Dockerfile's ENTRYPOINT, or its image's."""
    if "build" in service:
        text = (DOCKER / ".." / service["build"]["dockerfile"]).read_text()
        return json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M)[1])[0]
    return BINARY_OF_IMAGE[service["image"].split(":")[0]]


def check_flags(binary: str, args: list[str]) -> set[str]:
    """The flags in `args`, each checked against the binary's help; returns them."""
    flags, choices, deprecated = cli(binary)
    used = {a for a in args if a.startswith("--")}
    assert used <= flags, f"{binary} has no {sorted(used - flags)}"
    assert not used & deprecated, f"{binary}: {sorted(used & deprecated)} are deprecated"
    for flag, allowed in choices.items():
        if flag in args:
            assert args[args.index(flag) + 1] in allowed, (binary, flag, allowed)
    return used


def test_compose_files_parse_and_reference_existing_dockerfiles() -> None:
    services = compose_services()
    assert {"superlink", "serverapp", "supernode-0", "clientapp-0"} <= set(services)
    for name, service in services.items():
        assert "image" in service, name
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / "pyproject.toml").is_file()
            assert (DOCKER / ".." / service["build"]["dockerfile"]).resolve().is_file(), name
    for path in dockerfiles():
        assert Path(f"{path}.dockerignore").is_file(), "keep outputs/ and .venv out of builds"
    executors = [s for s in services.values() if binary_of(s) == "flower-superexec"]
    for service in executors:  # ServerApp (test set) and ClientApps (partitions) read the data
        assert any(v.endswith(":/data/fashion-mnist:ro") for v in service["volumes"]), service


def test_compose_flags_exist_and_match_the_local_deployment(tmp_path: Path) -> None:
    plain = LocalDeployment(2, log_dir=tmp_path)  # plain HTTP, as compose.yaml
    secure = LocalDeployment(2, log_dir=tmp_path, tls=True, auth=True)
    keys = make_node_keys(tmp_path / "keys", "node")
    try:  # command lines only: no process is started
        local_flags = {
            "flower-superlink": check_flags("flower-superlink", plain.superlink_command()),
            "flower-supernode": check_flags(
                "flower-supernode", plain.supernode_command(0, 1, None)
            ),
        }
        check_flags("flower-superlink", secure.superlink_command())
        check_flags("flower-supernode", secure.supernode_command(0, 1, keys))
    finally:
        plain.stop()
        secure.stop()
    # What Flower's SuperLink and SuperNodes pass to the executors they spawn themselves.
    local_flags["flower-superexec"] = {"--insecure", "--root-certificates", "--runtime-api-address"}
    for name, service in compose_services().items():
        if "command" in service:
            binary = binary_of(service)
            used = check_flags(binary, [str(a) for a in service["command"]])
            assert used <= local_flags[binary], f"{name}: {sorted(used - local_flags[binary])}"


def test_images_pin_the_installed_flwr_version() -> None:
    installed = version("flwr")
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    flwr_req = next(
        Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("flwr[")
    )
    assert flwr_req.specifier.contains(installed)
    tags = [s["image"] for s in compose_services().values()]
    tags += [re.search(r"^FROM (\S+)", p.read_text(), re.M)[1] for p in dockerfiles()]
    for tag in tags:
        assert tag.rsplit(":", 1)[1] == installed, f"{tag} is not flwr {installed}"
    assert {t.split(":")[0] for t in tags} >= set(BINARY_OF_IMAGE)
