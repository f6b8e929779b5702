"""Fuzzing the server's door: mutated replies of every payload kind among valid ones.

Each case builds 1-3 valid replies of one payload kind (FedBiF's and FedPM's with their server
rules too), mutates one more reply (its payload arrays, their encoding, declared shapes of any
rank and size, the `.npy` header text, the header, pad bits, float values, `num-examples`,
metrics, the message itself, or a second reply of a node) and feeds them all through
`build_strategy(...).aggregate_train` with one of the aggregators the kind allows. Whatever the
mutation:

- no exception escapes, and the new global model is finite;
- an invalid mutant is rejected (counted in `num_rejected`) and the model is bit for bit the
  one the valid replies make alone, as if the mutant's client had not been sampled;
- a valid mutant (an alternative encoding, a capped `num-examples`, a value at its bound) is
  accepted, and where it has a canonical equivalent the model equals the one that makes;
- every accepted reply moves each entry within its documented bound (`payloads.step_bound`).

CI runs 2,000 cases split over five tests (explicit `max_examples`). The `slow` test draws from
every family with the active profile: `FEDBAT_FUZZ_PROFILE=long pytest -m slow
tests/test_fuzz.py` runs 25,000 and, with `FEDBAT_FUZZ_REPORT=<file.json>`, writes its figures.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbat_flwr.records import (
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
)
from fedbat_flwr.wire import decode_payload
from fedbat_tools.messages import metadata_from
from tests.payloads import (
    ALL_KINDS,
    BOUNDS,
    CAP,
    FEDPM_KINDS,
    KINDS,
    PAYLOAD_KIND,
    RULE_KINDS,
    SIGN_KINDS,
    SPEC,
    fedpm_sent_theta,
    float_fields,
    make_strategy,
    pad_bits,
    step_bound,
    to_record,
    valid_payload,
    value_is_valid,
)
from tests.strategy_helpers import error_reply, reply

settings.register_profile("long", max_examples=25_000, deadline=None)
PROFILE = os.environ.get("FEDBAT_FUZZ_PROFILE") or os.environ.get("HYPOTHESIS_PROFILE")
if PROFILE:
    settings.load_profile(PROFILE)

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOWER = ("fedavg", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
AGGREGATORS = (
    {kind: FLOWER for kind in KINDS}
    | {kind: (*FLOWER, "majority", "sign-median") for kind in SIGN_KINDS}
    | {kind: ("fedavg",) for kind in RULE_KINDS}  # their server part aggregates itself
)
# What the cases saw (the long profile's report): cases, accepted / rejected mutants, and per
# kind the largest |change| / documented bound of any accepted reply.
FIGURES: Counter[str] = Counter()
WORST: dict[str, float] = {}
DTYPES = ("uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64")


@dataclass
class Mutant:
    """One mutated reply; `valid` says whether the server must accept it."""

    message: Message | None  # None: the first valid reply, delivered a second time
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
    ops = ["npy-garbage", "npy-huge-shape", "npy-text", "raw-shape-lie", "stype", "other-encoding"]
    ops += ["fortran"] if any(v.ndim >= 2 and v.size > 1 for v in payload.values()) else []
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
    if op == "fortran":  # a .npy array in Fortran order is the same array
        key = data.draw(st.sampled_from(sorted(k for k, v in payload.items() if v.ndim >= 2)))
        record = to_record(kind, payload)
        record[key] = Array(np.asfortranarray(payload[key]))
        return Mutant(reply(99, record, 7), valid=True, equivalent=_reply(kind, payload))
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
    elif op == "npy-text":
        forged = Array(value.dtype.name, value.shape, "numpy.ndarray", npy_text(data, value))
    elif op == "raw-shape-lie":
        lie = data.draw(shape_lies(value), label="shape")
        forged = Array(value.dtype.name, lie, "raw", np.ascontiguousarray(value).tobytes())
    else:
        forged = Array(
            value.dtype.name, value.shape, "pickle", np.ascontiguousarray(value).tobytes()
        )
    record[key] = forged
    return Mutant(reply(99, record, 7), valid=False)


def shape_lies(value: np.ndarray) -> st.SearchStrategy[tuple[int, ...]]:
    """Declared shapes other than the array's: one more entry, any rank (up to 70 dimensions,
    numpy's limit is 64), huge dimensions next to a zero, the same entries in another rank."""
    n = value.size
    fixed = [(n + 1,), (10**12,), (-1,), (0,), (0, 2**40, 2**40), (0, 2**63 - 1, 2), (1,) * 65]
    fixed += [(1,) * 9, (n, 1), (1, n), (1,) * 3 + (n,), (n, 1, 1, 1, 1)]
    dims = st.lists(st.integers(0, 2**64), min_size=0, max_size=70).map(tuple)
    return st.one_of(st.sampled_from(fixed), dims).filter(lambda s: s != value.shape)


