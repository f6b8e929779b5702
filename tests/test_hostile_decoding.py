"""Issue 19: one hostile reply never stops a round; every decoder is total.

Each class of reply an adversarial review found to raise something other than `PayloadError`
out of `aggregate_train` has a case here: forged raw shapes (a zero next to a huge dimension,
more dimensions than numpy allows), `.npy` header text that numpy's own reader chokes on, and
FedPM headers that are not uint8 vectors. Each is refused as a `PayloadError` naming the field,
and through the strategy it is one counted rejection while the other replies still aggregate.
Defence in depth: any other exception while one reply is handled rejects that reply only; an
exception in the aggregation itself still fails the round loudly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedbat_flwr.records import payload_to_record, record_to_arrays, record_to_payload
from fedbat_flwr.wire import PayloadError, decode_payload
from fedbat_flwr.wire.fedpm import encode_fedpm_mask, fedpm_groups
from tests.payloads import BOUNDS, SPEC, make_strategy, to_record, valid_payload
from tests.strategy_helpers import reply


def _honest(kind: str = "signs", count: int = 2) -> list[Message]:
    rng = np.random.default_rng(3)
    return [reply(i, to_record(kind, valid_payload(kind, rng)), 50) for i in range(1, count + 1)]


def _with_array(kind: str, key: str, forged: Array) -> Message:
    record = to_record(kind, valid_payload(kind, np.random.default_rng(8)))
    record[key] = forged
    return reply(99, record, 50)


def _rejected_alone(kind: str, hostile: Message) -> None:
    """The hostile reply is one counted rejection; the model is the honest replies' model."""
    strategy = make_strategy(kind)
    arrays, _ = strategy.aggregate_train(1, [*_honest(kind), hostile])
    assert strategy.rounds[1].num_rejected == 1
    assert strategy.rounds[1].num_replies == 2
    alone, _ = make_strategy(kind).aggregate_train(1, _honest(kind))
    got, expected = record_to_arrays(arrays), record_to_arrays(alone)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# -- 1. raw arrays: declared shapes numpy cannot reshape to ------------------------------------

RAW_SHAPES = {
    "zero-and-huge": ((0, 2**40, 2**40), b""),
    "zero-and-int64-max": ((0, 2**63 - 1, 2), b""),
    "65-dims": ((1,) * 65, b"\0"),
    "9-dims": ((1,) * 9, b"\0"),
    "negative": ((-1,), b"\0"),
}


@pytest.mark.parametrize("case", sorted(RAW_SHAPES))
def test_raw_array_with_an_unreshapeable_shape_is_a_payload_error(case: str) -> None:
    shape, data = RAW_SHAPES[case]
    record = ArrayRecord()
    record["signs"] = Array("uint8", tuple(shape), "raw", data)
    with pytest.raises(PayloadError) as err:
        record_to_payload(record)
    assert err.value.layer == "signs" and err.value.field == "shape"


@pytest.mark.parametrize("case", sorted(RAW_SHAPES))
def test_raw_array_with_an_unreshapeable_shape_is_one_rejection(case: str) -> None:
    shape, data = RAW_SHAPES[case]
    _rejected_alone(
        "signs", _with_array("signs", "signs", Array("uint8", tuple(shape), "raw", data))
    )


# -- 2. .npy arrays: header text numpy's reader raises other exceptions on ---------------------


def _npy(header_text: bytes, data: bytes = b"\0" * 4, version: bytes = b"\x01\x00") -> bytes:
    """A .npy blob whose header dict text is exactly `header_text` (padded like numpy's)."""
    text = header_text + b" " * (-(len(header_text) + 11) % 64) + b"\n"
    length = len(text).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    return b"\x93NUMPY" + version + length + text + data


NPY_HEADERS = {
    "unterminated-dict": b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), ",  # TokenError
    "descr-empty-tuple": b"{'descr': (), 'fortran_order': False, 'shape': (1,), }",  # IndexError
    "descr-one-tuple": b"{'descr': ('<f4',), 'fortran_order': False, 'shape': (1,), }",
    "int-key": b"{1: '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",  # TypeError
    "unhashable-key": b"{(1, []): 0, 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
    "shape-huge-zero": b"{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1099511627776, "
    b"1099511627776), }",
    "65-dims": b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"1, " * 64 + b"1), }",
    "shape-not-ints": b"{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,), }",
    "nested-depth": b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': "
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "huge-int": b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"9" * 5000 + b",), }",
}


@pytest.mark.parametrize("case", sorted(NPY_HEADERS))
def test_npy_header_text_numpy_chokes_on_is_a_payload_error(case: str) -> None:
    record = ArrayRecord()
    record["alphas"] = Array("float32", (1,), "numpy.ndarray", _npy(NPY_HEADERS[case]))
    with pytest.raises(PayloadError) as err:
        record_to_payload(record)
    assert err.value.layer == "alphas"


@pytest.mark.parametrize("case", sorted(NPY_HEADERS))
def test_npy_header_text_numpy_chokes_on_is_one_rejection(case: str) -> None:
    forged = Array("float32", (6,), "numpy.ndarray", _npy(NPY_HEADERS[case], b"\0" * 24))
    _rejected_alone("signs", _with_array("signs", "alphas", forged))


