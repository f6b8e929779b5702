"""Sparse codec: varints, format choice, round trips (hypothesis) and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from fedbat_flwr.records import payload_to_record, record_to_payload
from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    PayloadError,
    TensorSpec,
    decode_payload,
    encode_sparse,
    validate_sparse,
)
from fedbat_flwr.wire.sparse import ALL, BITMAP, GAPS, decode_sparse, varint_decode, varint_encode

SPECS = st.lists(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40), max_size=6).map(
    lambda shapes: ModelSpec(tuple(TensorSpec(f"t{i}.weight", s) for i, s in enumerate(shapes)))
)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 2**35 - 1), max_size=30))
def test_varint_round_trip(values: list[int]) -> None:
    stream = varint_encode(np.array(values, np.int64))
    np.testing.assert_array_equal(varint_decode(stream, len(values), "t"), values)


def test_varint_bytes() -> None:
    np.testing.assert_array_equal(
        varint_encode(np.array([0, 127, 128, 300])), [0, 127, 0x80, 1, 0xAC, 2]
    )


def _random_sparse(spec: ModelSpec, seed: int, density: float):
    rng = np.random.default_rng(seed)
    positions, values, dense = {}, {}, {}
    for t in spec:
        keep = rng.random(t.size) < density
        positions[t.name] = np.flatnonzero(keep)
        values[t.name] = rng.normal(size=keep.sum()).astype(np.float32)
        flat = np.zeros(t.size, np.float32)
        flat[keep] = values[t.name]
        dense[t.name] = flat.reshape(t.shape)
    return positions, values, dense


@settings(max_examples=100, deadline=None)
@given(spec=SPECS, seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.0, 0.03, 0.3, 1.0]))
def test_round_trip_through_records(spec: ModelSpec, seed: int, density: float) -> None:
    positions, values, dense = _random_sparse(spec, seed, density)
    payload = encode_sparse(spec, positions, values)
    # Codec round trip: the bounds let every generated value through (the bounds have tests of
    # their own in test_validation.py).
    wide = AlphaBounds(stat=(0.0, 1e6), update=1e6)
    decoded = decode_payload("sparse", record_to_payload(payload_to_record(payload)), spec, wide)
    assert decoded.absolute is False
    out = decoded.delta()
    for t in spec:
        np.testing.assert_array_equal(out[t.name], dense[t.name])


def test_smallest_format_is_chosen() -> None:
    spec = ModelSpec((TensorSpec("a", (1000,)), TensorSpec("b", (1000,)), TensorSpec("c", (10,))))
    positions = {"a": np.arange(0, 1000, 40), "b": np.arange(0, 1000, 2), "c": np.arange(10)}
    values = {k: np.ones(v.size, np.float32) for k, v in positions.items()}
    payload = encode_sparse(spec, positions, values)
    np.testing.assert_array_equal(payload["meta"][:, 1], [GAPS, BITMAP, ALL])
    np.testing.assert_array_equal(payload["meta"][:, 2], [25, 125, 0])  # gap 40 = 1 byte


def test_accumulate_is_weighted() -> None:
    spec = ModelSpec((TensorSpec("a", (2, 3)),))
    payload = encode_sparse(spec, {"a": np.array([1, 5])}, {"a": np.array([2.0, -4.0], np.float32)})
    acc = {"a": np.ones((2, 3), np.float32)}
    decode_payload("sparse", payload, spec, AlphaBounds()).accumulate(acc, 0.5)
    np.testing.assert_array_equal(acc["a"], [[1, 2, 1], [1, 1, -1]])


@pytest.mark.parametrize(
    ("positions", "words"),
    [
        (np.array([3, 3]), "strictly increasing"),
        (np.array([4, 2]), "strictly increasing"),
        (np.array([10]), "outside"),
        (np.array([-1]), "outside"),
    ],
)
def test_encoder_refuses_bad_positions(positions: np.ndarray, words: str) -> None:
    spec = ModelSpec((TensorSpec("a", (10,)),))
    with pytest.raises(PayloadError, match=words):
        encode_sparse(spec, {"a": positions}, {"a": np.ones(positions.size, np.float32)})


# --- rejections: one valid payload with a gaps tensor, a bitmap tensor and an "all" tensor ----

SPEC = ModelSpec(
    (TensorSpec("g", (300,)), TensorSpec("b", (12,)), TensorSpec("s", (4,), "stat", "log"))
)


def _valid() -> dict[str, np.ndarray]:
    positions = {"g": np.array([0, 5, 200]), "b": np.array([0, 2, 4, 6, 8, 10]), "s": np.arange(4)}
    values = {k: np.arange(1, v.size + 1, dtype=np.float32) for k, v in positions.items()}
    payload = encode_sparse(SPEC, positions, values)
    # g: varints 0, 5, 195 (= 0xC3 0x01); b: 2-byte bitmap; s: all
    np.testing.assert_array_equal(payload["meta"], [[3, GAPS, 4], [6, BITMAP, 2], [4, ALL, 0]])
    return payload


def _meta(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, np.uint32)


def _index(*gaps: int) -> np.ndarray:
    return np.array([*gaps, 0x55, 0x05], np.uint8)  # gap bytes of "g", then b's bitmap


def _set(**fields: object):
    return lambda p: {**p, **fields}


REJECTIONS = [
    ("missing", lambda p: {k: v for k, v in p.items() if k != "index"}, None, "index", "missing"),
    ("extra", _set(extra=np.zeros(1, np.uint8)), None, "extra", "unexpected key"),
    ("dtype", _set(meta=np.zeros((3, 3), np.int32)), None, "meta", "dtype"),
    ("header", _set(header=np.array([70, 66, 1, 1], np.uint8)), None, "header", "codec id=1"),
    ("version", _set(header=np.array([70, 66, 3, 2], np.uint8)), None, "header", "version=2"),
    ("meta rows", _set(meta=_meta([[3, GAPS, 4], [6, BITMAP, 2]])), None, "meta", "shape"),
    ("format", _set(meta=_meta([[3, 7, 4], [6, 1, 2], [4, 0, 0]])), "g", "meta", "format=7"),
    ("count > d", _set(meta=_meta([[3, 2, 4], [13, 1, 2], [4, 0, 0]])), "b", "meta", "count=13"),
    ("all count", _set(meta=_meta([[3, 2, 4], [6, 1, 2], [3, 0, 0]])), "s", "meta", "format all"),
    (
        "bitmap bytes",
        _set(meta=_meta([[3, 2, 4], [6, 1, 3], [4, 0, 0]])),
        "b",
        "meta",
        "bitmap of 3",
    ),
    ("gap bytes", _set(meta=_meta([[3, 2, 2], [6, 1, 2], [4, 0, 0]])), "g", "meta", "2 gap bytes"),
    ("values length", lambda p: {**p, "values": p["values"][:-1]}, None, "values", "length"),
    ("index length", lambda p: {**p, "index": p["index"][:-1]}, None, "index", "length"),
    (
        "nan value",
        lambda p: {**p, "values": np.r_[np.nan, p["values"][1:]].astype(np.float32)},
        "g",
        "values",
        "non-finite",
    ),
    (
        "bitmap pad",
        _set(index=np.array([0, 5, 0xC3, 1, 0x55, 0x15], np.uint8)),
        "b",
        "index",
        "pad bits",
    ),
    (
        "bitmap count",
        _set(index=np.array([0, 5, 0xC3, 1, 0x55, 0x01], np.uint8)),
        "b",
        "index",
        "sets 5 bits",
    ),
    (
        "truncated",
        _set(index=np.array([0, 5, 0xC3, 0x81, 0x55, 0x05], np.uint8)),
        "g",
        "index",
        "truncated",
    ),
    (
        "varint count",
        _set(index=np.array([0, 5, 1, 1, 0x55, 0x05], np.uint8)),
        "g",
        "index",
        "4 varints",
    ),
    ("duplicate", _set(index=_index(0, 0, 0xC3, 1)), "g", "index", "gap 1 is 0"),
    ("non-canonical", _set(index=_index(0, 0x85, 0, 1)), "g", "index", "non-canonical"),
    ("out of range", _set(index=_index(0, 5, 0xA8, 2)), "g", "index", "position=301"),
]


@pytest.mark.parametrize(("case", "mutate", "layer", "field", "words"), REJECTIONS)
def test_rejections_name_layer_and_field(case, mutate, layer, field, words) -> None:
    payload = mutate(_valid())
    with pytest.raises(PayloadError) as info:
        validate_sparse(payload, SPEC)
    assert (info.value.layer, info.value.field) == (layer, field), case
    assert words in str(info.value), str(info.value)


def test_overlong_varint_is_rejected() -> None:
    spec = ModelSpec((TensorSpec("g", (300,)),))
    payload = {
        "header": _valid()["header"],
        "meta": _meta([[2, GAPS, 7]]),
        "values": np.ones(2, np.float32),
        "index": np.array([0x80] * 5 + [1, 1], np.uint8),
    }
    with pytest.raises(PayloadError, match="varint of 6 bytes"):
        validate_sparse(payload, spec)


def test_valid_payload_decodes() -> None:
    out = decode_sparse(validate_sparse(_valid(), SPEC))
    assert out["g"][[0, 5, 200]].tolist() == [1, 2, 3] and out["g"].sum() == 6
    np.testing.assert_array_equal(out["b"], [1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0])
    np.testing.assert_array_equal(out["s"], [1, 2, 3, 4])
