"""FedPM wire formats: mask probabilities down, one sampled binary mask per client up.

FedPM (Isik et al., ICLR 2023) freezes the weights at a seeded random initialisation and trains a
Bernoulli mask over them. Tensors fall in three groups (all from the server's spec):

- masked: conv / linear weights (``is_binarized``): theta down, a sampled mask up;
- statistics: BatchNorm running statistics, re-estimated by every client's forward passes:
  float16 down, one sign bit + one step up (as every 1-bit method here sends them);
- frozen: every other parameter (BatchNorm affine, 1-D biases) stays at its initialisation on
  both sides and never travels.

Downlink (codec id 18, version 1):

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (4,)   ``b"FB"``, 18, version 1
theta    float16 (M,)   masked tensors' probabilities, flattened, spec order; in [0, 1]
stats    float16 (S,)   the statistics (``wire.half``)
======== ======= ====== ================================================================

Uplink, packed (codec id 19, version 1) -- ``mask`` is 1 bit per masked entry:

======== ======= ====== ================================================================
header   uint8   (4,)   ``b"FB"``, 19, version 1
masks    uint8   (B,)   per masked tensor ``np.packbits(mask, bitorder="little")``, byte-
                        aligned per tensor, pad bits 0
signs    uint8   (S,)   statistics' update signs, exactly as ``signs.py``
alphas   float32 (Ls,)  one step per statistic: mean |update|, within the stat bounds
======== ======= ====== ================================================================

Uplink, range-coded (codec id 20, version 1) -- below 1 bit per entry when masks are sparse.
Each masked tensor's mask is coded as i.i.d. Bernoulli(p) with ``p = ones / d`` (its own
frequency of ones, so the cost is ~ d * H(p) bits + <= 64 bits of termination) by
``constriction``'s range coder (queue semantics, ``Bernoulli(p, perfect=False)``):

======== ======= ======= ===============================================================
header   uint8   (4,)    ``b"FB"``, 20, version 1
counts   uint32  (2, Lm) row 0: ones per masked tensor (<= d); row 1: 32-bit words of its
                         code (0 when the mask is constant, <= d/32 + 16 otherwise)
code     uint32  (W,)    the tensors' codes back to back; W = sum(row 1)
signs    uint8   (S,)    as in the packed layout
alphas   float32 (Ls,)   as in the packed layout
======== ======= ======= ===============================================================

Uplink, range-coded against theta (codec id 21, version 1) -- the fields of codec 20, but each
entry is coded as Bernoulli(theta_i), theta being the probabilities of this round's downlink
(both sides hold them: the client trained from them, the server sent them), clipped into
[THETA_CLIP, 1 - THETA_CLIP] so a surprise costs at most 10 bits. The cost is the mask's
cross-entropy against theta: ~0 bits where the clients agree (theta at 0 or 1) and ~H(theta_i)
elsewhere, so a mask costs what is new in it rather than H(density). Row 1 of ``counts`` is
<= d * 10 / 32 + 16 words; FedPM's client sends the packed layout instead when that is
smaller. Decoding needs theta, so the wire checks the layout (`validate_fedpm_coded`) and the
server part decodes (`FedPMDecoded.resolved(theta)`) before it counts the reply.

A code that does not decode, or decodes to a mask with another number of ones, is rejected.
The decoded "update" of a masked tensor is the mask itself (0/1), of a statistic
``alpha * (±1)``: only the FedPM server rule combines them (Beta counts, averaged stats).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedbat_flwr.wire.binary import is_binarized
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    check_fields,
    check_header,
    check_length,
    check_names,
    check_weight,
    declared_codec,
    dense_by_accumulating,
    flat_target,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.half import encode_half, validate_half
from fedbat_flwr.wire.kbit import check_packed
from fedbat_flwr.wire.signs import (
    SignsPayload,
    accumulate_sign_view,
    encode_sign_part,
    validate_sign_part,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec

FEDPM_PROBS_ID = 18
FEDPM_MASK_ID = 19
FEDPM_CODED_ID = 20
FEDPM_THETA_CODED_ID = 21
FEDPM_VERSION = 1
SLACK_WORDS = 16  # code words allowed beyond d/32 (termination + probability rounding)
THETA_CLIP = 2.0**-10  # codec 21's probabilities lie in [clip, 1 - clip]: <= 10 bits a surprise
THETA_MAX_BITS = 10  # = -log2(THETA_CLIP), the most one entry can cost under codec 21
CODINGS = ("packed", "density", "theta")  # uplink layouts: codec 19, 20, 21
_U8, _U32 = np.dtype(np.uint8), np.dtype(np.uint32)
PROBS_LAYOUT = {
    "header": (_U8, 1),
    "theta": (np.dtype(np.float16), 1),
    "stats": (np.dtype(np.float16), 1),
}
MASK_LAYOUT = {
    "header": (_U8, 1),
    "masks": (_U8, 1),
    "signs": (_U8, 1),
    "alphas": (np.dtype(np.float32), 1),
}
CODED_LAYOUT = {
    "header": (_U8, 1),
    "counts": (_U32, 2),
    "code": (_U32, 1),
    "signs": (_U8, 1),
    "alphas": (np.dtype(np.float32), 1),
}


def fedpm_groups(spec: ModelSpec) -> tuple[ModelSpec, ModelSpec]:
    """(masked tensors, statistics), each in spec order; the rest is frozen."""
    return (
        ModelSpec(tuple(t for t in spec if is_binarized(t))),
        ModelSpec(tuple(t for t in spec if t.kind == "stat")),
    )


# --- downlink -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FedPMProbs:
    """A validated downlink: theta per masked tensor, the statistics (float32, spec shapes)."""

    spec: ModelSpec
    theta: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]


def encode_fedpm_probs(
    spec: ModelSpec, theta: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """theta of every masked tensor and the statistics, as float16."""
    masked, stat_spec = fedpm_groups(spec)
    check_names(theta, masked, "theta")
    probs = encode_half(masked, theta)
    if probs.size and not (probs.min() >= 0 and probs.max() <= 1):
        raise PayloadError(None, "theta", "probabilities must lie in [0, 1]")
    stat_values = encode_half(stat_spec, stats)
    return {
        "header": make_header(FEDPM_PROBS_ID, FEDPM_VERSION),
        "theta": probs,
        "stats": stat_values,
    }


def validate_fedpm_probs(payload: Mapping[str, np.ndarray], spec: ModelSpec) -> FedPMProbs:
    """Check every field of a downlink against ``spec``; raise PayloadError if bad."""
    check_fields(payload, PROBS_LAYOUT)
    check_header(payload["header"], FEDPM_PROBS_ID, FEDPM_VERSION, "fedpm probabilities")
    masked, stat_spec = fedpm_groups(spec)
    theta = validate_half(payload["theta"], masked, "theta")
    for name, value in theta.items():
        if value.size and not (value.min() >= 0 and value.max() <= 1):
            raise PayloadError(name, "theta", "probabilities outside [0, 1]")
    return FedPMProbs(spec, theta, validate_half(payload["stats"], stat_spec, "stats"))


# --- uplink -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FedPMMask:
    """A validated uplink: each masked tensor's packed mask, the statistics' signs view."""

    spec: ModelSpec
    masks: dict[str, np.ndarray]
    signs: SignsPayload

    def mask(self, name: str) -> np.ndarray:
        """One tensor's mask, flat bool."""
        packed = self.masks[name]
        return np.unpackbits(packed, count=self.spec[name].size, bitorder="little").view(bool)


