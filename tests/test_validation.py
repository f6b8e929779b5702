"""Issue 6: every reply of every payload kind is validated before it touches the model, one
accepted client's influence is bounded (where the kind allows), huge `num-examples` claims are
capped or rejected, and the coordinate-wise median resists a minority of attackers.

tests/test_fuzz.py hammers the same rules with generated mutations; here each rule has one
readable case.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, Message

from fedbat_flwr.aggregators import SignVote
from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.records import payload_to_record, record_to_arrays, record_to_payload
from fedbat_flwr.results import RoundStats
from fedbat_flwr.wire import (
    PayloadError,
    decode_payload,
    encode_kbit,
    encode_signs,
    encode_sparse,
)
from fedbat_flwr.wire.votes import sign_median
from tests.payloads import (
    BOUNDS,
    CAP,
    KBIT_BITS,
    KINDS,
    SIGN_KINDS,
    SPEC,
    float_fields,
    global_arrays,
    make_strategy,
    pad_bits,
    to_record,
    valid_payload,
)
from tests.strategy_helpers import error_reply, reply

Payload = dict[str, np.ndarray]
FLOAT32_MAX = float(np.finfo(np.float32).max)
# max-update-entry at float32's limit: what the aggregation must survive without the bound.
UNBOUNDED = replace(BOUNDS, update=FLOAT32_MAX)


def _honest(kind: str, seed: int = 1, count: int = 3) -> list[Message]:
    rng = np.random.default_rng(seed)
    return [
        reply(i, to_record(kind, valid_payload(kind, rng)), num_examples=100 * i)
        for i in range(1, count + 1)
    ]


def _model(strategy, replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = strategy.aggregate_train(1, replies)
    return record_to_arrays(arrays)


# -- 1. a bad reply of any kind is rejected, and the model is as if it had not been sampled ------


def _truncated(kind: str, p: Payload) -> Message:
    key = sorted(p)[-1]
    return reply(9, to_record(kind, {**p, key: p[key][:-1]}))


def _extra_array(kind: str, p: Payload) -> Message:
    return reply(9, to_record(kind, {**p, "extra": np.zeros(2, np.uint8)}))


def _wrong_dtype(kind: str, p: Payload) -> Message:
    key = sorted(p)[0]
    return reply(9, to_record(kind, {**p, key: p[key].astype(np.int32)}))


def _nan_value(kind: str, p: Payload) -> Message:
    key = sorted(float_fields(kind, p))[0]
    flat = p[key].reshape(-1).copy()
    flat[0] = np.nan
    return reply(9, to_record(kind, {**p, key: flat.reshape(p[key].shape)}))


def _bad_header(kind: str, p: Payload) -> Message:
    if kind == "dense":
        pytest.skip("dense weights carry no header")
    header = p["header"].copy()
    header[3] += 1  # layout version
    return reply(9, to_record(kind, {**p, "header": header}))


def _pad_bit(kind: str, p: Payload) -> Message:
    if not pad_bits(kind, p):
        pytest.skip(f"{kind} payloads of this spec have no pad bits")
    field, byte, mask = pad_bits(kind, p)[0]
    stream = p[field].copy()
    stream[byte] |= np.uint8(mask & -mask)  # the lowest pad bit
    return reply(9, to_record(kind, {**p, field: stream}))


BAD: dict[str, Callable[[str, Payload], Message]] = {
    "truncated": _truncated,
    "extra-array": _extra_array,
    "wrong-dtype": _wrong_dtype,
    "nan-value": _nan_value,
    "bad-header": _bad_header,
    "pad-bit": _pad_bit,
    "zero-examples": lambda kind, p: reply(9, to_record(kind, p), num_examples=0),
    "float-examples": lambda kind, p: reply(9, to_record(kind, p), num_examples=12.0),
    "nan-metric": lambda kind, p: reply(9, to_record(kind, p), loss=float("nan")),
    "list-metric": lambda kind, p: reply(9, to_record(kind, p), loss=[1.0, 2.0]),
    "no-arrays": lambda kind, p: reply(9, None),
    "error": lambda kind, p: error_reply(9),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("kind", KINDS)
def test_bad_reply_of_every_kind_is_rejected_as_if_not_sampled(kind: str, case: str) -> None:
    honest = _honest(kind)
    bad = BAD[case](kind, valid_payload(kind, np.random.default_rng(7)))
    alone = _model(make_strategy(kind), honest)
    strategy = make_strategy(kind)
    new = _model(strategy, [honest[0], bad, *honest[1:]])
    for name, value in alone.items():
        np.testing.assert_array_equal(new[name], value, err_msg=name)
    assert (strategy.rounds[1].num_replies, strategy.rounds[1].num_rejected) == (3, 1)


def test_rejection_is_logged_with_node_field_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    strategy = make_strategy("signs")
    payload = valid_payload("signs", np.random.default_rng(0))
    payload["alphas"][1] = 0.5  # above alpha-max
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, [*_honest("signs"), reply(42, payload_to_record(payload))])
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "node 42" in line and "'bn.weight'" in line and "'alphas'" in line
    assert "alpha=0.5 is out of range" in line


def test_replies_that_never_came_count_as_rejected() -> None:
    """A ClientApp that hangs past round-timeout sends nothing: sampled but not aggregated."""
    strategy = make_strategy("signs")
    strategy.rounds[1] = RoundStats(num_sent=4)
    strategy.aggregate_train(1, _honest("signs"))
    assert (strategy.rounds[1].num_replies, strategy.rounds[1].num_rejected) == (3, 1)


def test_replies_with_different_metric_keys_aggregate_their_shared_ones() -> None:
    """Flower raises on replies whose metric keys differ; one client must not stop the round."""
    for kind in ("dense", "signs"):
        honest = _honest(kind)
        honest[0].content["metrics"]["train-loss"] = 0.5
        strategy = make_strategy(kind)
        arrays, metrics = strategy.aggregate_train(1, honest)
        assert arrays is not None and strategy.rounds[1].num_rejected == 0
        assert "train-loss" not in metrics


def test_dense_reply_of_raw_arrays_is_averaged_from_its_validated_weights() -> None:
    """Flower's FedAvg reads `.npy` Arrays only; raw ones used to crash its aggregation."""
    payload = valid_payload("dense", np.random.default_rng(3))
    as_npy = _model(
        make_strategy("dense"), [*_honest("dense"), reply(9, to_record("dense", payload))]
    )
    as_raw = _model(
        make_strategy("dense"), [*_honest("dense"), reply(9, payload_to_record(payload))]
    )
    for name, value in as_npy.items():
        np.testing.assert_array_equal(as_raw[name], value)


