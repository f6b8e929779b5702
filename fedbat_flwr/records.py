"""Door between the wire room (numpy dicts) and Flower's records.

Payloads travel as *raw* Flower Arrays: dtype, shape and the bytes, without the 128-byte `.npy`
header a `numpy.ndarray` Array carries, because at 1 bit per parameter every header counts.
Model weights (downlink, FedAvg uplink) use Flower's ordinary numpy Arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from .wire import PayloadError

RAW_STYPE = "raw"
NUMPY_STYPE = "numpy.ndarray"
# dtypes a payload may carry; anything else (objects, strings, ...) is refused before numpy sees it
_ALLOWED_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32"}
)
# Declared shapes: the project's arrays are at most 4-D (conv weights), no dimension of any
# tensor here reaches 2^32; anything beyond is refused before numpy sees it.
MAX_NDIM = 8
MAX_DIM = 2**32


def payload_to_record(payload: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack a wire payload into an ArrayRecord of raw arrays."""
    record = ArrayRecord()
    for key, value in payload.items():
        arr = np.ascontiguousarray(value)
        record[key] = Array(
            dtype=arr.dtype.name, shape=tuple(arr.shape), stype=RAW_STYPE, data=arr.tobytes()
        )
    return record


def record_to_payload(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into numpy arrays, refusing anything that is not plain numeric data.

    Both raw and `.npy` arrays are accepted, so a payload may come from any client; what the
    arrays must contain is the codec's business (`fedbat_flwr.wire`). Total: whatever the
    record holds, the result is arrays or a `PayloadError` naming the key and the field.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(None, "arrays", f"type={type(record).__name__} (allowed: ArrayRecord)")
    out: dict[str, np.ndarray] = {}
    for key, arr in record.items():
        dtype, shape = _declared(key, arr)
        if arr.stype == RAW_STYPE:
            out[key] = _view(key, arr.data, dtype, shape, "C")
        elif arr.stype == NUMPY_STYPE:
            out[key] = _from_npy(key, arr.data, dtype, shape)
        else:
            reason = f"stype {arr.stype!r} is not allowed ({RAW_STYPE!r}, {NUMPY_STYPE!r})"
            raise PayloadError(key, "stype", reason)
    return out


def _declared(key: str, arr: object) -> tuple[np.dtype, tuple[int, ...]]:
    """The Array's declared dtype and shape, checked before any of its bytes are looked at.

    Flower's deserializer makes `str` dtypes, `bytes` data and tuples of ints; an in-process
    client could hand over anything, so the types are checked too.
    """
    if not isinstance(arr, Array):
        raise PayloadError(key, "array", f"type={type(arr).__name__} (allowed: flwr Array)")
    if not isinstance(arr.dtype, str) or arr.dtype not in _ALLOWED_DTYPES:
        allowed = ", ".join(sorted(_ALLOWED_DTYPES))
        raise PayloadError(key, "dtype", f"dtype {arr.dtype!r} is not allowed ({allowed})")
    if not isinstance(arr.data, bytes):
        raise PayloadError(key, "data", f"type={type(arr.data).__name__} (allowed: bytes)")
    if not isinstance(arr.stype, str):
        raise PayloadError(key, "stype", f"type={type(arr.stype).__name__} (allowed: str)")
    return np.dtype(arr.dtype), _checked_shape(key, arr.shape)


def _checked_shape(key: str, shape: object) -> tuple[int, ...]:
    """At most MAX_NDIM non-negative int dimensions, none above MAX_DIM.

    numpy refuses more than 64 dimensions and shapes whose product of non-zero dimensions
    passes its index range even when a zero makes the array empty (`(0, 2**40, 2**40)`); both
    raised out of `reshape` before these bounds existed.
    """
    if not isinstance(shape, (tuple, list)):
        raise PayloadError(key, "shape", f"type={type(shape).__name__} (allowed: tuple of ints)")
    if len(shape) > MAX_NDIM:
        reason = f"{len(shape)} dimensions (allowed: at most {MAX_NDIM})"
        raise PayloadError(key, "shape", reason)
    for s in shape:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or not 0 <= s <= MAX_DIM:
            reason = f"dimension {s!r} in {tuple(shape)!r} (allowed: ints in [0, {MAX_DIM}])"
            raise PayloadError(key, "shape", reason)
    return tuple(int(s) for s in shape)


def _view(key: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """`data` as an array of a checked `shape`, once its length is exactly what the shape needs.

    Nothing is allocated for the claimed shape: numpy only views the bytes that arrived.
    """
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on a forged shape
    if len(data) != expected:
        raise PayloadError(
            key,
            "data",
            f"{len(data)} bytes do not match shape {shape} of {dtype} (expected {expected})",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)


# What `np.save` writes (Flower's `Array(ndarray)`): the magic, version 1.0 (2.0 only for
# headers past 64 KiB), the header length, then exactly this dict text padded with spaces to a
# multiple of 64 bytes and ended by a newline. Only this text is read; no Python literal parser
# (numpy's reader runs `ast.literal_eval` and raises TokenError, IndexError, TypeError,
# RecursionError, ... on forged text).
_NPY_MAGIC = b"\x93NUMPY"
_NPY_PREFIX = {b"\x01\x00": 2, b"\x02\x00": 4}  # version -> bytes of the header length
_NPY_DICT = re.compile(
    rb"\{'descr': '(?P<descr>[<>|][a-z][0-9]{1,2})', "
    rb"'fortran_order': (?P<fortran>True|False), "
    rb"'shape': \((?P<shape>(?:[0-9]{1,20}, )*(?:[0-9]{1,20},?)?)\), \} *\n"
)
# Bytes of header text accepted: numpy pads to 64, and 8 dimensions of 20 digits fit in 256.
MAX_NPY_HEADER = 512


def _from_npy(key: str, blob: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A `.npy` Array, parsed without `np.load` and without numpy's header reader.

    `np.load` (what `Array.numpy()` calls) allocates whatever shape the header claims before it
    reads the data, so a 100-byte reply could ask the server for 400 GB, and it opens zip
    archives too. Here the header must be the exact text `np.save` writes, agree with the
    Array's declared dtype and shape, and the data bytes must be exactly what that shape needs;
    only then does numpy view the bytes.
    """
    size_bytes = _NPY_PREFIX.get(blob[6:8]) if blob[:6] == _NPY_MAGIC else None
    if size_bytes is None:
        raise PayloadError(key, "data", "not a .npy array: bad magic or version (1.0, 2.0)")
    start = 8 + size_bytes
    length = int.from_bytes(blob[8:start], "little")
    if len(blob) < start or length > MAX_NPY_HEADER:
        reason = f"header of {length} bytes (allowed: at most {MAX_NPY_HEADER})"
        raise PayloadError(key, "header", reason)
    text = blob[start : start + length]
    match = _NPY_DICT.fullmatch(text)
    if match is None or len(text) != length:
        raise PayloadError(key, "header", "not the header np.save writes")
    dims = [d for d in match["shape"].decode().replace(" ", "").split(",") if d]
    found = _checked_shape(key, tuple(int(d) for d in dims))
    descr = match["descr"].decode()
    if (descr, found) != (dtype.str, shape):
        reason = f"holds {descr} {found}, declared {dtype.str} {shape}"
        raise PayloadError(key, "data", reason)
    order = "F" if match["fortran"] == b"True" else "C"
    # A private writable copy, as np.load would return (callers may load it into torch).
    return _view(key, blob[start + length :], dtype, shape, order).copy()


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Model weights as an ordinary Flower ArrayRecord (what Flower's own strategies average)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes this record occupies on Flower's wire: every serialized object in its tree.

    Flower (>= 1.19) ships records as a tree of content-addressed objects (record -> arrays ->
    chunks); summing their serialized sizes counts data, keys, dtypes, shapes and object ids.
    """
    total = len(record.deflate())
    stack = list(record.children.values())
    while stack:
        obj = stack.pop()
        total += len(obj.deflate())
        if obj.children:
            stack.extend(obj.children.values())
    return total
