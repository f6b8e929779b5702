"""1-bit sign codec (layout version 1): round trip, fused accumulate, and every rejection."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    PayloadError,
    SignsPayload,
    TensorSpec,
    accumulate_signs,
    decode_signs,
    encode_signs,
    payload_nbytes,
    sign_bits_from_payload,
    validate_signs,
)
from fedbat_flwr.wire import signs as signs_module

BOUNDS = AlphaBounds()
SHAPES = st.one_of(
    array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=11),
    st.sampled_from([(), (1,), (0,), (3, 0), (8,), (9,), (7, 3)]),
)
SPECS = st.lists(st.tuples(SHAPES, st.booleans()), min_size=1, max_size=16).map(
    lambda items: ModelSpec(
        tuple(
            TensorSpec(f"layer{i}.running_var", s, "stat", "log")
            if stat
            else TensorSpec(f"layer{i}.weight", s)
            for i, (s, stat) in enumerate(items)
        )
    )
)
SEEDS = st.integers(0, 2**32 - 1)


def _random_update(spec: ModelSpec, seed: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Random bits and in-bounds alphas for every tensor of ``spec``."""
    rng = np.random.default_rng(seed)
    bits = {t.name: rng.random(t.shape) < 0.5 for t in spec}
    alphas = {t.name: float(rng.uniform(*BOUNDS.for_tensor(t))) for t in spec}
    return bits, alphas


def _expected(t: TensorSpec, bits: np.ndarray, alpha: float) -> np.ndarray:
    a = np.float32(alpha)
    return np.where(bits, a, -a).astype(np.float32)


# A fixed model for the rejection tests: a 9-element tensor (7 pad bits), an empty one,
# a BN statistic and a scalar.
FIXED = ModelSpec(
    (
        TensorSpec("features.0.weight", (3, 3)),
        TensorSpec("features.0.bias", (0,)),
        TensorSpec("bn.running_var", (5,), "stat", "log"),
        TensorSpec("fc.bias", ()),
    )
)


def _fixed_payload() -> dict[str, np.ndarray]:
    bits, alphas = _random_update(FIXED, 0)
    return encode_signs(FIXED, bits, alphas)


def _rejected(payload: object, spec: ModelSpec = FIXED) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        validate_signs(payload, spec, BOUNDS)  # type: ignore[arg-type]
    return info.value


# --- round trip ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(SPECS, SEEDS)
def test_round_trip(spec: ModelSpec, seed: int) -> None:
    bits, alphas = _random_update(spec, seed)
    payload = encode_signs(spec, bits, alphas)
    assert list(payload) == ["header", "signs", "alphas"]
    assert payload["header"].tobytes() == b"FB\x01\x01"
    assert payload["signs"].dtype == np.uint8
    assert payload["signs"].shape == (sum((t.size + 7) // 8 for t in spec),)
    assert payload["alphas"].dtype == np.float32 and payload["alphas"].shape == (len(spec),)
    assert payload_nbytes(payload) == 4 + payload["signs"].size + 4 * len(spec)

    decoded = decode_signs(payload, spec, BOUNDS)
    raw_bits = sign_bits_from_payload(validate_signs(payload, spec, BOUNDS))
    for t in spec:
        assert decoded[t.name].dtype == np.float32 and decoded[t.name].shape == t.shape
        np.testing.assert_array_equal(decoded[t.name], _expected(t, bits[t.name], alphas[t.name]))
        assert raw_bits[t.name].dtype == np.bool_ and raw_bits[t.name].shape == t.shape
        np.testing.assert_array_equal(raw_bits[t.name], bits[t.name])


def test_layout_v1_bytes_are_pinned() -> None:
    """Little bit order, byte-aligned per tensor, zero pad bits, alphas in spec order."""
    spec = ModelSpec((TensorSpec("a", (10,)), TensorSpec("b", (2, 2)), TensorSpec("c", (0,))))
    bits = {
        "a": np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0], dtype=np.uint8),
        "b": np.array([[False, True], [True, True]]),
        "c": np.zeros(0, bool),
    }
    payload = encode_signs(spec, bits, {"a": 0.01, "b": 0.02, "c": 0.03})
    assert payload["signs"].tolist() == [0b10000001, 0b00000001, 0b00001110]
    np.testing.assert_array_equal(payload["alphas"], np.float32([0.01, 0.02, 0.03]))


