"""fedbat_tools.stats (intervals over seeds, window means, paired differences) on known numbers,
and scripts/paired_seeds.py (its intervals and its warning when paired runs sampled other
clients) on tiny run folders; no training, no Flower."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest

from fedbat_tools.localrun import APP_DIR
from fedbat_tools.stats import (
    T_975,
    Z_975,
    Interval,
    last_rounds,
    mean_ci,
    paired,
    parse_window,
    t_975,
    window_mean,
)


def rows(accuracies: list[float | None], **extra: object) -> list[dict]:
    """metrics.jsonl rows of rounds 1..n (only the keys the helpers read)."""
    return [{"round": i, "test_accuracy": acc, **extra} for i, acc in enumerate(accuracies, 1)]


def test_interval_of_known_values() -> None:
    interval = mean_ci([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # s = 1 (ddof=1)
    assert interval.text(scale=1) == "2.0 ± 2.5 (n=3)"
    assert mean_ci([0.1, None, float("nan"), 0.3]) == mean_ci([0.1, 0.3]), "None, nan left out"
    assert mean_ci([0.1, 0.3]).half_width == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))


def test_one_seed_has_no_interval_and_none_has_no_mean() -> None:
    one = mean_ci([0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width) and one.n == 1
    assert one.text() == "50.0 (1 seed)"
    assert mean_ci([]).n == 0 and mean_ci([None]).text() == "–"
    assert Interval(0.013, 0.02, 3).text(signed=True) == "+1.3 ± 2.0 (n=3)"


def test_t_quantiles_then_the_normal_beyond_30_degrees_of_freedom() -> None:
    assert (t_975(1), t_975(2), t_975(30)) == (12.706, 4.303, 2.042)
    assert t_975(31) == t_975(1000) == Z_975 == 1.96
    assert len(T_975) == 30 and list(T_975) == sorted(T_975, reverse=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        t_975(0)


def test_window_mean_leaves_out_unevaluated_rounds_and_never_fills_a_short_run() -> None:
    run = rows([0.1, 0.2, None, 0.4, 0.6])
    assert window_mean(run, 2, 4) == pytest.approx(0.3)
    assert window_mean(run, 1, 5) == pytest.approx(0.325)
    assert window_mean(run, 4, 6) is None, "the run has no round 6"
    assert window_mean(run, 3, 3) is None, "no evaluated round in the window"
    assert window_mean([], 1, 1) is None


def test_default_window_is_the_last_ten_rounds() -> None:
    assert last_rounds(50) == (41, 50)
    assert last_rounds(12) == (3, 12)
    assert last_rounds(3) == (1, 3)


def test_parse_window() -> None:
    assert parse_window("41-50") == (41, 50) and parse_window("7-7") == (7, 7)
    for bad in ("50-41", "0-3", "3", "a-b", "-3-4"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected LO-HI"):
            parse_window(bad)


def test_paired_differences_over_the_seeds_both_have() -> None:
    result = paired({0: 0.80, 1: 0.90, 2: None, 4: 0.5}, {0: 0.70, 1: 0.85, 2: 0.6, 3: 0.5})
    assert result.by_seed == pytest.approx({0: 0.10, 1: 0.05})
    assert list(result.by_seed) == [0, 1]
    assert result.interval.mean == pytest.approx(0.075) and result.interval.n == 2
    spread = math.sqrt(2 * 0.025**2)  # sample std of 0.10 and 0.05
    assert result.interval.half_width == pytest.approx(12.706 * spread / math.sqrt(2))


# --- scripts/paired_seeds.py ----------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location(
        "paired_seeds", APP_DIR / "scripts/paired_seeds.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def write_rows(run_dir: Path, metrics: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))


def test_paired_seeds_gives_the_interval_of_the_mean_difference(tmp_path: Path) -> None:
    script = load_script()
    finals = {"ref": (0.70, 0.72, 0.74), "new": (0.71, 0.75, 0.74)}
    for name, values in finals.items():
        for seed, acc in enumerate(values):
            write_rows(tmp_path / f"{name}-s{seed}", rows([0.5, acc], sampled_partitions=[seed]))
    runs = {name: str(tmp_path / (name + "-s{seed}")) for name in finals}
    text = script.table(runs, "ref", [0, 1, 2], [(2, 2), (1, 2)])
    assert "Warning" not in text, "same sampled partitions in every round"
    half = 4.303 * 1.5275 / math.sqrt(3)  # diffs +1, +3, 0 points: s = 1.5275
    assert f"| **new** | mean of 3 | 73.3 | 73.3 | 61.7 | +1.3 ± {half:.1f} (n=3) |" in text


def test_paired_seeds_warns_when_paired_runs_sampled_other_partitions(tmp_path: Path) -> None:
    script = load_script()
    write_rows(tmp_path / "ref-s0", rows([0.5, 0.6, 0.7], sampled_partitions=[1, 2]))
    write_rows(tmp_path / "ref-s1", rows([0.5, 0.6, 0.7], sampled_partitions=[1, 2]))
    seeded = rows([0.5, 0.6, 0.7], sampled_partitions=[1, 2])
    seeded[1]["sampled_partitions"] = [3, 4]
    write_rows(tmp_path / "new-s0", seeded)
    write_rows(tmp_path / "new-s1", rows([0.5, 0.6, 0.7]))  # made before seeded sampling
    runs = {"ref": str(tmp_path / "ref-s{seed}"), "new": str(tmp_path / "new-s{seed}")}
    lines = script.table(runs, "ref", [0, 1], [(2, 3)]).splitlines()
    assert lines[0].startswith("> **Warning: some paired runs did not sample the same clients")
    assert "> - new seed 0 vs ref: sampled_partitions differ in 1 round(s): 2" in lines
    assert "> - new seed 1 vs ref: no sampled_partitions recorded (not seeded sampling)" in lines
    assert not any(line.startswith("> - ref") for line in lines)