HEADER_TEXTS = (
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ",  # unterminated
    b"{'descr': (), 'fortran_order': False, 'shape': (1,), }",
    b"{'descr': ('<f4',), 'fortran_order': False, 'shape': (1,), }",
    b"{1: '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
    b"{(1, []): 0, 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1099511627776, 1099511627776), }",
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"1, " * 64 + b"1), }",
    b"{'descr': '<f4', 'fortran_order': 0, 'shape': [1], }",
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"9" * 5000 + b",), }",
    b"{'x': " + b"[" * 3000 + b"]" * 3000 + b"}",
    b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
    b"{'descr': 'O', 'fortran_order': False, 'shape': (1,), }",
)


def npy_text(data: st.DataObject, value: np.ndarray) -> bytes:
    """The `.npy` encoding of `value` with its header text changed: bytes replaced, inserted or
    deleted, the declared header length changed, the shape of another rank (same entries), or
    a text numpy's own reader raises on. Every change is invalid (the header must be exactly
    what `np.save` writes for the declared array)."""
    blob = Array(np.ascontiguousarray(value)).data
    length = int.from_bytes(blob[8:10], "little")
    op = data.draw(st.sampled_from(("replace", "insert", "delete", "length", "rank", "text")))
    i = data.draw(st.integers(10, 10 + length - 1), label="at")
    if op == "replace":
        new = data.draw(st.integers(0, 255).filter(lambda b: b != blob[i]), label="byte")
        return blob[:i] + bytes([new]) + blob[i + 1 :]
    if op == "insert":
        return blob[:i] + bytes([data.draw(st.integers(0, 255), label="byte")]) + blob[i:]
    if op == "delete":
        return blob[:i] + blob[i + 1 :]
    if op == "length":
        new = data.draw(st.integers(0, 2**16 - 1).filter(lambda n: n != length), label="len")
        return blob[:8] + new.to_bytes(2, "little") + blob[10:]
    if op == "rank":
        shape = data.draw(st.sampled_from([(value.size, 1), (1, *value.shape), (1,) * 9]))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": value.dtype.str, "fortran_order": False, "shape": shape}
        )
        return header.getvalue() + blob[10 + length :]
    text = data.draw(st.sampled_from(HEADER_TEXTS), label="text")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    version = data.draw(st.sampled_from([b"\x01\x00", b"\x02\x00"]), label="version")
    size = len(text).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    return b"\x93NUMPY" + version + size + text + blob[10 + length :]


def duplicate(data: st.DataObject, kind: str, payload: Payload, policy: str) -> Mutant:
    """A second reply of node 1 (whose reply comes first): the same message again, or another
    valid payload. Either way rejected; the model is the one the first reply makes."""
    if data.draw(st.booleans(), label="same message"):
        return Mutant(None, valid=False)
    return Mutant(reply(1, to_record(kind, payload), 7), valid=False)


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
        return Mutant(Message(content=content, metadata=metadata_from(99)), valid=False)
    if op == "no-metrics":
        content = RecordDict({"arrays": record, "stats": MetricRecord({"num-examples": 7})})
        return Mutant(Message(content=content, metadata=metadata_from(99)), valid=False)
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
    "duplicate": duplicate,
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


