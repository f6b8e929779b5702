"""FedBiF: Eq. 4-6 on hand examples, wire formats, selector, VBI and one client round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedbat_flwr.config import ConfigError, RunConfig
from fedbat_flwr.methods import LocalTask, get_method
from fedbat_flwr.methods.fedbif import ActiveBits, active_bits, inherit
from fedbat_flwr.methods.server.fedbif import FedBiFPart
from fedbat_flwr.records import payload_to_record, record_to_payload, wire_bytes
from fedbat_flwr.task import build_model_for, load_state, model_spec, state_arrays
from fedbat_flwr.training import TensorBatches
from fedbat_flwr.wire import AlphaBounds, PayloadError, decode_payload
from fedbat_flwr.wire.fedbif import (
    bit_planes,
    dequantize,
    encode_fedbif_bits,
    encode_fedbif_model,
    integers,
    quantize_eq5,
    validate_fedbif_bits,
    validate_fedbif_model,
)
from tests.strategy_helpers import FEDBIF_SPEC, fedbif_strategy, reply

CPU = torch.device("cpu")
BOUNDS = AlphaBounds()
SPEC = FEDBIF_SPEC


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- Eq. 1-5 ------------------------------------------------------------------------------

small_arrays = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40
).map(lambda v: np.array(v, np.float32))


@settings(max_examples=60, deadline=None)
@given(theta=small_arrays, bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_quantize_decompose_recompose_is_exact(theta: np.ndarray, bits: int, seed: int) -> None:
    codes, alpha = quantize_eq5(theta, bits, np.random.default_rng(seed))
    half = 1 << (bits - 1)
    assert codes.dtype == np.uint8 and codes.shape == theta.shape and codes.max() < 2**bits
    assert alpha == pytest.approx(float(np.abs(theta).max()) / half, rel=1e-6)
    planes = bit_planes(codes, bits)
    assert planes.shape == (bits, *theta.shape)
    np.testing.assert_array_equal(integers(planes), codes.astype(np.int16) - half)  # Eq. 4
    q = dequantize(codes, alpha, bits) / np.float32(alpha) if alpha else np.zeros_like(theta)
    np.testing.assert_allclose(q, codes.astype(np.float32) - half, atol=1e-4)
    # Stochastic rounding picks a neighbour; only +||theta||_inf itself is clamped (8 -> 7).
    error = np.abs(dequantize(codes, alpha, bits) - theta)
    assert (error <= alpha * (1 + 1e-5) + 1e-30).all()


def test_stochastic_rounding_is_unbiased_inside_the_range() -> None:
    theta = np.array([0.8, 0.25, -0.33], np.float32)  # alpha = 0.1: 8 (clamped), 2.5, -3.3
    rng = np.random.default_rng(0)
    draws = np.stack([dequantize(*quantize_eq5(theta, 4, rng), 4) for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(0)[1:], theta[1:], atol=0.005)
    assert np.allclose(draws[:, 0], 0.7)  # 2^(m-1) - 1 = 7 steps of alpha


def test_all_zero_tensor_quantizes_to_zero() -> None:
    codes, alpha = quantize_eq5(np.zeros(5, np.float32), 4, np.random.default_rng(0))
    assert alpha == 0.0 and (integers(bit_planes(codes, 4)) == 0).all()


# --- wire formats -------------------------------------------------------------------------


def _random_model(rng: np.random.Generator, bits: int) -> tuple[dict, dict, dict]:
    codes = {"conv.weight": rng.integers(0, 2**bits, (1, 2)).astype(np.uint8)}
    alphas = {"conv.weight": float(rng.random())}
    dense = {"bn.weight": rng.random(2).astype(np.float32), "bn.running_var": 0.1 + rng.random(2)}
    return codes, alphas, dense


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_m_bit_downlink_round_trip(bits: int, seed: int) -> None:
    codes, alphas, dense = _random_model(np.random.default_rng(seed), bits)
    payload = encode_fedbif_model(SPEC, codes, alphas, dense, bits)
    model = validate_fedbif_model(record_to_payload(payload_to_record(payload)), SPEC)
    np.testing.assert_array_equal(model.codes["conv.weight"], codes["conv.weight"])
    assert model.alphas["conv.weight"] == np.float32(alphas["conv.weight"])
    for name, value in dense.items():
        np.testing.assert_array_equal(
            model.dense[name], value.astype(np.float16).astype(np.float32)
        )
    weights = model.weights()
    assert list(weights) == list(SPEC.names)


@pytest.mark.parametrize(
    ("field", "change", "match"),
    [
        ("header", lambda p: p["header"].__setitem__(4, 9), "bits=9"),
        ("codes", lambda p: p["codes"].__setitem__(-1, p["codes"][-1] | 0x80), "pad bits"),
        ("alphas", lambda p: p["alphas"].__setitem__(0, -1.0), "alpha=-1.0"),
        ("dense", lambda p: p["dense"].__setitem__(3, 0.0), "variance"),
        ("dense", lambda p: p["dense"].__setitem__(0, np.inf), "non-finite"),
    ],
)  # fmt: skip
def test_downlink_rejects_bad_fields(field: str, change, match: str) -> None:
    codes, alphas, dense = _random_model(np.random.default_rng(0), 3)  # 2 x 3 bits: pad 2 bits
    payload = encode_fedbif_model(SPEC, codes, alphas, dense, 3)
    change(payload)
    with pytest.raises(PayloadError, match=match) as info:
        validate_fedbif_model(payload, SPEC)
    assert info.value.field == field


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    data=st.data(),
)
def test_activated_bits_uplink_round_trip(bits: int, data: st.DataObject) -> None:
    active = sorted(data.draw(st.sets(st.integers(0, bits - 1), min_size=1)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    planes = {"conv.weight": rng.random((len(active), 1, 2)) < 0.5}
    signs = {"bn.weight": rng.random(2) < 0.5, "bn.running_var": rng.random(2) < 0.5}
    steps = {"bn.weight": 0.01, "bn.running_var": 0.2}
    payload = encode_fedbif_bits(SPEC, bits, active, planes, signs, steps)
    view = validate_fedbif_bits(record_to_payload(payload_to_record(payload)), SPEC, BOUNDS)
    assert view.active == tuple(active) and view.bits == bits
    np.testing.assert_array_equal(view.new_bits("conv.weight"), planes["conv.weight"])
    expected = sum(2.0**i * planes["conv.weight"][j] for j, i in enumerate(active))
    np.testing.assert_array_equal(view.active_value("conv.weight"), expected.reshape(-1))


def test_uplink_rejects_a_mask_outside_the_bits() -> None:
    payload = encode_fedbif_bits(
        SPEC, 4, [0], {"conv.weight": np.zeros((1, 1, 2), bool)},
        {"bn.weight": np.ones(2, bool), "bn.running_var": np.ones(2, bool)},
        {"bn.weight": 0.1, "bn.running_var": 0.1},
    )  # fmt: skip
    payload["header"][5] = 0x10
    with pytest.raises(PayloadError, match="active mask"):
        validate_fedbif_bits(payload, SPEC, BOUNDS)


# --- selector and virtual bits ------------------------------------------------------------


def test_cycle_selector_walks_the_bits_most_significant_first() -> None:
    assert [active_bits("cycle", 4, 1, 0, r) for r in range(1, 9)] == [
        (3,), (2,), (1,), (0,), (3,), (2,), (1,), (0,),
    ]  # fmt: skip
    assert [active_bits("cycle", 4, 2, 0, r) for r in range(1, 4)] == [(2, 3), (0, 1), (2, 3)]
    assert [active_bits("cycle", 8, 2, 0, r) for r in (1, 4, 5)] == [(6, 7), (0, 1), (6, 7)]


def test_random_selector_is_shared_by_seed_and_round() -> None:
    draws = [active_bits("random", 8, 2, 7, r) for r in range(1, 40)]
    assert draws == [active_bits("random", 8, 2, 7, r) for r in range(1, 40)]  # all agree
    assert all(len(d) == 2 and 0 <= d[0] < d[1] < 8 for d in draws)
    assert len(set(draws)) > 5


def test_vbi_keeps_magnitudes_and_takes_signs_from_the_received_bits() -> None:
    planes = np.array([[True, False], [False, True]])
    previous = np.array([[-0.5, -0.2], [0.3, 0.0]], np.float32)
    fresh = np.full((2, 2), 9.0, np.float32)
    v = inherit(previous, planes, fresh)
    np.testing.assert_array_equal(np.abs(v[:, :1]), np.abs(previous[:, :1]))
    assert v[0, 0] == 0.5 and v[0, 1] == -0.2 and v[1, 0] == -0.3
    assert v[1, 1] > 0  # a zero magnitude still reads as the received bit 1
    np.testing.assert_array_equal(np.abs(inherit(None, planes, fresh)), fresh)  # first round
    np.testing.assert_array_equal(v > 0, planes)
    with pytest.raises(ValueError, match="another model"):
        inherit(previous[:1], planes, fresh)


def test_active_bits_parametrization_forward_and_straight_through_gradient() -> None:
    alpha, active = 0.1, (1, 3)
    received = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # b1, b3 of two entries
    virtual = torch.tensor([[0.2, 0.3], [-0.4, 0.1]], requires_grad=True)
    scales = torch.tensor([alpha * 2**i for i in active])
    part = ActiveBits(virtual.detach().clone(), received, scales)
    w = torch.tensor([0.5, -0.3])
    out = part(w)
    # entry 0: b1 1 -> 1, b3 0 -> 0 (v < 0): unchanged; entry 1: b1 0 -> 1 (+0.2), b3 1 -> 1.
    torch.testing.assert_close(out, torch.tensor([0.5, -0.1]))
    g = torch.tensor([2.0, -1.0])
    (out * g).sum().backward()
    expected = torch.stack([alpha * 2**i * g for i in active])
    torch.testing.assert_close(part.virtual.grad, expected)


# --- the server part: Eq. 6 ---------------------------------------------------------------


def _uplink(part: FedBiFPart, b3: list[int], sign: bool, step: float) -> object:
    planes = {"conv.weight": np.array(b3, bool).reshape(1, 1, 2)}
    signs = {"bn.weight": np.full(2, sign), "bn.running_var": np.full(2, sign)}
    payload = encode_fedbif_bits(SPEC, 4, [3], planes, signs, dict.fromkeys(signs, step))
    return decode_payload("fedbif-bits", payload, SPEC, BOUNDS)


def test_eq6_aggregation_hand_example() -> None:
    """theta = alpha (mean_k 2^3 b3_k + frozen bits - 8); BN: float16 sent + mean step."""
    part = FedBiFPart(SPEC, 4, 1, "cycle", seed=0)
    # alpha = 0.8 / 8 = 0.1; theta / alpha = -8, 4 exactly: codes 0 (0000) and 12 (1100).
    glob = {
        "conv.weight": np.array([[-0.8, 0.4]], np.float32),
        "bn.weight": np.array([1.0, 0.5], np.float32),
        "bn.running_var": np.array([2.0, 1.0], np.float32),
    }
    a = _uplink(part, [1, 0], True, 0.25)  # client A sets b3 of entry 0, clears it in entry 1
    b = _uplink(part, [0, 1], False, 0.75)
    new = part.aggregate(glob, [(10, a), (10, b)], server_round=1)  # Eq. 6: 1/|C| weights
    # entry 0: 0.1 * (8/2 + 0 - 8) = -0.4; entry 1: 0.1 * (8/2 + 4 - 8) = 0
    np.testing.assert_allclose(new["conv.weight"], [[-0.4, 0.0]], atol=1e-7)
    np.testing.assert_allclose(new["bn.weight"], [0.75, 0.25])  # + (0.25 - 0.75) / 2
    np.testing.assert_allclose(new["bn.running_var"], [2.0 * np.exp(-0.25), np.exp(-0.25)])
    uneven = part.aggregate(glob, [(30, a), (10, b)], server_round=1)  # p_k = n_k / sum n
    np.testing.assert_allclose(uneven["conv.weight"], [[0.1 * (6 - 8), 0.1 * (2 + 4 - 8)]])


def test_strategy_rejects_bits_of_another_round() -> None:
    strategy = fedbif_strategy(BOUNDS)
    good = payload_to_record(_uplink_payload([3]))
    stale = payload_to_record(_uplink_payload([2]))  # round 2's bit, sent in round 1
    arrays, _ = strategy.aggregate_train(1, [reply(1, good), reply(2, stale)])
    stats = strategy.rounds[1]
    assert arrays is not None and stats.num_replies == 1 and stats.num_rejected == 1


def _uplink_payload(active: list[int]) -> dict[str, np.ndarray]:
    planes = {"conv.weight": np.ones((len(active), 1, 2), bool)}
    signs = {"bn.weight": np.ones(2, bool), "bn.running_var": np.ones(2, bool)}
    return encode_fedbif_bits(SPEC, 4, active, planes, signs, dict.fromkeys(signs, 0.1))


def test_cnn4_downlink_is_at_most_4_1_bits_per_parameter() -> None:
    config = RunConfig(method="fedbif")
    model = build_model_for(config)
    spec = model_spec(model)
    part = get_method("fedbif")(config).server_part(spec)
    record = payload_to_record(part.payload(part.initial(state_arrays(model)), 1))
    bpp = 8 * wire_bytes(record) / spec.num_params
    assert 4.0 < bpp <= 4.1, bpp


# --- one client round ---------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3))


def _tiny(config: RunConfig, downlink: dict, state: dict, server_round: int) -> LocalTask:
    torch.manual_seed(0)
    model = _tiny_model()
    spec = model_spec(model)
    method = get_method("fedbif")(config)
    global_state = method.receive(downlink, spec, state)
    load_state(model, global_state)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 2, 2, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    return LocalTask(
        model, global_state, spec, TensorBatches(x, y, 8, gen), config, CPU, 3, server_round,
        state, downlink,
    )  # fmt: skip


def test_client_round_trains_the_activated_bit_and_inherits_virtual_bits() -> None:
    config = RunConfig(method="fedbif", lr=0.5, local_epochs=2)
    torch.manual_seed(0)
    spec = model_spec(_tiny_model())
    part = get_method("fedbif")(config).server_part(spec)
    glob = part.initial(state_arrays(_tiny_model()))
    state: dict[str, np.ndarray] = {}
    for server_round in (1, 2):
        down = record_to_payload(payload_to_record(part.payload(glob, server_round)))
        task = _tiny(config, down, state, server_round)
        before = {k: v.copy() for k, v in state.items()}
        update = get_method("fedbif")(config).train(task)
        decoded = decode_payload("fedbif-bits", update.payload, spec, BOUNDS)
        part.check(decoded, server_round)
        assert decoded.view.active == active_bits("cycle", 4, 1, 42, server_round)
        virtual = state["virtual-bits/1.weight"]
        assert virtual.shape == (4, 3, 4)
        np.testing.assert_array_equal(
            decoded.view.new_bits("1.weight")[0], virtual[3 - (server_round - 1)] > 0
        )
        if before:  # VBI: the frozen bits kept last round's magnitudes
            frozen = [i for i in range(4) if i != 3 - (server_round - 1)]
            np.testing.assert_array_equal(
                np.abs(virtual[frozen]), np.abs(before["virtual-bits/1.weight"][frozen])
            )
        glob = part.aggregate(glob, [(32, decoded)], server_round)
        assert all(np.isfinite(v).all() for v in glob.values())
        assert set(update.metrics) == {"train-loss", "flipped-bits"}


def test_init_scale_scales_a_first_round_s_virtual_bits() -> None:
    """fedbif-init-scale multiplies the fresh Kaiming magnitudes; the frozen bits keep them."""
    spec = model_spec(_tiny_model())
    part = get_method("fedbif")(RunConfig(method="fedbif")).server_part(spec)
    torch.manual_seed(0)
    glob = part.initial(state_arrays(_tiny_model()))
    down = record_to_payload(payload_to_record(part.payload(glob, 1)))
    magnitudes = {}
    for scale in (1.0, 0.1):
        config = RunConfig(method="fedbif", extra={"fedbif-init-scale": scale})
        state: dict[str, np.ndarray] = {}
        get_method("fedbif")(config).train(_tiny(config, down, state, 1))
        magnitudes[scale] = np.abs(state["virtual-bits/1.weight"][:3])  # bit 3 trained in round 1
    np.testing.assert_allclose(magnitudes[0.1], 0.1 * magnitudes[1.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fedbif-bits", 1),
        ("fedbif-bits", 9),
        ("fedbif-active-bits", 5),
        ("fedbif-selector", "x"),
        ("fedbif-init-scale", 0.0),
        ("fedbif-init-scale", "small"),
    ],
)
def test_bad_options_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        get_method("fedbif")(RunConfig(extra={key: value}))


def test_method_refuses_another_aggregator() -> None:
    """FedBiF aggregates with its own Eq. 6: instantiating it with another aggregator fails."""
    with pytest.raises(ConfigError, match="'aggregator'"):
        get_method("fedbif")(RunConfig(method="fedbif", aggregator="fedadam"))


def test_weights_all_clients_keep_at_zero_stay_exactly_zero() -> None:
    """Ten equal clients (p_k = 0.1, not exact in binary) that all keep q = 0: theta is 0.0."""
    part = FedBiFPart(SPEC, 4, 1, "cycle", seed=0)
    glob = {
        "conv.weight": np.array([[0.0, 0.8]], np.float32),  # q = 0 (code 8: b3 = 1) and 7
        "bn.weight": np.ones(2, np.float32),
        "bn.running_var": np.ones(2, np.float32),
    }
    replies = [(7, _uplink(part, [1, 0], True, 0.0)) for _ in range(10)]
    new = part.aggregate(glob, replies, server_round=1)
    assert new["conv.weight"][0, 0] == 0.0
    assert part.eval_metrics(new) == {"model_sparsity": 0.5}