def test_npy_array_claiming_a_huge_shape_is_refused_before_allocating_it() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**11,)}
    )
    forged = Array("float32", (10**11,), "numpy.ndarray", header.getvalue() + bytes(16))
    record = to_record("dense", valid_payload("dense", np.random.default_rng(0)))
    record["bn.weight"] = forged
    with pytest.raises(PayloadError, match="shape"):
        record_to_payload(record)


# -- 2. influence of one accepted client -------------------------------------------------------


def _own_step(strategy, honest: list[Message], new: dict[str, np.ndarray], p: float):
    """What the attacker added to each weight, in its tensor's domain: the new model minus the
    honest clients' weighted steps (their weights p_k share the total with the attacker)."""
    total = sum(int(m.content["metrics"]["num-examples"]) for m in honest) / (1 - p)
    steps = {t.name: np.zeros(t.shape, np.float64) for t in SPEC}
    for m in honest:
        payload = record_to_payload(m.content["arrays"])
        decoded = decode_payload(strategy.payload_kind, payload, SPEC, BOUNDS).delta()
        weight = int(m.content["metrics"]["num-examples"]) / total
        for name in steps:
            steps[name] += weight * decoded[name]
    w = strategy.global_arrays
    return {
        t.name: (np.log(new[t.name] / w[t.name]) if t.domain == "log" else new[t.name] - w[t.name])
        - steps[t.name]
        for t in SPEC
    }


def _p_of_capped_attacker(honest: list[Message]) -> float:
    return CAP / (CAP + sum(int(m.content["metrics"]["num-examples"]) for m in honest))


def test_one_signs_client_moves_a_weight_by_at_most_p_alpha_max() -> None:
    """FedBAT: |own step| <= p * alpha-max on parameters, p * stat-alpha-max on statistics (in
    their domain), and an attacker at the bounds, claiming 10^12 examples, reaches exactly that."""
    honest = _honest("signs")
    rng = np.random.default_rng(5)
    bits = {t.name: rng.random(t.shape) < 0.5 for t in SPEC}
    alphas = {t.name: BOUNDS.for_tensor(t)[1] for t in SPEC}
    attacker = reply(9, payload_to_record(encode_signs(SPEC, bits, alphas)), num_examples=10**12)
    strategy = make_strategy("signs")
    p = _p_of_capped_attacker(honest)
    own = _own_step(strategy, honest, _model(strategy, [*honest, attacker]), p)
    for t in SPEC:
        bound = p * BOUNDS.for_tensor(t)[1]
        np.testing.assert_allclose(np.abs(own[t.name]), bound, rtol=1e-4, err_msg=t.name)