def _bounded_change(kind: str, message: Message) -> None:
    """An accepted reply moves every entry within its documented bound (`step_bound`): what
    one client can do to the model, whatever else it sent. Weights (dense, BiFL) are finite."""
    payload = record_to_payload(message.content["arrays"])
    decoded = decode_payload(PAYLOAD_KIND.get(kind, kind), payload, SPEC, BOUNDS)
    if kind in FEDPM_KINDS:
        decoded = decoded.resolved(fedpm_sent_theta())  # codec 21 decodes against it
    delta = decoded.delta()
    for t in SPEC:
        change = np.abs(delta[t.name].astype(np.float64))
        assert np.isfinite(change).all(), t.name
        if kind == "fedbif-bits" and t.name in decoded.view.planes:
            bound = float(sum(1 << i for i in decoded.view.active))  # sum of the active 2^i
        elif kind in FEDPM_KINDS and t.name in decoded.view.masks:
            bound = 1.0  # a mask entry: 0 or 1
        else:
            bound = step_bound(kind, "", t)
        if not np.isfinite(bound) or not change.size:
            continue
        worst = float(change.max()) / float(np.float32(bound))
        assert worst <= 1.0, f"{kind} {t.name}: |change| {change.max()} > bound {bound}"
        WORST[kind] = max(WORST.get(kind, 0.0), worst)


def check(data: st.DataObject, family: Family) -> None:
    kind = data.draw(st.sampled_from(ALL_KINDS), label="kind")
    aggregator = data.draw(st.sampled_from(AGGREGATORS[kind]), label="aggregator")
    policy = data.draw(st.sampled_from(("cap", "reject")), label="policy")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    num_valid = data.draw(st.integers(1, 3), label="valid replies")
    valid = [
        reply(i + 1, to_record(kind, valid_payload(kind, rng)), int(rng.integers(1, CAP // 2)))
        for i in range(num_valid)
    ]
    mutant = family(data, kind, valid_payload(kind, rng), policy)
    message = valid[0] if mutant.message is None else mutant.message
    # A second reply of node 1 comes after its first; any other mutant anywhere.
    at = data.draw(st.integers(1 if family is duplicate else 0, num_valid), label="position")

    stats, new = _aggregate(kind, aggregator, policy, [*valid[:at], message, *valid[at:]])

    FIGURES["cases"] += 1
    FIGURES[f"kind {kind}"] += 1
    FIGURES[f"aggregator {aggregator}"] += 1
    assert stats.num_replies + stats.num_rejected == num_valid + 1
    assert all(np.isfinite(v).all() for v in new.values()), "non-finite global model"
    for honest in valid:
        _bounded_change(kind, honest)
        FIGURES["accepted replies within their bound"] += 1
    if not mutant.valid:
        assert stats.num_rejected == 1, "an invalid reply was accepted"
        _assert_same(new, _aggregate(kind, aggregator, policy, valid)[1])
        FIGURES["invalid mutants rejected"] += 1
        return
    assert stats.num_rejected == 0, "a valid reply was rejected"
    _bounded_change(kind, message)
    FIGURES["accepted replies within their bound"] += 1
    FIGURES["valid mutants accepted"] += 1
    if mutant.equivalent is not None:
        replies = [*valid[:at], mutant.equivalent, *valid[at:]]
        _assert_same(new, _aggregate(kind, aggregator, policy, replies)[1])


@settings(FUZZ, max_examples=450)
@given(data=st.data())
def test_fuzz_payload_structure(data: st.DataObject) -> None:
    check(data, structure)


@settings(FUZZ, max_examples=550)
@given(data=st.data())
def test_fuzz_float_values(data: st.DataObject) -> None:
    check(data, values)


@settings(FUZZ, max_examples=550)
@given(data=st.data())
def test_fuzz_encoding_shapes_npy_text_header_pad_bits(data: st.DataObject) -> None:
    check(data, encoding)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_num_examples_metrics_errors(data: st.DataObject) -> None:
    check(data, reply_fields)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_second_reply_of_a_node(data: st.DataObject) -> None:
    check(data, duplicate)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_long(data: st.DataObject) -> None:
    """Every family, as many cases as the active profile asks (`FEDBAT_FUZZ_PROFILE=long`)."""
    check(data, FAMILIES[data.draw(st.sampled_from(sorted(FAMILIES)), label="family")])


@pytest.fixture(scope="module", autouse=True)
def _report():
    """With `FEDBAT_FUZZ_REPORT`, write what the module's cases saw as JSON when it ends."""
    yield
    path = os.environ.get("FEDBAT_FUZZ_REPORT")
    if path:
        figures = dict(FIGURES) | {"profile": PROFILE or "default"}
        figures["largest |change| / bound by kind"] = dict(sorted(WORST.items()))
        with open(path, "w") as out:
            json.dump(figures, out, indent=1, sort_keys=True)