def test_empty_spec_round_trips() -> None:
    spec = ModelSpec(())
    payload = encode_signs(spec, {}, {})
    assert payload["signs"].shape == (0,) and payload["alphas"].shape == (0,)
    assert decode_signs(payload, spec, BOUNDS) == {}


@settings(max_examples=50, deadline=None)
@given(SPECS, SEEDS)
def test_int_bits_encode_like_bool_bits(spec: ModelSpec, seed: int) -> None:
    bits, alphas = _random_update(spec, seed)
    as_int = {k: v.astype(np.int64) for k, v in bits.items()}
    for key, value in encode_signs(spec, as_int, alphas).items():
        np.testing.assert_array_equal(value, encode_signs(spec, bits, alphas)[key])


def test_validated_view_is_private_and_read_only() -> None:
    payload = _fixed_payload()
    view = validate_signs(payload, FIXED, BOUNDS)
    before = decode_signs(view, FIXED, BOUNDS)
    payload["signs"][:] = 0
    payload["alphas"][:] = np.nan
    after = decode_signs(view, FIXED, BOUNDS)
    for name in FIXED.names:
        np.testing.assert_array_equal(before[name], after[name])
    assert not view.alphas.flags.writeable
    assert not any(p.flags.writeable for p in view.packed)


# --- fused accumulate ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    SPECS,
    st.lists(st.tuples(SEEDS, st.floats(-10, 10)), min_size=1, max_size=4),
    st.booleans(),
)
@example(  # float32 rounding of large cancelling terms (found on an AMD EPYC; atol 1e-5 failed)
    ModelSpec(
        (
            TensorSpec("layer0.weight", (0,)),
            TensorSpec("layer1.running_var", (9, 9), "stat", "log"),
            TensorSpec("layer2.weight", ()),
        )
    ),
    [(0, 9.0), (127, 3.5), (63741196, 4.7564993655115835)],
    False,
)
def test_accumulate_equals_weighted_sum_of_decodes(
    spec: ModelSpec, clients: list[tuple[int, float]], flat: bool
) -> None:
    acc = {t.name: np.zeros((t.size,) if flat else t.shape, np.float32) for t in spec}
    want = {t.name: np.zeros(t.shape, np.float64) for t in spec}
    magnitude = dict.fromkeys(spec.names, 0.0)  # sum of |p_k alpha_k|: what float32 rounds
    for seed, weight in clients:
        bits, alphas = _random_update(spec, seed)
        payload = encode_signs(spec, bits, alphas)
        view_or_raw = validate_signs(payload, spec, BOUNDS) if seed % 2 else payload
        accumulate_signs(acc, view_or_raw, spec, BOUNDS, weight)
        for name, value in decode_signs(payload, spec, BOUNDS).items():
            want[name] += weight * value
            magnitude[name] += abs(weight) * alphas[name]
    for t in spec:
        assert acc[t.name].dtype == np.float32
        # A float32 accumulator rounds each product and sum: a few ulps of the terms' sizes
        # (terms near 270 cancelling to -13.8 were 1.1e-5 off, 0.3 ulp of 270), far below
        # one client's p_k alpha_k, which a wrong or missing sign would cost.
        tolerance = 1e-6 + 4 * np.finfo(np.float32).eps * magnitude[t.name]
        np.testing.assert_allclose(acc[t.name].reshape(t.shape), want[t.name], atol=tolerance)


