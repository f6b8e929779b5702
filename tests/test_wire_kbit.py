"""k-bit codec: dense m-bit packing, the unbiased quantizer, and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbat_flwr.records import payload_to_record, record_to_payload
from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    PayloadError,
    TensorSpec,
    decode_payload,
    encode_kbit,
    pack_uint,
    quantize_stochastic,
    unpack_uint,
    validate_kbit,
)
from fedbat_flwr.wire.kbit import decode_kbit, level_values, packed_nbytes

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (3, 2, 1, 1)),  # d = 6: not a multiple of 8 for any k
        TensorSpec("bn.weight", (5,)),
        TensorSpec("bn.running_var", (5,), "stat", "log"),
    )
)


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip_any_count(bits: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, count)
    packed = pack_uint(values, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_nbytes(count, bits) == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_uint(packed, bits, count), values)
    used = count * bits % 8
    if used:  # the pad bits of the last byte are zero
        assert packed[-1] >> used == 0


def test_pack_layout_is_little_endian_bit_stream() -> None:
    # 3-bit values 5 (101), 3 (011), 7 (111): stream bits 1,0,1, 1,1,0, 1,1,1 -> 0b11011101, 0b1
    np.testing.assert_array_equal(pack_uint(np.array([5, 3, 7]), 3), [0b11011101, 0b1])


@pytest.mark.parametrize("bad", [np.array([8]), np.array([-1]), np.array([0.5])])
def test_pack_refuses_values_that_do_not_fit(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_uint(bad, 3)


@pytest.mark.parametrize("bits", [0, 9])
def test_pack_refuses_bit_widths(bits: int) -> None:
    with pytest.raises(ValueError, match=r"allowed: an integer in \[1, 8\]"):
        pack_uint(np.zeros(3, int), bits)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_quantizer_is_within_k_bits_and_one_level_of_m(bits: int) -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=1000).astype(np.float32)
    codes, scale = quantize_stochastic(m, bits, rng)
    assert scale == np.float32(np.abs(m).max())
    assert codes.dtype == np.uint8 and codes.max() < 1 << bits
    q = level_values(scale, bits)[codes]
    step = 2 * scale / ((1 << bits) - 1)
    assert np.all(np.abs(q - m) <= step * (1 + 1e-6))


@pytest.mark.parametrize("bits", [3, 4])
def test_quantizer_is_unbiased(bits: int) -> None:
    """Mean of N draws is within 5 standard errors of m; a round-to-nearest variant is not."""
    rng = np.random.default_rng(1)
    m = np.array([0.9, -0.37, 0.05, 0.0, -1.0, 0.61], np.float32)  # off-grid values
    n = 20_000
    draws = np.stack(
        [level_values(s, bits)[c] for c, s in (quantize_stochastic(m, bits, rng) for _ in range(n))]
    )
    step = 2.0 / ((1 << bits) - 1)
    bound = 5 * (step / 2) / np.sqrt(n)  # std of one draw <= step / 2
    assert np.all(np.abs(draws.mean(axis=0) - m) < bound)
    nearest = level_values(1.0, bits)[np.abs(m[:, None] - level_values(1.0, bits)).argmin(1)]
    assert np.any(np.abs(nearest - m) > bound)  # a biased quantizer fails the same bound


def test_quantizer_of_zero_update_is_zero() -> None:
    codes, scale = quantize_stochastic(np.zeros(7, np.float32), 4, np.random.default_rng(0))
    assert scale == 0.0
    np.testing.assert_array_equal(level_values(scale, 4)[codes], 0.0)


def _payload(bits: int = 4, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    codes, scales, expected = {}, {}, {}
    for t in SPEC:
        m = rng.normal(size=t.shape).astype(np.float32)
        codes[t.name], scales[t.name] = quantize_stochastic(m, bits, rng)
        expected[t.name] = level_values(scales[t.name], bits)[codes[t.name]]
    return encode_kbit(SPEC, codes, scales, bits), expected


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_round_trip_through_records(bits: int) -> None:
    payload, expected = _payload(bits)
    received = record_to_payload(payload_to_record(payload))
    decoded = decode_payload("kbit", received, SPEC, AlphaBounds())
    assert decoded.absolute is False
    for name, value in decoded.delta().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6)
    assert payload["levels"].size == sum(packed_nbytes(t.size, bits) for t in SPEC)


def test_accumulate_adds_weighted_update() -> None:
    payload, expected = _payload()
    view = validate_kbit(payload, SPEC)
    acc = {t.name: np.ones(t.shape, np.float32) for t in SPEC}
    decoded = decode_payload("kbit", payload, SPEC, AlphaBounds())
    decoded.accumulate(acc, 0.5)
    for name in acc:
        np.testing.assert_allclose(acc[name], 1 + 0.5 * expected[name], rtol=1e-6)
    np.testing.assert_allclose(decode_kbit(view)["bn.weight"], expected["bn.weight"], rtol=1e-6)


def _with(payload: dict[str, np.ndarray], key: str, value: object) -> dict[str, np.ndarray]:
    out = dict(payload)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def _header(*values: int) -> np.ndarray:
    return np.array(values, np.uint8)


REJECTIONS = [
    ("missing field", lambda p: _with(p, "scales", None), None, "scales", "missing"),
    ("extra field", lambda p: {**p, "x": p["scales"]}, None, "x", "unexpected key"),
    (
        "dtype",
        lambda p: _with(p, "scales", p["scales"].astype(np.float64)),
        None,
        "scales",
        "dtype",
    ),
    ("ndim", lambda p: _with(p, "levels", p["levels"][None]), None, "levels", "ndim"),
    ("header length", lambda p: _with(p, "header", p["header"][:4]), None, "header", "length"),
    ("magic", lambda p: _with(p, "header", _header(70, 67, 2, 1, 4)), None, "header", "magic"),
    ("codec id", lambda p: _with(p, "header", _header(70, 66, 1, 1, 4)), None, "header", "codec"),
    ("version", lambda p: _with(p, "header", _header(70, 66, 2, 9, 4)), None, "header", "version"),
    ("bits 0", lambda p: _with(p, "header", _header(70, 66, 2, 1, 0)), None, "header", "bits=0"),
    ("bits 9", lambda p: _with(p, "header", _header(70, 66, 2, 1, 9)), None, "header", "bits=9"),
    (
        "bits vs length",
        lambda p: _with(p, "header", _header(70, 66, 2, 1, 3)),
        None,
        "levels",
        "length",
    ),
    ("levels length", lambda p: _with(p, "levels", p["levels"][:-1]), None, "levels", "length"),
    ("scales length", lambda p: _with(p, "scales", p["scales"][:2]), None, "scales", "length"),
    (
        "nan scale",
        lambda p: _with(p, "scales", np.array([1, np.nan, 1], np.float32)),
        "bn.weight",
        "scales",
        "nan",
    ),
    (
        "inf scale",
        lambda p: _with(p, "scales", np.array([np.inf, 1, 1], np.float32)),
        "conv.weight",
        "scales",
        "inf",
    ),
    (
        "negative scale",
        lambda p: _with(p, "scales", np.array([1, 1, -1], np.float32)),
        "bn.running_var",
        "scales",
        ">= 0",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "layer", "field", "words"), REJECTIONS)
def test_rejections_name_layer_and_field(case, mutate, layer, field, words) -> None:
    payload, _ = _payload()
    with pytest.raises(PayloadError) as info:
        validate_kbit(mutate(payload), SPEC)
    assert (info.value.layer, info.value.field) == (layer, field), case
    assert words in str(info.value)


def test_pad_bits_must_be_zero() -> None:
    payload, _ = _payload(bits=4)
    levels = payload["levels"].copy()
    levels[packed_nbytes(6, 4) - 1] |= 0xF0  # conv.weight: 6 x 4 bits = 3 bytes, no pad ...
    validate_kbit(_with(payload, "levels", levels), SPEC)  # ... so any value is fine
    levels = payload["levels"].copy()
    levels[3 + packed_nbytes(5, 4) - 1] |= 0x10  # bn.weight: 5 x 4 = 20 bits, top 4 are pad
    with pytest.raises(PayloadError) as info:
        validate_kbit(_with(payload, "levels", levels), SPEC)
    assert (info.value.layer, info.value.field) == ("bn.weight", "levels")
    assert "pad bits" in str(info.value)


def test_validated_view_is_independent_of_the_payload() -> None:
    payload, expected = _payload()
    view = validate_kbit(payload, SPEC)
    payload["levels"][:] = 0
    payload["scales"][:] = 0
    np.testing.assert_allclose(decode_kbit(view)["conv.weight"], expected["conv.weight"], rtol=1e-6)
