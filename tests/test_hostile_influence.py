"""Issue 19: an accepted reply's influence is bounded for every payload kind, once per node.

- One reply per node per round: a replayed message counts once, later copies are rejected.
- Fixed-step methods (SignSGD, Noisy-SignSGD, Stoc-SignSGD): the server accepts exactly the
  configured alpha (`Method.step_bounds`), not whatever step a client sends.
- Data-sized steps (EF-SignSGD's alpha, FedPAQ's scale, top-k's values: tests/test_validation.py;
  FedBiF's full-precision BatchNorm affine here) are bounded by `max-update-entry`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import get_method
from fedbat_flwr.records import payload_to_record, record_to_arrays
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.wire import (
    AlphaBounds,
    PayloadError,
    decode_payload,
    encode_signs,
)
from fedbat_flwr.wire.fedbif import encode_fedbif_bits
from tests.payloads import SPEC, make_strategy, to_record, valid_payload
from tests.strategy_helpers import FEDBIF_SPEC, fedbif_strategy, reply

# -- one reply per node per round ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["signs", "kbit", "dense"])
def test_the_same_reply_delivered_five_times_counts_once(kind: str) -> None:
    rng = np.random.default_rng(0)
    honest = reply(1, to_record(kind, valid_payload(kind, rng)), 40)
    replayed = reply(2, to_record(kind, valid_payload(kind, rng)), 40)
    strategy = make_strategy(kind)
    arrays, _ = strategy.aggregate_train(1, [honest, *[replayed] * 5])
    assert strategy.rounds[1].num_replies == 2 and strategy.rounds[1].num_rejected == 4
    once, _ = make_strategy(kind).aggregate_train(1, [honest, replayed])
    got, expected = record_to_arrays(arrays), record_to_arrays(once)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_second_reply_of_a_node_is_rejected_even_if_it_differs() -> None:
    rng = np.random.default_rng(1)
    first = reply(3, to_record("signs", valid_payload("signs", rng)), 40)
    second = reply(3, to_record("signs", valid_payload("signs", rng)), 40)
    strategy = make_strategy("signs")
    arrays, _ = strategy.aggregate_train(1, [first, second])
    assert strategy.rounds[1].num_replies == 1 and strategy.rounds[1].num_rejected == 1
    alone, _ = make_strategy("signs").aggregate_train(1, [first])
    for name, value in record_to_arrays(alone).items():
        np.testing.assert_array_equal(record_to_arrays(arrays)[name], value, err_msg=name)


# -- fixed-step methods: the configured alpha, exactly -----------------------------------------

FIXED = {"signsgd": "signsgd-alpha", "noisy-signsgd": "noisy-alpha", "stoc-signsgd": "stoc-alpha"}


def _signs_payload(alpha: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    bits = {t.name: rng.random(t.shape) < 0.5 for t in SPEC}
    steps = {t.name: (alpha if t.kind == "param" else 0.1) for t in SPEC}
    return encode_signs(SPEC, bits, steps)


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_step_methods_accept_only_their_configured_alpha(name: str) -> None:
    config = RunConfig(method=name, extra={FIXED[name]: 0.003})
    method = get_method(name)
    bounds = method.step_bounds(config)
    decode_payload(method.payload_kind, _signs_payload(0.003), SPEC, bounds)  # the config's alpha
    for alpha in (0.0031, 0.002, 5.2e30):
        with pytest.raises(PayloadError, match="alphas"):
            decode_payload(method.payload_kind, _signs_payload(alpha), SPEC, bounds)


@pytest.mark.parametrize("name", sorted(FIXED))
def test_a_fixed_step_client_inflating_its_alpha_is_one_rejection(name: str) -> None:
    config = RunConfig(method=name)
    method = get_method(name)
    alpha = method(config).alpha
    strategy = build_strategy(
        "fedavg",
        spec=SPEC,
        payload_kind=method.payload_kind,
        bounds=method.step_bounds(config),
        max_num_examples=100,
        min_train_nodes=1,
    )
    strategy.global_arrays = {t.name: np.ones(t.shape, np.float32) for t in SPEC}
    honest = reply(1, payload_to_record(_signs_payload(alpha)), 10)
    greedy = reply(2, payload_to_record(_signs_payload(1e3)), 10)
    strategy.aggregate_train(1, [honest, greedy])
    assert strategy.rounds[1].num_replies == 1 and strategy.rounds[1].num_rejected == 1


def test_data_sized_methods_keep_the_run_bounds() -> None:
    config = RunConfig(max_update_entry=0.25, stat_alpha_max=3.0)
    for name in ("fedbat", "ef-signsgd", "fedpaq", "topk", "fedbif"):
        bounds = get_method(name).step_bounds(config)
        assert bounds.update == 0.25 and bounds.stat == (0.0, 3.0)
        assert bounds.param == (config.alpha_min, config.alpha_max)


# -- FedBiF: full-precision BatchNorm affine within max-update-entry ---------------------------


def _bif_uplink(affine_step: float, stat_step: float) -> dict[str, np.ndarray]:
    planes = {"conv.weight": np.ones((1, 1, 2), bool)}
    signs = {"bn.weight": np.ones(2, bool), "bn.running_var": np.ones(2, bool)}
    steps = {"bn.weight": affine_step, "bn.running_var": stat_step}
    return encode_fedbif_bits(FEDBIF_SPEC, 4, [3], planes, signs, steps)


def test_fedbif_affine_steps_are_bounded_by_max_update_entry_not_the_stat_bound() -> None:
    """FedBiF's BatchNorm weight used to accept a step up to stat-alpha-max (20); it is a
    parameter whose step the client's data decides, bounded like every other such step."""
    bounds = AlphaBounds(stat=(0.0, 20.0), update=0.5)
    decode_payload("fedbif-bits", _bif_uplink(0.5, 20.0), FEDBIF_SPEC, bounds)  # both at the edge
    with pytest.raises(PayloadError, match=r"bn\.weight"):
        decode_payload("fedbif-bits", _bif_uplink(20.0, 1.0), FEDBIF_SPEC, bounds)
    with pytest.raises(PayloadError, match=r"bn\.running_var"):
        decode_payload("fedbif-bits", _bif_uplink(0.1, 20.5), FEDBIF_SPEC, bounds)
    strategy = fedbif_strategy(bounds)
    good, bad = _bif_uplink(0.1, 0.1), _bif_uplink(20.0, 0.1)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, payload_to_record(good)), reply(2, payload_to_record(bad))]
    )
    assert arrays is not None
    assert strategy.rounds[1].num_replies == 1 and strategy.rounds[1].num_rejected == 1


# -- the run-config key --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_max_update_entry_is_a_checked_run_config_key(value: float) -> None:
    with pytest.raises(ConfigError, match="max-update-entry"):
        RunConfig.from_flower({"max-update-entry": value})


def test_max_update_entry_default_is_the_same_in_pyproject_and_run_config() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    assert table["max-update-entry"] == RunConfig().max_update_entry == AlphaBounds().update
