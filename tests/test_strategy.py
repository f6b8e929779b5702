"""The strategy side of Eq. 11: decode, validate, weigh and aggregate replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbat_flwr.aggregators import StreamedMean
from fedbat_flwr.records import payload_to_record, record_to_arrays, record_to_payload
from fedbat_flwr.strategy import ValidatingStrategy, build_strategy
from fedbat_flwr.wire import AlphaBounds, ModelSpec, TensorSpec, decode_signs
from tests.strategy_helpers import error_reply, reply, signs_record

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (4, 3)),
        TensorSpec("bn.weight", (5,)),
        TensorSpec("bn.running_var", (5,), kind="stat", domain="log"),
    )
)
BOUNDS = AlphaBounds()


def make(aggregator: str = "fedavg", **kwargs: object):
    strategy = build_strategy(
        aggregator,
        spec=SPEC,
        payload_kind="signs",
        bounds=BOUNDS,
        max_num_examples=kwargs.pop("max_num_examples", 1000),
        min_train_nodes=kwargs.pop("min_train_nodes", 1),
        **kwargs,
    )
    rng = np.random.default_rng(0)
    strategy.global_arrays = {t.name: rng.random(t.shape).astype(np.float32) + 0.5 for t in SPEC}
    return strategy


def test_builds_a_flower_fedavg_subclass_streaming_the_mean():
    from flwr.serverapp.strategy import FedAvg

    strategy = make()
    assert isinstance(strategy, ValidatingStrategy) and isinstance(strategy, FedAvg)
    assert isinstance(strategy.aggregator, StreamedMean)


def test_eq11_weighted_sum_of_alpha_signs():
    """Eq. 11: w <- w + sum_k p_k alpha_k sign_k, p_k = n_k / sum n (log domain for var)."""
    strategy = make()
    rng = np.random.default_rng(1)
    records = [signs_record(SPEC, rng, alpha) for alpha in (0.01, 0.03)]
    replies = [reply(1, records[0], num_examples=10), reply(2, records[1], num_examples=30)]
    decoded = [decode_signs(record_to_payload(r), SPEC, BOUNDS) for r in records]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = record_to_arrays(arrays)
    for t in SPEC:
        step = 0.25 * decoded[0][t.name] + 0.75 * decoded[1][t.name]
        old = strategy.global_arrays[t.name]
        expected = old * np.exp(step) if t.domain == "log" else old + step
        np.testing.assert_allclose(new[t.name], expected, rtol=1e-6)
    stats = strategy.rounds[1]
    assert (stats.num_replies, stats.num_rejected) == (2, 0)
    assert stats.uplink_bytes > 0


def _truncated(record: ArrayRecord) -> ArrayRecord:
    payload = dict(record_to_payload(record))
    payload["signs"] = payload["signs"][:-1]
    return payload_to_record(payload)


@pytest.mark.parametrize(
    "bad",
    [
        lambda rec: reply(9, _truncated(rec)),
        lambda rec: reply(9, rec, num_examples=0),
        lambda rec: reply(9, rec, num_examples=2.5),
        lambda rec: reply(9, rec, num_examples=10, loss=float("nan")),
        lambda rec: reply(9, None),
        lambda rec: error_reply(9),
    ],
    ids=["truncated", "zero-examples", "float-examples", "nan-metric", "no-arrays", "error"],
)
def test_bad_reply_is_rejected_and_model_is_as_if_not_sampled(bad):
    rng = np.random.default_rng(2)
    good = signs_record(SPEC, rng)
    alone = make()
    expected, _ = alone.aggregate_train(1, [reply(1, good)])
    strategy = make()
    strategy.global_arrays = alone.global_arrays
    arrays, _ = strategy.aggregate_train(1, [reply(1, good), bad(signs_record(SPEC, rng))])
    for name, value in record_to_arrays(expected).items():
        np.testing.assert_array_equal(record_to_arrays(arrays)[name], value)
    assert (strategy.rounds[1].num_replies, strategy.rounds[1].num_rejected) == (1, 1)


def test_fewer_valid_replies_than_minimum_keeps_previous_model():
    strategy = make(min_train_nodes=2)
    rng = np.random.default_rng(3)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, signs_record(SPEC, rng)), error_reply(2)]
    )
    assert arrays is None and metrics is None
    assert strategy.rounds[1].model_updated is False


def test_huge_num_examples_is_capped():
    """A client claiming 10^12 examples weighs as much as `max-num-examples`, no more."""
    strategy = make(max_num_examples=100)
    rng = np.random.default_rng(4)
    honest, greedy = signs_record(SPEC, rng), signs_record(SPEC, rng)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, honest, num_examples=100), reply(2, greedy, num_examples=10**12)]
    )
    decoded = [decode_signs(record_to_payload(r), SPEC, BOUNDS) for r in (honest, greedy)]
    step = 0.5 * decoded[0]["conv.weight"] + 0.5 * decoded[1]["conv.weight"]
    np.testing.assert_allclose(
        record_to_arrays(arrays)["conv.weight"], strategy.global_arrays["conv.weight"] + step
    )


@pytest.mark.parametrize("aggregator", ["fedmedian", "fedtrimmedavg", "krum", "fedadam", "fedyogi"])
def test_any_flower_aggregator_receives_decoded_weights(aggregator):
    """Flower's own rule runs on the dense weights w + decoded_k implied by each reply."""
    kwargs = {"num_malicious_nodes": 0} if aggregator == "krum" else {}
    strategy = make(aggregator, **kwargs)
    rng = np.random.default_rng(5)
    replies = [reply(i, signs_record(SPEC, rng)) for i in range(1, 6)]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = record_to_arrays(arrays)
    for t in SPEC:
        assert new[t.name].shape == t.shape and np.isfinite(new[t.name]).all()
    if aggregator == "fedmedian":  # median of +-alpha steps stays within one alpha of w
        diff = np.abs(new["conv.weight"] - strategy.global_arrays["conv.weight"])
        assert diff.max() <= 0.01 + 1e-6


