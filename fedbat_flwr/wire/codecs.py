"""Payload kinds by name: the server's one door into the wire room.

Each kind validates a payload against the server's `ModelSpec` and returns a `Decoded`, which
the strategy either streams into a shared accumulator (`accumulate`) or expands into a dense
update (`delta`). Every kind is registered with `register_codec(kind, decoder)`: the wire room's
own kinds in the table at the end of this file, a method's kind defined elsewhere by its own
module at import. The strategy never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import numpy as np

from fedbat_flwr.wire.binary import decode_binary_weights
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fedbif import decode_fedbif_bits
from fedbat_flwr.wire.fedpm import decode_fedpm
from fedbat_flwr.wire.fields import check_stat_steps, dense_by_accumulating
from fedbat_flwr.wire.kbit import accumulate_kbit, validate_kbit
from fedbat_flwr.wire.mixed import MixedPayload, accumulate_mixed, is_mixed, validate_mixed
from fedbat_flwr.wire.signs import SignsPayload, accumulate_sign_view, validate_signs
from fedbat_flwr.wire.sparse import accumulate_sparse, validate_sparse
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec


class Decoded(Protocol):
    """A validated reply payload, decodable into an update of every spec tensor.

    ``absolute`` is False for updates (the server applies the mean as ``w (+) mean``) and True
    for payloads that carry the client's weights themselves (dense FedAvg, BiFL): the weighted
    mean of those *is* the new model, and ``delta()`` returns the weights.
    """

    absolute: bool

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        """In place `acc[name] += weight * update[name]`."""

    def delta(self) -> dict[str, np.ndarray]:
        """The dense update (in each tensor's domain, see `ModelSpec.apply`); if absolute, the
        weights."""


Decoder = Callable[[Mapping[str, np.ndarray], ModelSpec, AlphaBounds], Decoded]
_DECODERS: dict[str, Decoder] = {}


def register_codec(kind: str, decoder: Decoder) -> None:
    if kind in _DECODERS:
        raise ValueError(f"payload kind {kind!r} is registered twice")
    _DECODERS[kind] = decoder


def payload_kinds() -> list[str]:
    return sorted(_DECODERS)


def decode_payload(
    kind: str, payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> Decoded:
    """Validate `payload` as `kind`; raises PayloadError naming the layer and field."""
    try:
        decoder = _DECODERS[kind]
    except KeyError:
        raise ValueError(f"payload kind {kind!r} is unknown; allowed: {payload_kinds()}") from None
    return decoder(payload, spec, bounds)


@dataclass(frozen=True)
class SignsDecoded:
    """1-bit payload: sign bits + alpha per binarized tensor (alphas checked against the kind's
    bounds); with ``bn-payload`` float16 / float32 the other tensors as float updates. Votes
    read ``view``; ``add`` is the view's accumulator."""

    view: SignsPayload | MixedPayload
    add: Callable[[MutableMapping[str, np.ndarray], Any, float], None]
    absolute: ClassVar[bool] = False

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        self.add(acc, self.view, weight)

    def delta(self) -> dict[str, np.ndarray]:
        return dense_by_accumulating(self.view.spec, self.accumulate)


def _decode_signs(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> SignsDecoded:
    """All tensors 1-bit, or (``bn-payload`` float16 / float32) BatchNorm as floats."""
    if is_mixed(payload):
        return SignsDecoded(validate_mixed(payload, spec, bounds), accumulate_mixed)
    return SignsDecoded(validate_signs(payload, spec, bounds), accumulate_sign_view)


@dataclass(frozen=True)
class DenseWeights:
    """Full float32 weights (FedAvg): validated, then averaged by Flower's own strategy."""

    weights: dict[str, np.ndarray]
    absolute: ClassVar[bool] = True

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        for name, value in self.weights.items():
            acc[name] += weight * value

    def delta(self) -> dict[str, np.ndarray]:
        return self.weights


def validate_dense(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> DenseWeights:
    """Every spec tensor, float32, of its shape, finite; nothing else."""
    extra = sorted(set(payload) - set(spec.names))
    if extra:
        raise PayloadError(
            extra[0], "keys", f"unexpected tensor (expected only {len(spec)} spec tensors)"
        )
    weights: dict[str, np.ndarray] = {}
    for t in spec:
        if t.name not in payload:
            raise PayloadError(t.name, "keys", "tensor is missing")
        value = np.asarray(payload[t.name])
        if value.dtype != np.float32:
            raise PayloadError(t.name, "dtype", f"dtype {value.dtype} is not allowed (float32)")
        if tuple(value.shape) != t.shape:
            raise PayloadError(
                t.name, "shape", f"shape {value.shape} is not the expected {t.shape}"
            )
        if not np.isfinite(value).all():
            raise PayloadError(t.name, "values", "non-finite values (allowed: finite float32)")
        if t.domain == "log" and value.size and value.min() <= 0:
            # The mean of positive variances stays positive; one client's 0 or -1 would not.
            reason = f"value={float(value.min())!r} (allowed: > 0 for a variance)"
            raise PayloadError(t.name, "values", reason)
        weights[t.name] = value
    return DenseWeights(weights)


@dataclass(frozen=True)
class UpdateDecoded:
    """An update payload (applied as ``w (+) delta``) known by how it adds itself to ``acc``."""

    spec: ModelSpec
    add: Callable[[MutableMapping[str, np.ndarray], float], None]
    absolute: ClassVar[bool] = False

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        self.add(acc, weight)

    def delta(self) -> dict[str, np.ndarray]:
        return dense_by_accumulating(self.spec, self.add)


def _decode_kbit(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> UpdateDecoded:
    """A k-bit update: |q| <= its tensor's scale, so the scale is what is bounded."""
    view = validate_kbit(payload, spec)
    check_stat_steps(spec, [s.reshape(1) for s in view.scales], bounds, "scales")
    return UpdateDecoded(spec, lambda acc, weight: accumulate_kbit(acc, view, weight))


def _decode_sparse(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> UpdateDecoded:
    """A sparse update: its kept values are the update, so they are what is bounded."""
    view = validate_sparse(payload, spec)
    check_stat_steps(spec, list(view.values), bounds, "values")
    return UpdateDecoded(spec, lambda acc, weight: accumulate_sparse(acc, view, weight))


def _decode_signs_unbounded(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> SignsDecoded:
    """Signs whose parameter alpha the client's data decides (EF-SignSGD: ||p||_1 / d).

    The run's [alpha-min, alpha-max] bounds FedBAT's learned alpha only; here a parameter alpha
    lies within [0, max-update-entry] (BatchNorm statistics keep the run's stat bounds).
    Fixed-step methods (SignSGD, Noisy-, Stoc-SignSGD) use ``signs`` with their exact alpha as
    both bounds (``Method.step_bounds``).
    """
    return _decode_signs(payload, spec, replace(bounds, param=(0.0, bounds.update)))


# Kinds whose Decoded has a sign `view` (a SignsPayload, or a MixedPayload whose BatchNorm part
# is float): what sign votes need.
SIGN_KINDS = ("signs", "signs-unbounded")

# Every kind the wire room defines, in one place. Each validates every field itself; the run's
# bounds (stat bound, max-update-entry) apply where a kind's steps come from the client's data.
# A method defined outside the wire room registers its own kind the same way, at import.
register_codec("signs", _decode_signs)
register_codec("signs-unbounded", _decode_signs_unbounded)
register_codec("dense", validate_dense)
register_codec("kbit", _decode_kbit)
register_codec("sparse", _decode_sparse)
register_codec("binary-weights", decode_binary_weights)
register_codec("fedbif-bits", decode_fedbif_bits)
register_codec("fedpm-mask", decode_fedpm)
