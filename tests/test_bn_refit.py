"""BatchNorm statistics measured by the clients on the evaluated network, pooled by the server."""

from __future__ import annotations

import numpy as np
import pytest

from fedbat_flwr.bn_refit import check_statistics, pool_statistics, statistic_names
from fedbat_flwr.records import arrays_to_record
from fedbat_flwr.server_part import BinaryNetworkPart
from fedbat_flwr.wire import ModelSpec, PayloadError, TensorSpec
from tests.strategy_helpers import reply

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (3, 2)),
        TensorSpec("bn.weight", (3,)),
        TensorSpec("bn.running_mean", (3,), kind="stat"),
        TensorSpec("bn.running_var", (3,), kind="stat", domain="log"),
    )
)


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"bn.running_mean": x.mean(axis=0), "bn.running_var": x.var(axis=0)}


def test_pooled_statistics_are_those_of_all_the_data_together() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc, scale, size=(n, 3)) for loc, scale, n in ((0, 1, 40), (3, 2, 10))]
    measured = [(len(x), check_statistics(SPEC, _stats(x))) for x in parts]
    pooled = pool_statistics(SPEC, measured)
    everything = _stats(np.concatenate(parts))
    for name, value in everything.items():
        np.testing.assert_allclose(pooled[name], value, rtol=1e-5)
        assert pooled[name].dtype == np.float32


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bn.running_var": np.array([1.0, 0.0, 1.0])}, "variance <= 0"),
        ({"bn.running_mean": np.array([1.0, np.nan, 1.0])}, "not finite"),
        ({"bn.running_mean": np.zeros(4)}, r"allowed: float \(3,\)"),
        ({"conv.weight": np.zeros((3, 2))}, r"unexpected \['conv.weight'\]"),
    ],
)
def test_a_statistics_reply_is_checked_tensor_by_tensor(change: dict, match: str) -> None:
    good = {"bn.running_mean": np.zeros(3), "bn.running_var": np.ones(3)}
    with pytest.raises(PayloadError, match=match):
        check_statistics(SPEC, {**good, **change})


def test_the_strategy_pools_valid_statistics_into_the_evaluated_network() -> None:
    """BiFL's part: the network evaluated after the round carries the pooled statistics; a
    reply with a negative variance is left out, not the round."""
    from fedbat_flwr.strategy import build_strategy
    from fedbat_flwr.wire import AlphaBounds

    part = BinaryNetworkPart(SPEC)
    strategy = build_strategy(
        "fedavg", spec=SPEC, payload_kind="dense", bounds=AlphaBounds(), max_num_examples=100,
        part=part, min_train_nodes=1,
    )  # fmt: skip
    assert statistic_names(SPEC) == ["bn.running_mean", "bn.running_var"]
    good = [
        {"bn.running_mean": np.full(3, m, np.float32), "bn.running_var": np.ones(3, np.float32)}
        for m in (0.0, 2.0)
    ]
    bad = {"bn.running_mean": np.zeros(3, np.float32), "bn.running_var": -np.ones(3, np.float32)}
    replies = [reply(n, arrays_to_record(s), 10) for n, s in enumerate([*good, bad], 1)]
    assert strategy.aggregate_evaluate(1, replies) is not None
    weights = {t.name: np.full(t.shape, 0.5, np.float32) for t in SPEC}
    evaluated = part.eval_arrays(weights)
    np.testing.assert_allclose(evaluated["bn.running_mean"], 1.0)
    np.testing.assert_allclose(evaluated["bn.running_var"], 2.0)  # 1 + spread of the means
    np.testing.assert_allclose(evaluated["conv.weight"], 0.5)  # alpha * sign(w)
    restored = BinaryNetworkPart(SPEC)
    restored.load_state(part.state())
    np.testing.assert_allclose(restored.eval_arrays(weights)["bn.running_var"], 2.0)
