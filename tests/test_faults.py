"""Issue 6: a ClientApp that raises or hangs is a failed reply, and the round goes on without it.

Real simulation runs (`flwr run` on the shared SuperLink, 4 SuperNodes, small data) with the
ClientApp's test hook (`client_app.inject_fault`) making partition 1 fail:

- "raise", every round: Flower sends the server an error reply, which is rejected;
- "hang", in round 4: the ClientApp sleeps 1.5 x `round-timeout`, so the server stops waiting
  at the timeout (`strategy.start(timeout=...)`) and aggregates the three replies it has.

Either way the round's results row says `num_replies` 3, `num_rejected` 1, model updated.
The "raise" run's healthy ClientApps run FedPAQ, so it is also the end-to-end run of FedPAQ's
payload kind (tests/test_methods_e2e.py): its three 4-bit replies are accepted every round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbat_tools.localrun import LocalSuperLink

pytestmark = pytest.mark.e2e

RUN_CONFIG = {
    "num-server-rounds": 2,
    "max-examples-per-client": 64,
    "max-test-examples": 200,
    "local-epochs": 1,
    "fault-partition": 1,
}
# The server waits this long in the round the ClientApp hangs (it sleeps 1.5x this). Every
# round has this bound: round 1's ClientApps start cold (Ray, torch), which on a busy 2-core
# machine takes longer, and replies that come too late still occupy the two ClientApp actors
# in the next round (measured 2026-12-02, AMD EPYC, 2 cores, load ~7: round 1 lost all four
# replies to a 30 s bound, round 2 took 19 s, warm rounds 1 s). The hang is in round 4: by
# then three rounds' time has cleared any such backlog, and three warm trainings take seconds.
HANG_ROUND_TIMEOUT = 20
HANG_ROUND = 4


def _run(link: LocalSuperLink, out: Path, name: str, **overrides: Any) -> list[dict]:
    federation = overrides.pop("federation", None)
    lines: list[str] = []
    config = {**RUN_CONFIG, **overrides, "output-dir": str(out), "run-name": name}
    code = link.run(
        config, num_supernodes=4, on_line=lines.append, timeout=900, federation=federation
    )
    assert code == 0, "\n".join(lines[-40:])
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(
            f"{name} round {r['round']}: replies {r['num_replies']}, rejected {r['num_rejected']}, "
            f"{r['round_seconds']:.1f} s"
        )
    return rows


def test_a_clientapp_that_raises_is_a_failed_reply(superlink: LocalSuperLink, tmp_path: Path):
    rows = _run(superlink, tmp_path, "fault-raise", **{"fault-kind": "raise", "method": "fedpaq"})
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["num_replies"], row["num_rejected"]) == (3, 1), row
        assert row["model_updated"] is True and row["method"] == "fedpaq"
        assert 4.0 < row["uplink_bits_per_param"] <= 4.1  # 4-bit entries + scales, framing
        assert 31.9 < row["downlink_bits_per_param"] < 33  # dense float32 global model


def test_a_clientapp_that_hangs_misses_the_round_timeout(superlink: LocalSuperLink, tmp_path):
    rows = _run(
        superlink,
        tmp_path,
        "fault-hang",
        federation={"client-resources-num-cpus": 1},  # two ClientApps at once: one may hang
        **{
            "fault-kind": "hang",
            "fault-round": HANG_ROUND,
            "num-server-rounds": HANG_ROUND + 1,
            "round-timeout": HANG_ROUND_TIMEOUT,
        },
    )
    assert [r["round"] for r in rows] == list(range(1, HANG_ROUND + 2))
    hung, after = rows[HANG_ROUND - 1], rows[HANG_ROUND]
    assert (hung["num_replies"], hung["num_rejected"]) == (3, 1), hung
    assert hung["model_updated"] is True
    assert hung["round_seconds"] >= HANG_ROUND_TIMEOUT - 1, "the server waited for the timeout"
    # The hung ClientApp wakes up during the next round and may or may not answer it in time.
    assert after["num_replies"] >= 3 and after["model_updated"] is True, after