def test_accumulate_crosses_chunk_boundaries() -> None:
    """Tensors longer than one scratch chunk, with a partial last byte."""
    d = 8 * signs_module.CHUNK_BYTES * 2 + 13
    spec = ModelSpec((TensorSpec("big", (d,)), TensorSpec("small", (3,))))
    bits, alphas = _random_update(spec, 7)
    acc = {"big": np.ones(d, np.float32), "small": np.ones(3, np.float32)}
    accumulate_signs(acc, encode_signs(spec, bits, alphas), spec, BOUNDS, 0.5)
    for t in spec:
        want = 1.0 + 0.5 * _expected(t, bits[t.name], alphas[t.name])
        np.testing.assert_allclose(acc[t.name], want, rtol=1e-6)


@pytest.mark.parametrize(
    ("bad_acc", "pattern"),
    [
        ({}, "acc: tensor 'features.0.weight' is missing"),
        ({"features.0.weight": np.zeros((3, 3))}, r"float64 \(3, 3\)"),
        ({"features.0.weight": np.zeros((9, 1), np.float32)}, r"float32 \(9, 1\)"),
        ({"features.0.weight": np.zeros((3, 3), np.float32).T}, "C-contiguous"),
        ({"features.0.weight": [0.0] * 9}, "list"),
    ],
)
def test_accumulate_rejects_bad_accumulators_without_touching_any(
    bad_acc: dict, pattern: str
) -> None:
    acc = {t.name: np.zeros(t.shape, np.float32) for t in FIXED} | bad_acc
    if not bad_acc:
        del acc["features.0.weight"]
    snapshot = {k: np.array(v, copy=True) for k, v in acc.items()}
    with pytest.raises(ValueError, match=pattern):
        accumulate_signs(acc, _fixed_payload(), FIXED, BOUNDS, 1.0)
    for k, v in acc.items():
        np.testing.assert_array_equal(np.asarray(v), snapshot[k])


def test_accumulate_rejects_non_finite_weight_and_foreign_view() -> None:
    acc = {t.name: np.zeros(t.shape, np.float32) for t in FIXED}
    with pytest.raises(ValueError, match="weight=nan"):
        accumulate_signs(acc, _fixed_payload(), FIXED, BOUNDS, float("nan"))
    other = ModelSpec((TensorSpec("x", (1,)),))
    view = validate_signs(encode_signs(other, {"x": np.ones(1, bool)}, {"x": 0.01}), other, BOUNDS)
    with pytest.raises(ValueError, match="different ModelSpec"):
        accumulate_signs(acc, view, FIXED, BOUNDS, 1.0)
    assert isinstance(view, SignsPayload)


# --- rejections: every error names layer (if any), field, bad value and what is allowed -------


def test_error_message_format() -> None:
    payload = _fixed_payload()
    payload["alphas"][0] = np.nan
    err = _rejected(payload)
    assert (err.layer, err.field) == ("features.0.weight", "alphas")
    assert str(err) == (
        "payload rejected: layer 'features.0.weight', field 'alphas': "
        "alpha=nan is not finite (allowed: finite, within [0.0005, 0.05])"
    )
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.layer, clone.field, clone.reason, str(clone)) == (
        err.layer,
        err.field,
        err.reason,
        str(err),
    )
    assert str(PayloadError(None, "header", "x")) == "payload rejected: field 'header': x"


def _without(key: str) -> dict[str, np.ndarray]:
    payload = _fixed_payload()
    del payload[key]
    return payload


def _with(key: str, value: object) -> dict[str, np.ndarray]:
    return {**_fixed_payload(), key: value}  # type: ignore[dict-item]


def _header(*values: int) -> dict[str, np.ndarray]:
    return _with("header", np.array(values, np.uint8))


N_SIGN_BYTES = 2 + 0 + 1 + 1  # ceil(9/8) + ceil(0/8) + ceil(5/8) + ceil(1/8)


