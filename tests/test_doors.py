"""The three rooms' doors, checked: the client side loads none of the server's modules, `wire/`
loads neither torch nor flwr, `training/` loads no flwr. Each check imports in a fresh
interpreter, so what other tests imported cannot hide a door left open."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The project's server side: strategies and their aggregation, the methods' server parts and the
# model broadcast, sampling, the results writer and the start-up checks. (Flower's own
# flwr.clientapp imports flwr.serverapp; only ours count.)
SERVER_MODULES = {
    "fedbat_flwr.server_app",
    "fedbat_flwr.server_part",
    "fedbat_flwr.broadcast",
    "fedbat_flwr.methods.server",
    "fedbat_flwr.methods.server.fedbif",
    "fedbat_flwr.methods.server.fedpm",
    "fedbat_flwr.strategy",
    "fedbat_flwr.strategies",
    "fedbat_flwr.aggregators",
    "fedbat_flwr.sampling",
    "fedbat_flwr.results",
    "fedbat_flwr.preflight",
}


def _loaded(module: str) -> set[str]:
    """The modules importing `module` loads, in a fresh interpreter."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, module], capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("module", ["fedbat_flwr.client", "fedbat_flwr.client_app"])
def test_the_client_side_loads_no_server_module(module: str) -> None:
    assert not _loaded(module) & SERVER_MODULES


def test_importing_the_package_loads_neither_side() -> None:
    loaded = _loaded("fedbat_flwr")
    assert not {m for m in loaded if m.startswith("fedbat_flwr.")}
    assert "torch" not in loaded and "flwr" not in loaded


def test_wire_is_numpy_only() -> None:
    loaded = _loaded("fedbat_flwr.wire")
    assert "torch" not in loaded and "flwr" not in loaded


def test_training_loads_no_flower() -> None:
    loaded = _loaded("fedbat_flwr.training")
    assert not {m for m in loaded if m == "flwr" or m.startswith("flwr.")}
