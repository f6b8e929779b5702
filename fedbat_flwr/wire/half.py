"""Float16 tensors on a downlink: the small BatchNorm part of a compressed global model.

FedBiF and FedPM send their bulk (conv / linear weights) as integers or probabilities; the few
remaining tensors (BatchNorm affine and running statistics, 0.5% of CNN4) travel as float16,
flattened in spec order and concatenated. float16 keeps ~3 significant digits, far below the
noise of a federated round, at half the cost of float32.

A log-domain tensor (``running_var``) must stay > 0: values below float16's smallest subnormal
(2^-24, ~6e-8) are sent as that value instead of rounding to 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import check_float_tensors
from fedbat_flwr.wire.spec import ModelSpec

HALF_TINY = np.float16(2.0**-24)


def encode_half(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every ``spec`` tensor of ``arrays`` as one flat float16 array (spec order)."""
    pieces = []
    for t in spec:
        if t.name not in arrays:
            raise PayloadError(t.name, "dense", f"missing (the part has {len(spec)} tensors)")
        value = np.asarray(arrays[t.name], dtype=np.float32).reshape(-1)
        if value.size != t.size:
            raise PayloadError(t.name, "dense", f"{value.size} values (allowed: {t.size})")
        with np.errstate(over="ignore"):
            half = value.astype(np.float16)
        if not np.isfinite(half).all():
            raise PayloadError(t.name, "dense", "values do not fit float16 (|x| > 65504 or nan)")
        if t.domain == "log":
            if value.size and value.min() <= 0:
                raise PayloadError(t.name, "dense", "a variance must be > 0")
            half = np.maximum(half, HALF_TINY)
        pieces.append(half)
    return np.concatenate([np.zeros(0, np.float16), *pieces])


def validate_half(values: np.ndarray, spec: ModelSpec, field: str) -> dict[str, np.ndarray]:
    """Length, finiteness and (log domain) positivity; float32 arrays of the spec's shapes."""
    pieces = check_float_tensors(values, spec, field, weights=True)
    return {
        t.name: v.astype(np.float32).reshape(t.shape) for t, v in zip(spec, pieces, strict=True)
    }
