"""Fuzzing the server's door: mutated replies of every payload kind among valid ones.

Each case builds 1-3 valid replies of one payload kind, mutates one more reply (its payload
arrays, their encoding, the header, pad bits, float values, `num-examples`, metrics or the
message itself) and feeds them all through `build_strategy(...).aggregate_train`. Whatever the
mutation:

- no exception escapes, and the new global model is finite;
- an invalid mutant is rejected (counted in `num_rejected`) and the model is bit for bit the
  one the valid replies make alone, as if the mutant's client had not been sampled;
- a valid mutant (an alternative encoding, a capped `num-examples`, a value at its bound) is
  accepted, and where it has a canonical equivalent the model equals the one that makes.

CI runs 2,000 cases split over four tests (explicit `max_examples`). The `slow` test draws
from every family with the active hypothesis profile: `HYPOTHESIS_PROFILE=long pytest -m slow
tests/test_fuzz.py` runs 25,000.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbat_flwr.records import arrays_to_record, payload_to_record, record_to_arrays
from tests.payloads import (
    CAP,
    KINDS,
    SIGN_KINDS,
    float_fields,
    make_strategy,
    pad_bits,
    step_bound,
    to_record,
    valid_payload,
    value_is_valid,
)
from tests.strategy_helpers import _metadata, error_reply, reply

settings.register_profile("long", max_examples=25_000, deadline=None)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT32_MAX = float(np.finfo(np.float32).max)
AGGREGATORS = {kind: ("fedavg", "fedmedian") for kind in KINDS} | {
    kind: ("fedavg", "majority", "sign-median", "fedmedian") for kind in SIGN_KINDS
}
DTYPES = ("uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64")


@dataclass
class Mutant:
    """One mutated reply; `valid` says whether the server must accept it."""

    message: Message
    valid: bool
    equivalent: Message | None = None  # a reply that must give the same model, if any


Payload = dict[str, np.ndarray]
Family = Callable[[st.DataObject, str, Payload, str], Mutant]


def _reply(kind: str, payload: Payload, num_examples: object = 7) -> Message:
    return reply(99, to_record(kind, payload), num_examples=num_examples)


# -- mutation families ---------------------------------------------------------------------------


def structure(data: st.DataObject, kind: str, payload: Payload, policy: str) -> Mutant:
    """Truncate, extend, reshape or retype a field; drop, rename or add one. All invalid."""
    op = data.draw(
        st.sampled_from(("truncate", "extend", "reshape", "dtype", "drop", "rename", "add"))
    )
    key = data.draw(st.sampled_from(sorted(payload)), label="field")
    out = dict(payload)
    value = payload[key]
    if op == "truncate":
        n = value.shape[0] if value.ndim else 0
        cut = data.draw(st.integers(1, max(n, 1)), label="cut")
        if n == 0:  # nothing to cut: an empty field becomes a scalar instead
            out[key] = np.zeros((), value.dtype)
        else:
            out[key] = value[: n - cut]
    elif op == "extend":
        extra = data.draw(st.integers(1, 4), label="extra")
        pad = np.zeros((extra, *value.shape[1:]), value.dtype)
        out[key] = np.concatenate([value.reshape(-1, *value.shape[1:]), pad])
    elif op == "reshape":
        out[key] = value.reshape(-1, 1) if value.ndim == 1 else value.reshape(-1)
        if out[key].shape == value.shape:  # (1,)-like: add a dimension instead
            out[key] = value[None]
    elif op == "dtype":
        dtype = data.draw(st.sampled_from([d for d in DTYPES if d != value.dtype.name]))
        with np.errstate(all="ignore"):
            out[key] = value.astype(dtype)
    elif op == "drop":
        del out[key]
    elif op == "rename":
        out[key + "_x"] = out.pop(key)
    else:
        out["extra" if kind != "dense" else "extra.weight"] = np.zeros(3, value.dtype)
    return Mutant(_reply(kind, out), valid=False)


VALUES = (
    float("nan"),
    float("inf"),
    float("-inf"),
    -1e-3,
    -1.0,
    0.0,
    1e-4,
    11.0,
    1e30,
    FLOAT32_MAX,
    -FLOAT32_MAX,
)


def values(data: st.DataObject, kind: str, payload: Payload, policy: str) -> Mutant:
    """One float entry (alpha, scale, kept value, weight) set to a special value or to its
    bound / just above it; valid or not by the kind's rules (`payloads.value_is_valid`)."""
    fields = float_fields(kind, payload)
    key = data.draw(st.sampled_from(sorted(fields)), label="field")
    index = data.draw(st.integers(0, len(fields[key]) - 1), label="index")
    tensor = fields[key][index]
    choices = list(VALUES)
    bound = step_bound(kind, key, tensor)
    if np.isfinite(bound):
        edge = np.float32(bound)
        choices += [float(edge), float(np.nextafter(edge, np.float32(np.inf)))]
    value = data.draw(st.sampled_from(choices), label="value")
    flat = payload[key].reshape(-1).copy()
    flat[index] = value
    out = {**payload, key: flat.reshape(payload[key].shape)}
    return Mutant(_reply(kind, out), valid=value_is_valid(kind, key, tensor, float(flat[index])))