def test_npy_header_longer_than_any_the_project_writes_is_refused() -> None:
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }" + b" " * 70_000
    record = ArrayRecord()
    record["alphas"] = Array("float32", (1,), "numpy.ndarray", _npy(text, version=b"\x02\x00"))
    with pytest.raises(PayloadError, match="header"):
        record_to_payload(record)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((), np.float32),
        np.arange(5, dtype=np.uint8),
        np.ones((3, 4), np.float16),
        np.ones((2, 3, 4, 5), np.float32),
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.zeros((0, 3), np.int64),
    ],
)
def test_npy_arrays_numpy_writes_still_read_back(array: np.ndarray) -> None:
    """The strict parser reads every header shape `np.save` (Flower's Array) writes."""
    record = ArrayRecord()
    record["x"] = Array(array)
    out = record_to_payload(record)["x"]
    np.testing.assert_array_equal(out, array)
    assert out.dtype == array.dtype and out.flags.writeable


# -- 3. FedPM: the header is looked at before its dtype and shape are checked --------------------


def _fedpm_payload() -> dict[str, np.ndarray]:
    masked, stats = fedpm_groups(SPEC)
    masks = {t.name: np.ones(t.shape, bool) for t in masked}
    signs = {t.name: np.ones(t.shape, bool) for t in stats}
    return encode_fedpm_mask(SPEC, masks, signs, dict.fromkeys(signs, 0.1), coding="packed")


FEDPM_HEADERS = {
    "2-d": np.frombuffer(b"FB\x13\x01\x00\x00", np.uint8).reshape(3, 2),  # IndexError
    "nan": np.array([70, 66, np.nan, 1], np.float32),  # ValueError
    "inf": np.array([70, 66, np.inf, 1], np.float32),  # OverflowError
    "object": np.array([70, 66, "x", 1], dtype=object),  # TypeError (in-memory payloads)
    "scalar-list": [70, 66, 19, 1],
}


@pytest.mark.parametrize("case", sorted(FEDPM_HEADERS))
def test_fedpm_header_of_another_dtype_or_shape_is_a_payload_error(case: str) -> None:
    payload = {**_fedpm_payload(), "header": FEDPM_HEADERS[case]}
    with pytest.raises(PayloadError) as err:
        decode_payload("fedpm-mask", payload, SPEC, BOUNDS)
    assert err.value.field == "header"


def test_fedpm_float_header_is_one_rejection() -> None:
    strategy = make_strategy("fedpm-mask")  # FedPM's server part, reference global_arrays()
    honest = [reply(i, payload_to_record(_fedpm_payload()), 50) for i in (1, 2)]
    hostile = reply(99, payload_to_record({**_fedpm_payload(), "header": FEDPM_HEADERS["nan"]}))
    arrays, _ = strategy.aggregate_train(1, [*honest, hostile])
    assert arrays is not None
    assert strategy.rounds[1].num_rejected == 1 and strategy.rounds[1].num_replies == 2


# -- 4. defence in depth -----------------------------------------------------------------------


def test_any_exception_while_handling_one_reply_rejects_only_that_reply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder bug (here: one that raises RuntimeError on a marked reply) is a counted,
    logged rejection of that reply, not the end of the round."""
    strategy = make_strategy("signs")
    real = strategy.decode

    def buggy(record: ArrayRecord):
        if "boom" in record:
            raise RuntimeError("decoder bug")
        return real(record)

    monkeypatch.setattr(strategy, "decode", buggy)
    hostile = to_record("signs", valid_payload("signs", np.random.default_rng(2)))
    hostile["boom"] = Array(np.zeros(1, np.uint8))
    arrays, _ = strategy.aggregate_train(1, [*_honest(), reply(99, hostile, 50)])
    assert arrays is not None
    assert strategy.rounds[1].num_rejected == 1 and strategy.rounds[1].num_replies == 2
    assert "RuntimeError" in caplog.text and "decoder bug" in caplog.text


def test_an_exception_in_the_aggregation_itself_still_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strategy = make_strategy("signs")

    def broken(*args: object) -> None:
        raise RuntimeError("aggregation bug")

    monkeypatch.setattr(strategy.aggregator, "aggregate", broken)
    with pytest.raises(RuntimeError, match="aggregation bug"):
        strategy.aggregate_train(1, _honest())


def test_a_forged_array_record_entry_is_one_rejection() -> None:
    """Objects Flower's deserializer never makes, but an in-process client could send."""
    record = to_record("signs", valid_payload("signs", np.random.default_rng(1)))
    bad = Array("uint8", (4,), "raw", b"\0" * 4)
    bad.shape = ("4",)  # type: ignore[assignment]
    record["header"] = bad
    _rejected_alone("signs", reply(99, record, 50))


def test_npy_garbage_after_a_valid_magic_is_a_payload_error() -> None:
    record = ArrayRecord()
    blob = io.BytesIO()
    blob.write(b"\x93NUMPY\x01\x00\xff\xff{")
    record["x"] = Array("float32", (1,), "numpy.ndarray", blob.getvalue())
    with pytest.raises(PayloadError, match="header"):
        record_to_payload(record)
