"""End to end through Flower's simulation runtime (one shared SuperLink, tests/conftest.py):
FedBiF and FedPM, whose servers have their own downlink and aggregation (server rules), measured
on the wire both ways, two rounds each, so that round 2 trains from the first aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedbat_flwr.results import METRIC_KEYS, load_arrays
from fedbat_tools.localrun import LocalSuperLink

pytestmark = pytest.mark.e2e

ROUNDS = 2
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "max-examples-per-client": 100,
    "max-test-examples": 500,
    "local-epochs": 1,
}


def run(link: LocalSuperLink, tmp_path: Path, name: str, **extra: object) -> list[dict]:
    lines: list[str] = []
    config = {**RUN_CONFIG, "method": name, "output-dir": str(tmp_path), "run-name": name, **extra}
    code = link.run(config, num_supernodes=3, on_line=lines.append, timeout=600)
    assert code == 0, "\n".join(lines[-40:])
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row) and row["method"] == name
        assert row["num_replies"] == 3 and row["num_rejected"] == 0
        assert 0.0 <= row["model_sparsity"] <= 1.0
        assert np.isfinite(row["test_loss"])
    return rows


def test_fedbif_sends_4_bits_down_and_1_bit_up(superlink: LocalSuperLink, tmp_path: Path):
    rows = run(superlink, tmp_path, "fedbif")
    for row in rows:
        assert 4.0 < row["downlink_bits_per_param"] <= 4.1  # m = 4 bits + alphas + BN float16
        assert 1.0 < row["uplink_bits_per_param"] <= 1.05  # 1 activated bit + BN 1-bit
    model = load_arrays(tmp_path / "fedbif" / "model.npz")
    assert all(np.isfinite(v).all() for v in model.values())


def test_fedpm_range_codes_masks_and_saves_a_masked_random_network(
    superlink: LocalSuperLink, tmp_path: Path
):
    rows = run(superlink, tmp_path, "fedpm", **{"fedpm-entropy-coding": True})
    for row in rows:
        assert 15.9 < row["downlink_bits_per_param"] < 16.1  # theta as float16 (BN affine: none)
        assert row["uplink_bits_per_param"] <= 1.05  # <= 1 bit a weight + BN 1-bit
    model = load_arrays(tmp_path / "fedpm" / "model.npz")
    w = model["features.4.weight"]  # frozen +-e/sqrt(288) where the mask keeps it, else 0
    c = np.float32(np.e / np.sqrt(288))
    assert np.isin(np.abs(w), [0.0, c]).all()
    assert abs(float((w == 0).mean()) - rows[-1]["model_sparsity"]) < 0.05