def _at_steps(kind: str, step: dict[str, float]) -> Payload:
    """Every entry of every tensor moved by exactly `step[tensor]` (all signs +)."""
    ones = {t.name: np.ones(t.shape, bool) for t in SPEC}
    if kind == "signs-unbounded":
        return encode_signs(SPEC, ones, step)
    if kind == "kbit":
        top = (1 << KBIT_BITS) - 1
        return encode_kbit(SPEC, {n: b.astype(np.uint8) * top for n, b in ones.items()}, step, 4)
    every = {t.name: np.arange(t.size) for t in SPEC}
    return encode_sparse(SPEC, every, {t.name: np.full(t.size, step[t.name]) for t in SPEC})


@pytest.mark.parametrize("kind", ["signs-unbounded", "kbit", "sparse"])
def test_data_sized_steps_are_bounded_by_max_update_entry(kind: str) -> None:
    """EF-SignSGD, FedPAQ, top-k: a parameter moves at most p * max-update-entry, a BatchNorm
    statistic p * stat-alpha-max; a client at both bounds reaches exactly that, and one
    float32 ulp past either bound is rejected."""
    step = {t.name: (BOUNDS.update if t.kind == "param" else BOUNDS.stat[1]) for t in SPEC}
    honest = _honest(kind)
    attacker = reply(9, payload_to_record(_at_steps(kind, step)), num_examples=CAP)
    strategy = make_strategy(kind)
    p = _p_of_capped_attacker(honest)
    own = _own_step(strategy, honest, _model(strategy, [*honest, attacker]), p)
    for t in SPEC:
        np.testing.assert_allclose(own[t.name], p * step[t.name], rtol=1e-4, err_msg=t.name)
    for name in ("bn.running_var", "conv.weight"):
        over = {**step, name: float(np.nextafter(np.float32(step[name]), np.float32(np.inf)))}
        strategy = make_strategy(kind)
        strategy.aggregate_train(1, [*honest, reply(9, payload_to_record(_at_steps(kind, over)))])
        assert strategy.rounds[1].num_rejected == 1, name


def test_dense_influence_is_unbounded_by_design_but_not_under_fedmedian() -> None:
    honest = _honest("dense")
    huge = {t.name: np.full(t.shape, 1e6, np.float32) for t in SPEC}
    attacker = reply(9, to_record("dense", huge), num_examples=CAP)
    p = _p_of_capped_attacker(honest)
    mean = _model(make_strategy("dense"), [*honest, attacker])
    assert mean["conv.weight"].min() > 0.9 * p * 1e6  # the weighted mean follows the attacker
    median = _model(make_strategy("dense", "fedmedian"), [*honest, attacker])
    assert np.abs(median["conv.weight"]).max() < 2  # the median stays with the honest clients


# -- 2b. num-examples-policy ----------------------------------------------------------------


def test_cap_policy_weighs_a_huge_claim_as_the_cap() -> None:
    honest = _honest("signs")
    record = to_record("signs", valid_payload("signs", np.random.default_rng(4)))
    greedy = _model(make_strategy("signs"), [*honest, reply(9, record, num_examples=10**12)])
    capped = _model(make_strategy("signs"), [*honest, reply(9, record, num_examples=CAP)])
    for name, value in capped.items():
        np.testing.assert_array_equal(greedy[name], value)


def test_reject_policy_drops_a_huge_claim_and_keeps_the_cap_itself() -> None:
    honest = _honest("signs")
    record = to_record("signs", valid_payload("signs", np.random.default_rng(4)))
    strategy = make_strategy("signs", policy="reject")
    new = _model(strategy, [*honest, reply(9, record, num_examples=CAP + 1)])
    alone = _model(make_strategy("signs"), honest)
    for name, value in alone.items():
        np.testing.assert_array_equal(new[name], value)
    assert strategy.rounds[1].num_rejected == 1
    strategy = make_strategy("signs", policy="reject")
    strategy.aggregate_train(1, [*honest, reply(9, record, num_examples=CAP)])
    assert strategy.rounds[1].num_rejected == 0


def test_num_examples_policy_is_a_checked_run_config_key() -> None:
    assert RunConfig().num_examples_policy == "cap"
    assert RunConfig.from_flower({"num-examples-policy": "reject"}).num_examples_policy == "reject"
    with pytest.raises(ConfigError, match="'num-examples-policy' = 'drop' is not allowed"):
        RunConfig.from_flower({"num-examples-policy": "drop"})
    with pytest.raises(ValueError, match="'num-examples-policy' = 'drop' is unknown"):
        make_strategy("signs", policy="drop")
    with pytest.raises(ConfigError, match=r"'round-timeout' = 0\.0 is out of range"):
        RunConfig.from_flower({"round-timeout": 0})