@pytest.mark.parametrize(
    ("make", "field", "needles"),
    [
        (lambda: _without("header"), "header", ["missing", "header, signs, alphas"]),
        (lambda: _without("signs"), "signs", ["missing"]),
        (lambda: _without("alphas"), "alphas", ["missing"]),
        (lambda: _with("extra", np.zeros(1, np.uint8)), "extra", ["unexpected key", "allowed"]),
        (lambda: _with("signs", [1, 2]), "signs", ["type=list", "allowed: numpy.ndarray"]),
        (lambda: _with("header", np.zeros(4, np.int32)), "header", ["dtype=int32", "uint8"]),
        (lambda: _with("signs", np.zeros(4, np.int8)), "signs", ["dtype=int8", "uint8"]),
        (lambda: _with("alphas", np.zeros(4, np.float64)), "alphas", ["dtype=float64", "float32"]),
        (lambda: _with("alphas", np.zeros(4, ">f4")), "alphas", ["dtype=>f4", "float32"]),
        (
            lambda: _with("alphas", np.full((4, 1), 0.01, np.float32)),
            "alphas",
            ["ndim=2", "(4, 1)", "1-D"],
        ),
        (lambda: _with("signs", np.zeros((), np.uint8)), "signs", ["ndim=0", "1-D"]),
        (lambda: _header(70, 66, 1), "header", ["length=3", "allowed: 4"]),
        (lambda: _header(70, 66, 1, 1, 0), "header", ["length=5", "allowed: 4"]),
        (lambda: _header(88, 66, 1, 1), "header", ["magic=b'XB'", "allowed: b'FB'"]),
        (lambda: _header(70, 66, 2, 1), "header", ["codec id=2", "allowed: 1"]),
        (
            lambda: _header(70, 66, 1, 2),
            "header",
            ["layout version=2 is not supported", "supported: 1"],
        ),
        (
            lambda: _with("signs", np.zeros(N_SIGN_BYTES - 1, np.uint8)),
            "signs",
            [f"length={N_SIGN_BYTES - 1} bytes", f"allowed: {N_SIGN_BYTES} "],
        ),
        (
            lambda: _with("signs", np.zeros(N_SIGN_BYTES + 1, np.uint8)),
            "signs",
            [f"length={N_SIGN_BYTES + 1} bytes", f"allowed: {N_SIGN_BYTES} "],
        ),
        (
            lambda: _with("alphas", np.full(3, 0.01, np.float32)),
            "alphas",
            ["length=3", "allowed: 4, one per tensor"],
        ),
    ],
)
def test_payload_wide_rejections(make, field: str, needles: list[str]) -> None:
    err = _rejected(make())
    assert err.layer is None and err.field == field
    assert str(err).startswith(f"payload rejected: field {field!r}: ")
    for needle in needles:
        assert needle in err.reason


def test_non_mapping_payload_is_rejected() -> None:
    err = _rejected([1, 2, 3])
    assert (err.layer, err.field) == (None, "payload") and "type=list" in err.reason


@pytest.mark.parametrize(
    ("index", "value", "layer", "needles"),
    [
        (0, np.nan, "features.0.weight", ["alpha=nan is not finite", "[0.0005, 0.05]"]),
        (0, np.inf, "features.0.weight", ["alpha=inf is not finite"]),
        (1, -np.inf, "features.0.bias", ["alpha=-inf is not finite"]),
        (0, 0.06, "features.0.weight", ["alpha=0.06 is out of range", "[0.0005, 0.05]"]),
        (3, 1e-4, "fc.bias", ["alpha=0.0001 is out of range", "[0.0005, 0.05]"]),
        (3, -0.01, "fc.bias", ["alpha=-0.01 is out of range"]),
        (2, 20.5, "bn.running_var", ["alpha=20.5 is out of range", "within [0, 20]"]),
        (2, -1e-3, "bn.running_var", ["alpha=-0.001 is out of range", "within [0, 20]"]),
    ],
)
def test_bad_alpha_names_the_layer(index: int, value: float, layer: str, needles: list) -> None:
    payload = _fixed_payload()
    payload["alphas"][index] = value
    err = _rejected(payload)
    assert (err.layer, err.field) == (layer, "alphas")
    assert f"layer {layer!r}, field 'alphas'" in str(err)
    for needle in needles:
        assert needle in err.reason