def encoding(data: st.DataObject, kind: str, payload: Payload, policy: str) -> Mutant:
    """Header bytes, pad bits and the Flower Arrays themselves: forged or just re-encoded."""
    ops = ["npy-garbage", "npy-huge-shape", "raw-shape-lie", "stype", "other-encoding"]
    if kind != "dense":
        ops.append("header")
    if pad_bits(kind, payload):
        ops.append("pad-bit")
    op = data.draw(st.sampled_from(ops))
    key = data.draw(st.sampled_from(sorted(payload)), label="field")
    if op == "header":
        header = payload["header"].copy()
        i = data.draw(st.integers(0, header.size - 1), label="byte")
        header[i] = data.draw(st.integers(0, 255).filter(lambda b: b != header[i]), label="new")
        return Mutant(_reply(kind, {**payload, "header": header}), valid=False)
    if op == "pad-bit":
        field, byte, mask = data.draw(st.sampled_from(pad_bits(kind, payload)), label="pad")
        bit = data.draw(st.sampled_from([b for b in range(8) if mask >> b & 1]), label="bit")
        stream = payload[field].copy()
        stream[byte] |= np.uint8(1 << bit)
        return Mutant(_reply(kind, {**payload, field: stream}), valid=False)
    if op == "other-encoding":  # raw <-> .npy: both are valid encodings of the same arrays
        other = payload_to_record(payload) if kind == "dense" else arrays_to_record(payload)
        return Mutant(reply(99, other, 7), valid=True, equivalent=_reply(kind, payload))
    record = to_record(kind, payload)
    value = payload[key]
    if op == "npy-garbage":
        blob = data.draw(st.binary(max_size=200), label="blob")
        prefix = data.draw(st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"PK\x03\x04"]))
        forged = Array(value.dtype.name, value.shape, "numpy.ndarray", prefix + blob)
    elif op == "npy-huge-shape":  # np.load would allocate this before reading the data
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": value.dtype.str, "fortran_order": False, "shape": (10**12,)}
        )
        forged = Array(value.dtype.name, value.shape, "numpy.ndarray", header.getvalue() + b"\0")
    elif op == "raw-shape-lie":
        lie = data.draw(st.sampled_from([(value.size + 1,), (10**12,), (-1,), (0,)]))
        if lie == (0,) and value.size == 0:
            lie = (1,)
        forged = Array(value.dtype.name, lie, "raw", np.ascontiguousarray(value).tobytes())
    else:
        forged = Array(
            value.dtype.name, value.shape, "pickle", np.ascontiguousarray(value).tobytes()
        )
    record[key] = forged
    return Mutant(reply(99, record, 7), valid=False)


NUM_EXAMPLES = (0, -1, -(10**12), 2.5, 10.0, float("nan"), "bool", "missing", 1, CAP, CAP + 1)
NUM_EXAMPLES += (10**12, 2**63, 10**30)