# -- 3. coordinate-wise median of sign updates ----------------------------------------------------


@pytest.mark.parametrize("kind", SIGN_KINDS)
def test_sign_median_equals_flowers_fedmedian_on_the_implied_weights(kind: str) -> None:
    fifth = _honest(kind, seed=2, count=1)[0].content["arrays"]
    replies = [*_honest(kind, count=4), reply(5, fifth, num_examples=500)]
    strategy = make_strategy(kind, "sign-median")
    assert isinstance(strategy.aggregator, SignVote)
    assert strategy.aggregator.vote is sign_median
    ours = _model(strategy, replies)
    flowers = _model(make_strategy(kind, "fedmedian"), replies)
    for name, value in flowers.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, err_msg=name)


def test_sign_median_stays_within_the_honest_steps_under_attack() -> None:
    """7 honest clients, 3 attackers sending the negated signs with a huge alpha and the cap:
    every coordinate's step stays within the honest steps (the mean is dragged away)."""
    rng = np.random.default_rng(8)
    direction = {t.name: rng.random(t.shape) < 0.5 for t in SPEC}
    honest, steps = [], []
    for i in range(7):
        bits = {n: np.where(rng.random(b.shape) < 0.9, b, ~b) for n, b in direction.items()}
        alphas = {t.name: float(rng.uniform(0.001, 0.01)) for t in SPEC}
        payload = encode_signs(SPEC, bits, alphas)
        honest.append(reply(i + 1, payload_to_record(payload), num_examples=50))
        steps.append(decode_payload("signs-unbounded", payload, SPEC, BOUNDS).delta())
    flipped = {n: ~b for n, b in direction.items()}
    evil = encode_signs(SPEC, flipped, {t.name: (1e3 if t.kind == "param" else 10.0) for t in SPEC})
    attackers = [reply(20 + i, payload_to_record(evil), num_examples=10**9) for i in range(3)]
    w = global_arrays()
    wide = replace(BOUNDS, update=1e3)  # the attackers' alpha within max-update-entry
    median = _model(
        make_strategy("signs-unbounded", "sign-median", bounds=wide), honest + attackers
    )
    mean = _model(make_strategy("signs-unbounded", bounds=wide), honest + attackers)
    for t in SPEC:
        if t.domain == "log":
            continue
        lo = np.min([s[t.name] for s in steps], axis=0)
        hi = np.max([s[t.name] for s in steps], axis=0)
        own = median[t.name] - w[t.name]
        assert (own >= lo - 1e-6).all() and (own <= hi + 1e-6).all(), t.name
        if t.kind == "param":
            assert np.abs(mean[t.name] - w[t.name]).min() > 100, "the mean follows the attackers"


def test_sign_median_needs_a_sign_payload() -> None:
    with pytest.raises(ConfigError, match=r"'sign-median' votes on sign payloads.*'fedavg'"):
        make_strategy("kbit", "sign-median")


def test_an_unknown_aggregator_is_refused_with_the_allowed_names() -> None:
    with pytest.raises(ConfigError, match=r"'aggregator' = 'avg' is not allowed; allowed: 'fed"):
        make_strategy("signs", "avg")


def test_sign_median_of_two_float32_max_steps_does_not_overflow() -> None:
    ones = {t.name: np.ones(t.shape, bool) for t in SPEC}
    huge = {t.name: (FLOAT32_MAX if t.kind == "param" else 1.0) for t in SPEC}
    record = payload_to_record(encode_signs(SPEC, ones, huge))
    strategy = make_strategy("signs-unbounded", "sign-median", bounds=UNBOUNDED)
    strategy.global_arrays = {t.name: np.zeros(t.shape, np.float32) + 1 for t in SPEC}
    new = _model(strategy, [reply(1, record), reply(2, record)])
    assert np.isfinite(new["conv.weight"]).all() and new["conv.weight"].min() > 1e38


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_an_aggregate_past_float32_keeps_the_previous_model() -> None:
    """Valid replies of an unbounded kind can still sum past float32's range: no inf model."""
    ones = {t.name: np.ones(t.shape, bool) for t in SPEC}
    huge = {t.name: (FLOAT32_MAX if t.kind == "param" else 1.0) for t in SPEC}
    strategy = make_strategy("signs-unbounded", bounds=UNBOUNDED)
    strategy.global_arrays["conv.weight"][:] = FLOAT32_MAX / 2
    record = payload_to_record(encode_signs(SPEC, ones, huge))
    assert strategy.aggregate_train(1, [reply(1, record)]) == (None, None)
    assert strategy.rounds[1].num_replies == 1 and strategy.rounds[1].model_updated is False