def encode_fedpm_mask(
    spec: ModelSpec,
    masks: Mapping[str, np.ndarray],
    signs: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    *,
    coding: str = "packed",
    theta: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A client's sampled masks (bool, tensor shapes) and its statistics' 1-bit updates.

    ``coding`` picks the layout: "packed" (1 bit an entry), "density" (range-coded under each
    tensor's own frequency of ones) or "theta" (range-coded against the received ``theta``).
    """
    if coding not in CODINGS:
        raise ValueError(f"coding={coding!r} is not allowed; allowed: {', '.join(CODINGS)}")
    masked, stat_spec = fedpm_groups(spec)
    check_names(masks, masked, "masks")
    flat = []
    for t in masked:
        m = np.asarray(masks[t.name])
        if m.shape != t.shape or m.dtype != np.bool_:
            raise PayloadError(
                t.name, "masks", f"shape={m.shape}, dtype={m.dtype} (allowed: bool {t.shape})"
            )
        flat.append(m.reshape(-1))
    tail = encode_sign_part(stat_spec, signs, alphas)
    if coding == "packed":
        packed = [np.packbits(m, bitorder="little") for m in flat]
        masks_bytes = np.concatenate([np.zeros(0, np.uint8), *packed])
        return {"header": make_header(FEDPM_MASK_ID, FEDPM_VERSION), "masks": masks_bytes, **tail}
    ones = [int(m.sum()) for m in flat]
    if coding == "density":
        codec_id = FEDPM_CODED_ID
        codes = [range_encode(m, k) for m, k in zip(flat, ones, strict=True)]
    else:
        if theta is None:
            raise ValueError("coding='theta' needs the received theta")
        check_names(theta, masked, "theta")
        codec_id = FEDPM_THETA_CODED_ID
        codes = [theta_encode(m, theta[t.name]) for t, m in zip(masked, flat, strict=True)]
    return {
        "header": make_header(codec_id, FEDPM_VERSION),
        "counts": np.array([ones, [c.size for c in codes]], dtype=np.uint32).reshape(2, len(flat)),
        "code": np.concatenate([np.zeros(0, np.uint32), *codes]),
        **tail,
    }


def validate_fedpm_mask(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> FedPMMask:
    """Check every field of a packed uplink against ``spec``; raise PayloadError if bad."""
    check_fields(payload, MASK_LAYOUT)
    check_header(payload["header"], FEDPM_MASK_ID, FEDPM_VERSION, "fedpm mask")
    masked, _ = fedpm_groups(spec)
    pieces = check_packed(payload["masks"], masked, 1, "masks")
    masks = {t.name: p for t, p in zip(masked, pieces, strict=True)}
    return FedPMMask(spec, masks, _validate_stats(payload, spec, bounds))


@dataclass(frozen=True, eq=False)
class FedPMThetaCoded:
    """A structurally valid codec-21 uplink: each masked tensor's ones and code, undecoded until
    the server supplies the theta it sent (`decode`)."""

    spec: ModelSpec
    ones: dict[str, int]
    codes: dict[str, np.ndarray]
    signs: SignsPayload

    def decode(self, theta: Mapping[str, np.ndarray]) -> FedPMMask:
        """The masks, decoded against ``theta``; PayloadError if a code is not a mask's."""
        masks = {}
        for name, words in self.codes.items():
            size = self.spec[name].size
            mask = theta_decode(words, self.ones[name], np.reshape(theta[name], size), name)
            masks[name] = read_only_copy(np.packbits(mask, bitorder="little"))
        return FedPMMask(self.spec, masks, self.signs)


def validate_fedpm_coded(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> FedPMMask | FedPMThetaCoded:
    """Check a range-coded uplink (codec 20 or 21) and decode it if it can be decoded alone
    (codec 20); raise PayloadError if bad."""
    check_fields(payload, CODED_LAYOUT)
    against_theta = declared_codec(payload) == FEDPM_THETA_CODED_ID
    codec_id = FEDPM_THETA_CODED_ID if against_theta else FEDPM_CODED_ID
    check_header(payload["header"], codec_id, FEDPM_VERSION, "fedpm coded mask")
    masked, _ = fedpm_groups(spec)
    counts = payload["counts"]
    if counts.shape != (2, len(masked)):
        raise PayloadError(None, "counts", f"shape={counts.shape} (allowed: (2, {len(masked)}))")
    ones, words = counts[0].astype(np.int64), counts[1].astype(np.int64)
    for t, k, w in zip(masked, ones, words, strict=True):
        _check_counts(t.name, t.size, int(k), int(w), against_theta)
    code = payload["code"]
    check_length(code, int(words.sum()), "code", "the sum of counts[1]")
    pieces = split_by(code, words.tolist())
    signs = _validate_stats(payload, spec, bounds)
    if against_theta:
        return FedPMThetaCoded(
            spec,
            {t.name: int(k) for t, k in zip(masked, ones, strict=True)},
            {t.name: read_only_copy(p) for t, p in zip(masked, pieces, strict=True)},
            signs,
        )
    masks = {}
    for t, k, piece in zip(masked, ones, pieces, strict=True):
        mask = range_decode(piece, int(k), t.size, t.name)
        masks[t.name] = read_only_copy(np.packbits(mask, bitorder="little"))
    return FedPMMask(spec, masks, signs)


def _check_counts(name: str, size: int, ones: int, words: int, against_theta: bool) -> None:
    if ones > size:
        raise PayloadError(name, "counts", f"ones={ones} (allowed: <= d = {size})")
    if against_theta:
        limit = -(-size * THETA_MAX_BITS // 32) + SLACK_WORDS
        rule = f"<= d * {THETA_MAX_BITS} / 32 + {SLACK_WORDS} = {limit}"
    else:
        constant = ones in (0, size)
        limit = 0 if constant else size // 32 + SLACK_WORDS
        rule = "0 for a constant mask" if constant else f"<= d/32 + {SLACK_WORDS} = {limit}"
    if words > limit:
        raise PayloadError(name, "counts", f"code words={words} (allowed: {rule})")


def _validate_stats(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> SignsPayload:
    _, stat_spec = fedpm_groups(spec)
    return validate_sign_part(payload["signs"], payload["alphas"], stat_spec, bounds)


# --- the range coder ----------------------------------------------------------------------


def _bernoulli(ones: int, size: int) -> object:
    import constriction  # a compiled dependency, only needed for coded masks

    return constriction.stream.model.Bernoulli(ones / size, perfect=False)


def range_encode(mask: np.ndarray, ones: int) -> np.ndarray:
    """A flat bool mask as range-coder words under i.i.d. Bernoulli(ones / d); empty if the
    mask is constant (its count says it all)."""
    if ones in (0, mask.size):
        return np.zeros(0, np.uint32)
    return _encode(mask, _bernoulli(ones, mask.size))


def range_decode(words: np.ndarray, ones: int, size: int, name: str) -> np.ndarray:
    """The flat bool mask ``range_encode`` coded; PayloadError if the words are not one."""
    if ones in (0, size):
        return np.full(size, ones == size, dtype=bool)
    return _decode(words, ones, name, _bernoulli(ones, size), size)


def _theta_model(theta: np.ndarray) -> np.ndarray:
    """codec 21's per-entry probabilities of a one: theta (float32 as received), clipped."""
    flat = np.asarray(theta, np.float64).reshape(-1)
    return np.clip(flat, THETA_CLIP, 1.0 - THETA_CLIP)


def theta_encode(mask: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """A flat bool mask as range-coder words, entry i coded as Bernoulli(theta_i)."""
    import constriction

    return _encode(mask, constriction.stream.model.Bernoulli(perfect=False), _theta_model(theta))


def theta_decode(words: np.ndarray, ones: int, theta: np.ndarray, name: str) -> np.ndarray:
    """The flat bool mask ``theta_encode`` coded; PayloadError if the words are not one."""
    import constriction

    model = constriction.stream.model.Bernoulli(perfect=False)
    return _decode(words, ones, name, model, _theta_model(theta))


def _encode(mask: np.ndarray, *model: object) -> np.ndarray:
    import constriction  # a compiled dependency, only needed for coded masks

    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(mask.astype(np.int32), *model)
    return np.asarray(encoder.get_compressed(), dtype=np.uint32)


def _decode(words: np.ndarray, ones: int, name: str, *model: object) -> np.ndarray:
    """``decoder.decode(*model)`` as a bool mask of ``ones`` ones, or a PayloadError."""
    import constriction

    try:
        decoder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, np.uint32))
        mask = np.asarray(decoder.decode(*model)).astype(bool)
    except Exception as exc:  # constriction reports invalid data as AssertionError
        raise PayloadError(name, "code", f"not a valid range code: {exc}") from None
    if int(mask.sum()) != ones:
        raise PayloadError(name, "code", f"decodes to {int(mask.sum())} ones (counts say {ones})")
    return mask


# --- the Decoded --------------------------------------------------------------------------


@dataclass(frozen=True)
class FedPMDecoded:
    """The wire ``Decoded`` of an uplink (see the module docstring for what the update is).

    A codec-21 reply holds its masks coded against theta: ``resolved(theta)`` decodes them, and
    only a resolved reply adds itself to an accumulator.
    """

    view: FedPMMask | FedPMThetaCoded
    absolute: ClassVar[bool] = False

    @property
    def needs_theta(self) -> bool:
        return not isinstance(self.view, FedPMMask)

    def resolved(self, theta: Mapping[str, np.ndarray]) -> FedPMDecoded:
        """This reply with its masks decoded against ``theta`` (PayloadError if they do not
        decode); itself if its masks travelled decodable alone."""
        if isinstance(self.view, FedPMMask):
            return self
        return FedPMDecoded(self.view.decode(theta))

    def _masks(self) -> FedPMMask:
        if not isinstance(self.view, FedPMMask):
            raise ValueError("masks coded against theta: call resolved(theta) first")
        return self.view

    def add_masks(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        """In place ``acc[name] += weight * mask`` for every masked tensor."""
        check_weight(weight)
        w = np.float32(weight)
        view = self._masks()
        for name in view.masks:
            flat_target(acc, view.spec[name])[:] += w * view.mask(name)

    def add_stats(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        """In place ``acc[name] += weight * alpha * (±1)`` for every statistic."""
        accumulate_sign_view(acc, self.view.signs, weight)

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        self.add_masks(acc, weight)
        self.add_stats(acc, weight)

    def delta(self) -> dict[str, np.ndarray]:
        return dense_by_accumulating(self.view.spec, self.accumulate)  # frozen tensors stay 0


def decode_fedpm(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> FedPMDecoded:
    """The ``fedpm-mask`` kind (registered in ``codecs.py``): any uplink layout, told apart by
    the header's codec id (the coding is a client-side choice; the server reads all three)."""
    view = (
        validate_fedpm_coded(payload, spec, bounds)
        if declared_codec(payload) in (FEDPM_CODED_ID, FEDPM_THETA_CODED_ID)
        else validate_fedpm_mask(payload, spec, bounds)
    )
    return FedPMDecoded(view)