def test_alphas_exactly_on_the_bounds_pass() -> None:
    """A client clipping to alpha-max in float32 must not be rejected for rounding."""
    payload = _fixed_payload()
    payload["alphas"][:] = np.float32([0.05, 0.0005, 20.0, 0.0005])
    validate_signs(payload, FIXED, BOUNDS)
    strict = AlphaBounds(param=(0.01, 0.01), stat=(0.0, 0.0))
    payload["alphas"][:] = np.float32([0.01, 0.01, 0.0, 0.01])
    validate_signs(payload, FIXED, strict)


@settings(max_examples=150, deadline=None)
@given(SPECS, SEEDS, st.data())
def test_flipped_pad_bit_is_rejected_naming_the_layer(
    spec: ModelSpec, seed: int, data: st.DataObject
) -> None:
    padded = [i for i, t in enumerate(spec) if t.size % 8]
    if not padded:
        return
    i = data.draw(st.sampled_from(padded))
    t = spec.tensors[i]
    bit = data.draw(st.integers(t.size % 8, 7))
    payload = encode_signs(spec, *_random_update(spec, seed))
    last = sum((u.size + 7) // 8 for u in spec.tensors[: i + 1]) - 1
    payload["signs"][last] |= np.uint8(1 << bit)
    err = _rejected(payload, spec)
    assert (err.layer, err.field) == (t.name, "signs")
    assert f"layer {t.name!r}, field 'signs'" in str(err)
    assert "pad bits" in err.reason and f"d={t.size}" in err.reason


@settings(max_examples=100, deadline=None)
@given(SPECS, SEEDS, st.data())
def test_first_bad_alpha_in_spec_order_is_reported(
    spec: ModelSpec, seed: int, data: st.DataObject
) -> None:
    payload = encode_signs(spec, *_random_update(spec, seed))
    bad = data.draw(st.sets(st.integers(0, len(spec) - 1), min_size=1))
    payload["alphas"][sorted(bad)] = np.float32(1e6)
    err = _rejected(payload, spec)
    assert (err.layer, err.field) == (spec.tensors[min(bad)].name, "alphas")
    assert "alpha=1000000 is out of range" in err.reason


# --- encoder input checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "layer", "field", "needle"),
    [
        (lambda b, a: b.pop("fc.bias"), "fc.bias", "signs", "missing"),
        (lambda b, a: b.update(extra=np.ones(1, bool)), "extra", "signs", "unexpected tensor"),
        (lambda b, a: a.pop("bn.running_var"), "bn.running_var", "alphas", "missing"),
        (lambda b, a: a.update(extra=0.01), "extra", "alphas", "unexpected tensor"),
        (
            lambda b, a: b.update({"features.0.weight": np.ones(9, bool)}),
            "features.0.weight",
            "signs",
            "shape=(9,) (allowed: (3, 3))",
        ),
        (
            lambda b, a: b.update({"bn.running_var": np.full(5, 2)}),
            "bn.running_var",
            "signs",
            "bit value=2 (allowed: 0 or 1)",
        ),
        (
            lambda b, a: b.update({"bn.running_var": np.ones(5)}),
            "bn.running_var",
            "signs",
            "dtype=float64",
        ),
        (lambda b, a: a.update({"fc.bias": float("nan")}), "fc.bias", "alphas", "alpha=nan"),
        (lambda b, a: a.update({"fc.bias": 1e39}), "fc.bias", "alphas", "not finite in float32"),
    ],
)
def test_encode_rejects_bad_inputs(change, layer: str, field: str, needle: str) -> None:
    bits, alphas = _random_update(FIXED, 1)
    change(bits, alphas)
    with pytest.raises(PayloadError) as info:
        encode_signs(FIXED, bits, alphas)
    assert (info.value.layer, info.value.field) == (layer, field)
    assert needle in info.value.reason


# --- the wire room stays numpy-only ----------------------------------------------------------


def test_wire_room_imports_neither_torch_nor_flwr() -> None:
    wire_dir = Path(signs_module.__file__).parent
    for path in wire_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"torch", "flwr"} & set(roots), f"{path.name} imports {roots}"
