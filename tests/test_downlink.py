"""`downlink-bits`: the quantized broadcast (wire/downlink.py), its validation on the client, and
the server's master weights (broadcast.py, strategy)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbat_flwr.broadcast import Broadcast
from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import get_method
from fedbat_flwr.records import (
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
    wire_bytes,
)
from fedbat_flwr.server_part import ServerPart
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.task import build_model_for, model_spec, state_arrays
from fedbat_flwr.wire import AlphaBounds, ModelSpec, PayloadError, TensorSpec
from fedbat_flwr.wire.downlink import decode_downlink, encode_downlink
from tests.strategy_helpers import reply

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (6, 2, 3, 3)),
        TensorSpec("bn.weight", (6,)),
        TensorSpec("bn.running_mean", (6,), "stat"),
        TensorSpec("bn.running_var", (6,), "stat", "log"),
        TensorSpec("fc.weight", (3, 6)),
    )
)


def _weights(seed: int, spread: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {t.name: (spread * rng.standard_normal(t.shape)).astype(np.float32) for t in SPEC}
    out["bn.running_var"] = np.abs(out["bn.running_var"]) + np.float32(1e-3)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([1, 2, 3, 4, 8, 16]))
def test_broadcast_is_within_one_level_of_the_master(seed: int, bits: int) -> None:
    w = _weights(seed)
    payload = encode_downlink(SPEC, w, bits, np.random.default_rng(seed))
    got = decode_downlink(record_to_payload(payload_to_record(payload)), SPEC)
    for t in SPEC:
        if bits == 16 or len(t.shape) < 2:  # float16
            np.testing.assert_allclose(got[t.name], w[t.name], rtol=1e-3, atol=1e-7)
            continue
        rows = w[t.name].reshape(t.shape[0], -1)
        step = (rows.max(axis=1) - rows.min(axis=1)) / (2**bits - 1)
        err = np.abs(got[t.name] - w[t.name]).reshape(t.shape[0], -1)
        assert (err <= step[:, None] * (1 + 1e-5) + 1e-6).all()
    assert (got["bn.running_var"] > 0).all()


def test_stochastic_rounding_is_unbiased() -> None:
    """The mean of many broadcasts approaches the master: E[low + code * step] = w."""
    w = _weights(3)
    draws = [
        decode_downlink(encode_downlink(SPEC, w, 2, np.random.default_rng(i)), SPEC)["fc.weight"]
        for i in range(2000)
    ]
    rows = w["fc.weight"]
    step = (rows.max(axis=1) - rows.min(axis=1)) / 3
    # Standard error of a mean of 2000 draws with per-draw std <= step / 2: < 0.012 step.
    bias = np.abs(np.mean(draws, axis=0) - rows)
    assert (bias < 0.06 * step[:, None]).all()


@pytest.mark.parametrize(("bits", "at_most"), [(16, 16.2), (8, 8.2), (4, 4.2), (2, 2.2)])
def test_cnn4_broadcast_costs_k_bits_per_parameter(bits: int, at_most: float) -> None:
    """Measured from the serialized Flower record, framing included."""
    model = build_model_for(RunConfig())
    spec = model_spec(model)
    record = payload_to_record(
        encode_downlink(spec, state_arrays(model), bits, np.random.default_rng(0))
    )
    assert bits < 8 * wire_bytes(record) / spec.num_params <= at_most


def _payload(bits: int = 3) -> dict[str, np.ndarray]:
    payload = encode_downlink(SPEC, _weights(1), bits, np.random.default_rng(1))
    return {k: v.copy() for k, v in payload.items()}


BAD = {
    "bits 9": (lambda p: p["header"].__setitem__(4, 9), "header"),
    "codec id": (lambda p: p["header"].__setitem__(2, 1), "header"),
    "nan low": (lambda p: p["lows"].__setitem__(2, np.nan), "steps"),
    "negative step": (lambda p: p["steps"].__setitem__(7, -1.0), "steps"),
    "huge step": (lambda p: p["steps"].__setitem__(0, 3e38), "steps"),
    "short codes": (lambda p: p.__setitem__("codes", p["codes"][:-1]), "codes"),
    "pad bits": (lambda p: p["codes"].__setitem__(len(p["codes"]) - 1, 0xFF), "codes"),
    "one low too many": (lambda p: p.__setitem__("lows", np.append(p["lows"], 0.0)), "lows"),
    "nan half": (lambda p: p["half"].__setitem__(0, np.nan), "half"),
    "zero variance": (lambda p: p["half"].__setitem__(12, 0.0), "half"),
    "float32 half": (lambda p: p.__setitem__("half", p["half"].astype(np.float32)), "half"),
    "extra key": (lambda p: p.__setitem__("x", np.zeros(1, np.uint8)), "x"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_corrupt_broadcast_is_a_clear_error(case: str) -> None:
    mutate, field = BAD[case]
    payload = _payload()
    mutate(payload)
    with pytest.raises(PayloadError) as info:
        decode_downlink(payload, SPEC)
    assert info.value.field == field


def test_client_decodes_the_broadcast_and_refuses_a_dense_model() -> None:
    method = get_method("fedbat")(RunConfig(downlink_bits=4))
    w = _weights(2)
    got = method.receive(_payload(), SPEC, {})
    assert set(got) == set(SPEC.names)
    with pytest.raises(PayloadError):
        method.receive(w, SPEC, {})


def test_methods_with_their_own_downlink_refuse_downlink_bits() -> None:
    for name in ("fedbif", "fedpm"):
        with pytest.raises(ConfigError, match=rf"'downlink-bits' = 4 .*{name!r}.*allowed: 32"):
            get_method(name)(RunConfig(downlink_bits=4))
    with pytest.raises(ConfigError, match="'downlink-bits' = 12"):
        RunConfig.from_flower({"downlink-bits": 12})


class _Grid:
    """The part of Flower's Grid that `configure_train` uses."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _strategy(kind: str, bits: int):
    return build_strategy(
        "fedavg",
        spec=SPEC,
        payload_kind=kind,
        bounds=AlphaBounds(),
        max_num_examples=1000,
        min_train_nodes=1,
        part=ServerPart(SPEC, Broadcast(SPEC, bits, seed=7)),
    )