def test_unknown_aggregator_names_allowed_values():
    with pytest.raises(ValueError, match=r"'nope'.*allowed.*'fedavg'"):
        make("nope")


@pytest.mark.parametrize("aggregator", ["fedadam", "fedyogi"])
def test_server_optimizers_step_parameters_and_average_statistics(aggregator: str):
    """FedAdam / FedYogi over many rounds: the master stays float32 (Flower's step is float64),
    and BatchNorm running variances take the weighted mean of the clients' statistics, so a
    small variance stays positive instead of being stepped by eta like a weight."""
    strategy = make(aggregator)
    strategy.global_arrays["bn.running_var"] = np.full(5, 0.05, np.float32)
    rng = np.random.default_rng(2)
    for server_round in range(1, 21):
        replies = [reply(n, signs_record(SPEC, rng, 0.02), num_examples=n) for n in (1, 2, 3)]
        master = strategy.global_arrays
        arrays, _ = strategy.aggregate_train(server_round, replies)
        new = record_to_arrays(arrays)
        assert all(v.dtype == np.float32 for v in new.values()), {
            k: v.dtype for k, v in new.items()
        }
        implied = [master["bn.running_var"] * np.exp(decode_signs(
            record_to_payload(r.content["arrays"]), SPEC, BOUNDS)["bn.running_var"])
            for r in replies]  # fmt: skip
        expected = sum(w / 6 * v for w, v in zip((1, 2, 3), implied, strict=True))
        np.testing.assert_allclose(new["bn.running_var"], expected, rtol=1e-6)
        assert np.all(new["bn.running_var"] > 0)
        assert not np.allclose(new["conv.weight"], master["conv.weight"]), "weights step"
        strategy.global_arrays = new
    assert set(strategy.aggregator.state()) == {
        f"{m}/{name}" for m in ("m_t", "v_t") for name in ("conv.weight", "bn.weight")
    }, "the optimizer's moments cover the trainable parameters only"