def reply_fields(data: st.DataObject, kind: str, payload: Payload, policy: str) -> Mutant:
    """`num-examples`, metrics, message errors and a missing or misnamed ArrayRecord."""
    op = data.draw(st.sampled_from(("num-examples", "metric", "error", "no-arrays", "no-metrics")))
    record = to_record(kind, payload)
    if op == "error":
        return Mutant(error_reply(99), valid=False)
    if op == "no-arrays":
        content = RecordDict({"weights": record, "metrics": MetricRecord({"num-examples": 7})})
        return Mutant(Message(content=content, metadata=_metadata(99)), valid=False)
    if op == "no-metrics":
        content = RecordDict({"arrays": record, "stats": MetricRecord({"num-examples": 7})})
        return Mutant(Message(content=content, metadata=_metadata(99)), valid=False)
    if op == "metric":
        value = data.draw(
            st.sampled_from(
                [float("nan"), float("inf"), float("-inf"), [1.0, 2.0], [], 10**400, 0.5, 10**30]
            ),
            label="metric",
        )
        valid = value in (0.5, 10**30)
        equivalent = reply(99, record, 7) if valid else None
        return Mutant(reply(99, record, 7, loss=value), valid=valid, equivalent=equivalent)
    n = data.draw(st.sampled_from(NUM_EXAMPLES), label="num-examples")
    message = reply(99, record, 7)
    metrics = message.content["metrics"]
    if n == "missing":
        del metrics["num-examples"]
    elif n == "bool":  # MetricRecord refuses bools; a forged in-memory record can hold one
        metrics._data["num-examples"] = True
    else:
        metrics["num-examples"] = n
    ok = isinstance(n, int) and n > 0
    if ok and n > CAP:
        valid = policy == "cap"
        return Mutant(message, valid, reply(99, record, CAP) if valid else None)
    return Mutant(message, valid=ok, equivalent=reply(99, record, n) if ok else None)


FAMILIES: dict[str, Family] = {
    "structure": structure,
    "values": values,
    "encoding": encoding,
    "reply": reply_fields,
}


# -- the property ----------------------------------------------------------------------------------


def _aggregate(kind: str, aggregator: str, policy: str, replies: list[Message]):
    strategy = make_strategy(kind, aggregator, policy)
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy.rounds[1], record_to_arrays(arrays)


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def check(data: st.DataObject, family: Family) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    aggregator = data.draw(st.sampled_from(AGGREGATORS[kind]), label="aggregator")
    policy = data.draw(st.sampled_from(("cap", "reject")), label="policy")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    num_valid = data.draw(st.integers(1, 3), label="valid replies")
    valid = [
        reply(i + 1, to_record(kind, valid_payload(kind, rng)), int(rng.integers(1, CAP // 2)))
        for i in range(num_valid)
    ]
    mutant = family(data, kind, valid_payload(kind, rng), policy)
    at = data.draw(st.integers(0, num_valid), label="position")

    stats, new = _aggregate(kind, aggregator, policy, [*valid[:at], mutant.message, *valid[at:]])

    assert stats.num_replies + stats.num_rejected == num_valid + 1
    assert all(np.isfinite(v).all() for v in new.values()), "non-finite global model"
    if not mutant.valid:
        assert stats.num_rejected == 1, "an invalid reply was accepted"
        _assert_same(new, _aggregate(kind, aggregator, policy, valid)[1])
        return
    assert stats.num_rejected == 0, "a valid reply was rejected"
    if mutant.equivalent is not None:
        replies = [*valid[:at], mutant.equivalent, *valid[at:]]
        _assert_same(new, _aggregate(kind, aggregator, policy, replies)[1])


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_fuzz_payload_structure(data: st.DataObject) -> None:
    check(data, structure)


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_fuzz_float_values(data: st.DataObject) -> None:
    check(data, values)


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_fuzz_encoding_header_pad_bits(data: st.DataObject) -> None:
    check(data, encoding)


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_fuzz_num_examples_metrics_errors(data: st.DataObject) -> None:
    check(data, reply_fields)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_long(data: st.DataObject) -> None:
    """Every family, as many cases as the active profile asks (`HYPOTHESIS_PROFILE=long`)."""
    check(data, FAMILIES[data.draw(st.sampled_from(sorted(FAMILIES)), label="family")])
