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

The mixed 1-bit updates (``mixed.py``) have the same structure, signs for the binarized
tensors and floats for the rest: both encode, validate and accumulate it with the
``*_signs_and_floats`` functions here.
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
    check_float_tensors,
    check_header,
    check_names,
    dense_by_accumulating,
    flat_target,
    make_header,
)
from fedbat_flwr.wire.signs import (
    SignsPayload,
    accumulate_sign_view,
    encode_sign_part,
    validate_sign_part,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec

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


def encode_signs_and_floats(
    spec: ModelSpec,
    bits: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    floats: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The ``signs`` / ``alphas`` fields of the binarized tensors and every other tensor's
    values as flat float32 (names and sizes checked): the layout binary weights and the mixed
    updates share, before each writes its own ``dense`` field."""
    binarized, full = split_spec(spec)
    sign_part = encode_sign_part(binarized, bits, alphas)
    check_names(floats, full, "dense")
    flat = [np.asarray(floats[t.name], dtype=np.float32).reshape(-1) for t in full]
    for t, v in zip(full, flat, strict=True):
        if v.size != t.size:
            raise PayloadError(t.name, "dense", f"{v.size} values (allowed: {t.size})")
    return sign_part, flat


def validate_signs_and_floats(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds, *, weights: bool
) -> tuple[SignsPayload, dict[str, np.ndarray]]:
    """The sign part (binarized tensors, alphas within ``bounds``) and the ``dense`` floats per
    other tensor (flat, read-only) of a payload whose fields and header the caller checked;
    ``weights``: the floats are weights (a variance must be > 0), not updates."""
    binarized, full = split_spec(spec)
    signs = validate_sign_part(payload["signs"], payload["alphas"], binarized, bounds)
    pieces = check_float_tensors(payload["dense"], full, "dense", weights=weights)
    return signs, dict(zip(full.names, pieces, strict=True))


def encode_binary_weights(
    spec: ModelSpec,
    bits: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    dense: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Binarized tensors as bits (True = +alpha) and alpha; all others dense float32."""
    sign_part, flat = encode_signs_and_floats(spec, bits, alphas, dense)
    return {
        "header": make_header(BINARY_CODEC_ID, BINARY_VERSION),
        **sign_part,
        "dense": np.concatenate([np.zeros(0, np.float32), *flat]),
    }


def validate_binary_weights(
    payload: Mapping[str, np.ndarray], spec: ModelSpec
) -> BinaryWeightsPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    check_header(payload["header"], BINARY_CODEC_ID, BINARY_VERSION, "binary weights")
    signs, dense = validate_signs_and_floats(payload, spec, ANY_STEP, weights=True)
    shaped = {t.name: dense[t.name].reshape(t.shape) for t in spec if t.name in dense}
    return BinaryWeightsPayload(spec, signs, shaped)


def accumulate_binary_weights(
    acc: MutableMapping[str, np.ndarray], view: BinaryWeightsPayload, weight: float
) -> None:
    """In place ``acc[name] += weight * w_name`` for every tensor (weights, not updates)."""
    accumulate_signs_and_floats(acc, view.spec, view.signs, view.dense, weight)


def accumulate_signs_and_floats(
    acc: MutableMapping[str, np.ndarray],
    spec: ModelSpec,
    signs: SignsPayload,
    floats: Mapping[str, np.ndarray],
    weight: float,
) -> None:
    """In place ``acc[name] += weight * value`` of a validated sign part (alpha * (±1)) and of
    the float tensors (``validate_signs_and_floats``), for binary weights and mixed updates."""
    accumulate_sign_view(acc, signs, weight)
    w = np.float32(weight)
    for t in spec:
        if t.name in floats:
            flat_target(acc, t)[:] += w * floats[t.name].reshape(-1)


@dataclass(frozen=True)
class BinaryWeightsDecoded:
    """The wire ``Decoded`` of a BiFL payload: absolute weights, averaged into the new model."""

    view: BinaryWeightsPayload
    absolute: ClassVar[bool] = True

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        accumulate_binary_weights(acc, self.view, weight)

    def delta(self) -> dict[str, np.ndarray]:
        """The client's weights (absolute payload: not an update)."""
        return dense_by_accumulating(self.view.spec, self.accumulate)


def decode_binary_weights(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> BinaryWeightsDecoded:
    """The ``binary-weights`` kind: weights, not steps, so the run's step bounds do not apply."""
    return BinaryWeightsDecoded(validate_binary_weights(payload, spec))
