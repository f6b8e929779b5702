"""Door between the wire room (numpy dicts) and Flower's records.

Payloads travel as *raw* Flower Arrays: dtype, shape and the bytes, without the 128-byte `.npy`
header a `numpy.ndarray` Array carries, because at 1 bit per parameter every header counts.
Model weights (downlink, FedAvg uplink) use Flower's ordinary numpy Arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

from .wire import PayloadError

RAW_STYPE = "raw"
NUMPY_STYPE = "numpy.ndarray"
# dtypes a payload may carry; anything else (objects, strings, ...) is refused before numpy sees it
_ALLOWED_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32"}
)


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
    arrays must contain is the codec's business (`fedbat_flwr.wire`).
    """
    out: dict[str, np.ndarray] = {}
    for key, arr in record.items():
        if arr.dtype not in _ALLOWED_DTYPES:
            allowed = ", ".join(sorted(_ALLOWED_DTYPES))
            raise PayloadError(key, "dtype", f"dtype {arr.dtype!r} is not allowed ({allowed})")
        if arr.stype == RAW_STYPE:
            out[key] = _from_raw(key, arr)
        elif arr.stype == NUMPY_STYPE:
            out[key] = _from_npy(key, arr)
        else:
            reason = f"stype {arr.stype!r} is not allowed ({RAW_STYPE!r}, {NUMPY_STYPE!r})"
            raise PayloadError(key, "stype", reason)
    return out


def _from_raw(key: str, arr: Array) -> np.ndarray:
    return _view(key, arr.data, np.dtype(arr.dtype), tuple(int(s) for s in arr.shape), "C")


def _view(key: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    """`data` as an array of `shape`, once its length is exactly what the shape needs."""
    if any(s < 0 for s in shape):
        raise PayloadError(key, "shape", f"negative dimension in {shape}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on a forged shape
    if len(data) != expected:
        raise PayloadError(
            key,
            "data",
            f"{len(data)} bytes do not match shape {shape} of {dtype} (expected {expected})",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _from_npy(key: str, arr: Array) -> np.ndarray:
    """A `.npy` Array, parsed without `np.load`.

    `np.load` (what `Array.numpy()` calls) allocates whatever shape the header claims before it
    reads the data, so a 100-byte reply could ask the server for 400 GB, and it opens zip
    archives too. Here the header is read first and must agree with the Array's dtype and shape
    and with the number of data bytes; only then does numpy view the bytes.
    """
    stream = BytesIO(arr.data)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADERS:
            raise ValueError(f"format version {version} (allowed: 1.0, 2.0)")
        shape, fortran_order, dtype = _NPY_HEADERS[version](stream)
    except ValueError as exc:
        raise PayloadError(key, "data", f"not a .npy array: {exc}") from None
    declared = (np.dtype(arr.dtype), tuple(int(s) for s in arr.shape))
    if (dtype, tuple(shape)) != declared:
        reason = f"holds {dtype.str} {tuple(shape)}, declared {declared[0].str} {declared[1]}"
        raise PayloadError(key, "data", reason)
    order = "F" if fortran_order else "C"
    # A private writable copy, as np.load would return (callers may load it into torch).
    return _view(key, arr.data[stream.tell() :], dtype, declared[1], order).copy()


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