def test_server_sends_the_quantized_copy_and_counts_its_bytes(in_a_run: None) -> None:
    strategy = _strategy("signs", 4)
    master = _weights(4)
    messages = strategy.configure_train(1, arrays_to_record(master), ConfigRecord(), _Grid())
    sent = [record_to_payload(m.content["arrays"]) for m in messages]
    assert len(sent) == 3 and all(p["header"][4] == 4 for p in sent)
    assert strategy.rounds[1].downlink_bytes == 3 * wire_bytes(messages[0].content["arrays"])
    for t in SPEC:  # the master stays float32, untouched by the broadcast
        np.testing.assert_array_equal(strategy.global_arrays[t.name], master[t.name])
    # The same (run seed, round) gives the same bytes: a resumed round re-sends its broadcast.
    again = _strategy("signs", 4).part.broadcast.encode(master, 1)
    np.testing.assert_array_equal(record_to_payload(again)["codes"], sent[0]["codes"])


def test_weights_trained_from_the_broadcast_move_the_master(in_a_run: None) -> None:
    """FedAvg replies are weights: the server takes their change from the broadcast and applies
    it to the master, so the master never takes on the broadcast's rounding."""
    strategy = _strategy("dense", 2)
    master = _weights(5)
    strategy.configure_train(1, arrays_to_record(master), ConfigRecord(), _Grid())
    sent = strategy.part.broadcast.sent
    change = {t.name: np.full(t.shape, 0.01, np.float32) for t in SPEC}
    trained = SPEC.apply(sent, change)
    arrays, _ = strategy.aggregate_train(1, [reply(1, arrays_to_record(trained))])
    new = record_to_arrays(arrays)
    expected = SPEC.apply(master, change)
    for t in SPEC:
        np.testing.assert_allclose(new[t.name], expected[t.name], rtol=1e-5, atol=1e-6)
