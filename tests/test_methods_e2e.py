"""Every registered method runs one round through the real Flower simulation runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbat_flwr.localrun import LocalSuperLink
from fedbat_flwr.methods import method_names

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def superlink() -> Iterator[LocalSuperLink]:
    with LocalSuperLink() as link:
        yield link


@pytest.mark.parametrize("method", method_names())
def test_method_runs_one_round_in_simulation(
    superlink: LocalSuperLink, tmp_path: Path, method: str
):
    config = {
        "method": method,
        "num-server-rounds": 1,
        "max-examples-per-client": 64,
        "max-test-examples": 200,
        "output-dir": str(tmp_path),
        "run-name": method,
    }
    lines: list[str] = []
    code = superlink.run(config, num_supernodes=3, on_line=lines.append, timeout=300)
    assert code == 0, "\n".join(lines[-30:])
    rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == method
    assert rows[0]["num_replies"] == 3 and rows[0]["num_rejected"] == 0, lines[-30:]
    assert rows[0]["model_updated"] is True
    assert 0 < rows[0]["uplink_bits_per_param"] < 33


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "fedbat", "downlink-bits": 4, "bn-payload": "float16"},
        {"method": "fedavg", "downlink-bits": 2},
    ],
    ids=["fedbat-down4-bn16", "fedavg-down2"],
)
def test_compressed_downlink_and_float_batchnorm_in_simulation(
    superlink: LocalSuperLink, tmp_path: Path, extra: dict[str, object]
):
    """The quantized broadcast reaches real ClientApps, which train from it; float BatchNorm
    replies are accepted; both directions are measured from the serialized messages."""
    config = {
        **extra,
        "num-server-rounds": 1,
        "max-examples-per-client": 64,
        "max-test-examples": 200,
        "output-dir": str(tmp_path),
        "run-name": "run",
    }
    lines: list[str] = []
    code = superlink.run(config, num_supernodes=3, on_line=lines.append, timeout=300)
    assert code == 0, "\n".join(lines[-30:])
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["num_replies"] == 3 and row["num_rejected"] == 0, lines[-30:]
    bits = int(extra["downlink-bits"])  # type: ignore[call-overload]
    assert bits < row["downlink_bits_per_param"] <= bits + 0.2
    if extra["method"] == "fedbat":
        assert 1.05 < row["uplink_bits_per_param"] <= 1.10  # signs + float16 BatchNorm
