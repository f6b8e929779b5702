"""Binary-weights codec (BiFL): absolute weights, 1 bit + alpha per weight matrix (version 1).

Unlike every other kind, the payload is the client's *model*, not an update: the server
averages the decoded weights and the mean is the new global model (``absolute = True``).

Which tensors are binarized follows from the server's spec alone: trainable parameters with
two or more dimensions (convolution and linear weights), ``alpha_l * sign(w_l)`` with
``alpha_l = mean |w_l|`` (XNOR-Net). Binary networks keep BatchNorm (affine and running
statistics) and biases in full precision, so those travel as float32 and are counted in the
payload's size: on CNN4 they are 1,920 of 391,840 entries (+0.16 bit per parameter).

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (4,)   ``b"FB"``, codec id (4 = binary weights), layout version (1)
signs    uint8   (B,)   the binarized tensors' sign bits exactly as in ``signs.py``
                        (per tensor ``np.packbits(bitorder="little")``, pad bits zero)
alphas   float32 (Lb,)  one alpha per binarized tensor; finite, >= 0
dense    float32 (D,)   every other tensor flattened, spec order, concatenated; finite,
                        and > 0 for log-domain tensors (BatchNorm ``running_var``)
======== ======= ====== ================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    ANY_STEP,
    check_fields,
    check_header,
    check_length,
    check_names,
    check_weight,
    flat_target,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.signs import (
    SIGNS_CODEC_ID,
    SIGNS_VERSION,
    SignsPayload,
    accumulate_signs,
    encode_signs,
    validate_signs,
)
from fedbat_flwr.wire.spec import ModelSpec, TensorSpec

BINARY_CODEC_ID = 4
BINARY_VERSION = 1
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "signs": (np.dtype(np.uint8), 1),
    "alphas": (np.dtype(np.float32), 1),
    "dense": (np.dtype(np.float32), 1),
}


def is_binarized(t: TensorSpec) -> bool:
    """Conv / linear weights: trainable, at least 2-D."""
    return t.kind == "param" and len(t.shape) >= 2


def split_spec(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
    """(binarized tensors, full-precision tensors), each in spec order."""
    return (
        ModelSpec(tuple(t for t in spec if is_binarized(t))),
        ModelSpec(tuple(t for t in spec if not is_binarized(t))),
    )


@dataclass(frozen=True, eq=False)
class BinaryWeightsPayload:
    """A validated payload: the signs view of the binarized part, the dense part per tensor."""

    spec: ModelSpec
    signs: SignsPayload
    dense: dict[str, np.ndarray]


def encode_binary_weights(
    spec: ModelSpec,
    bits: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    dense: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Binarized tensors as bits (True = +alpha) and alpha; all others dense float32."""
    binarized, full = split_spec(spec)
    signs = encode_signs(binarized, bits, alphas)
    check_names(dense, full, "dense")
    flat = [np.asarray(dense[t.name], dtype=np.float32).reshape(-1) for t in full]
    for t, v in zip(full, flat, strict=True):
        if v.size != t.size:
            raise PayloadError(t.name, "dense", f"{v.size} values (allowed: {t.size})")
    return {
        "header": make_header(BINARY_CODEC_ID, BINARY_VERSION),
        "signs": signs["signs"],
        "alphas": signs["alphas"],
        "dense": np.concatenate([np.zeros(0, np.float32), *flat]),
    }


def validate_binary_weights(
    payload: Mapping[str, np.ndarray], spec: ModelSpec
) -> BinaryWeightsPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    check_header(payload["header"], BINARY_CODEC_ID, BINARY_VERSION, "binary weights")
    binarized, full = split_spec(spec)
    signs_header = make_header(SIGNS_CODEC_ID, SIGNS_VERSION)
    signs = validate_signs(
        {"header": signs_header, "signs": payload["signs"], "alphas": payload["alphas"]},
        binarized,
        ANY_STEP,
    )
    dense = payload["dense"]
    check_length(dense, full.num_params, "dense", "the full-precision tensors' sizes")
    pieces = split_by(read_only_copy(dense), [t.size for t in full])
    for t, v in zip(full, pieces, strict=True):
        if not np.isfinite(v).all():
            raise PayloadError(t.name, "dense", "non-finite values (allowed: finite float32)")
        if t.domain == "log" and v.size and v.min() <= 0:
            reason = f"value={float(v.min())!r} (allowed: > 0 for a variance)"
            raise PayloadError(t.name, "dense", reason)
    return BinaryWeightsPayload(
        spec, signs, {t.name: v.reshape(t.shape) for t, v in zip(full, pieces, strict=True)}
    )


def accumulate_binary_weights(
    acc: MutableMapping[str, np.ndarray], view: BinaryWeightsPayload, weight: float
) -> None:
    """In place ``acc[name] += weight * w_name`` for every tensor (weights, not updates)."""
    check_weight(weight)
    accumulate_signs(acc, view.signs, view.signs.spec, ANY_STEP, weight)
    w = np.float32(weight)
    for t in view.spec:
        if t.name in view.dense:
            flat_target(acc, t)[:] += w * view.dense[t.name].reshape(-1)


@dataclass(frozen=True)
class BinaryWeightsDecoded:
    """The wire ``Decoded`` of a BiFL payload: absolute weights, averaged into the new model."""

    view: BinaryWeightsPayload
    absolute: ClassVar[bool] = True

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        accumulate_binary_weights(acc, self.view, weight)

    def delta(self) -> dict[str, np.ndarray]:
        """The client's weights (absolute payload: not an update)."""
        out = {t.name: np.zeros(t.shape, np.float32) for t in self.view.spec}
        accumulate_binary_weights(out, self.view, 1.0)
        return out
