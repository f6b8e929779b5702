"""Door between the wire room (numpy dicts) and Flower's records.

Payloads travel as *raw* Flower Arrays: dtype, shape and the bytes, without the 128-byte `.npy`
header a `numpy.ndarray` Array carries, because at 1 bit per parameter every header counts.
Model weights (downlink, FedAvg uplink) use Flower's ordinary numpy Arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from .wire import PayloadError

RAW_STYPE = "raw"
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
        else:
            try:
                out[key] = arr.numpy()
            except (TypeError, ValueError) as exc:
                raise PayloadError(key, "data", f"not a numpy array: {exc}") from None
    return out


def _from_raw(key: str, arr: Array) -> np.ndarray:
    dtype = np.dtype(arr.dtype)
    shape = tuple(int(s) for s in arr.shape)
    if any(s < 0 for s in shape):
        raise PayloadError(key, "shape", f"negative dimension in {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(arr.data) != expected:
        raise PayloadError(
            key,
            "data",
            f"{len(arr.data)} bytes do not match shape {shape} of {dtype} (expected {expected})",
        )
    return np.frombuffer(arr.data, dtype=dtype).reshape(shape)


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
