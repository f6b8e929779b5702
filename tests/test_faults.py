"""Issue 6: a ClientApp that raises or hangs is a failed reply, and the round goes on without it.

Real simulation runs (`flwr run` on a SuperLink we own, 4 SuperNodes, 2 rounds, small data)
with the ClientApp's test hook (`client_app.inject_fault`) making partition 1 fail:

- "raise": Flower sends the server an error reply, which is rejected;
- "hang": the ClientApp sleeps 1.5 x `round-timeout`, so the server stops waiting at the
  timeout (`strategy.start(timeout=...)`) and aggregates the three replies it has.

Either way the round's results row says `num_replies` 3, `num_rejected` 1, model updated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbat_flwr.localrun import LocalSuperLink, _alive, descendants

pytestmark = pytest.mark.e2e

RUN_CONFIG = {
    "num-server-rounds": 2,
    "max-examples-per-client": 200,
    "max-test-examples": 500,
    "local-epochs": 1,
    "fault-partition": 1,
}
# Long enough for the three healthy ClientApps to start and train one after another on a
# loaded 2-core machine; the hung one sleeps 1.5x this.
HANG_ROUND_TIMEOUT = 60


@pytest.fixture(scope="module")
def superlink():
    link = LocalSuperLink()
    link.start()
    tree = [link.process.pid, *descendants(link.process.pid)]
    yield link
    link.stop()
    assert not [pid for pid in tree if _alive(pid)], "the SuperLink left processes behind"


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
    rows = _run(superlink, tmp_path, "fault-raise", **{"fault-kind": "raise"})
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["num_replies"], row["num_rejected"]) == (3, 1), row
        assert row["model_updated"] is True


def test_a_clientapp_that_hangs_misses_the_round_timeout(superlink: LocalSuperLink, tmp_path):
    rows = _run(
        superlink,
        tmp_path,
        "fault-hang",
        federation={"client-resources-num-cpus": 1},  # two ClientApps at once: one may hang
        **{"fault-kind": "hang", "fault-round": 1, "round-timeout": HANG_ROUND_TIMEOUT},
    )
    first, second = rows
    assert (first["num_replies"], first["num_rejected"]) == (3, 1), first
    assert first["model_updated"] is True
    assert first["round_seconds"] >= HANG_ROUND_TIMEOUT - 1, "the server waited for the timeout"
    # The hung ClientApp wakes up during round 2 and may or may not answer it in time.
    assert second["num_replies"] >= 3 and second["model_updated"] is True, second
