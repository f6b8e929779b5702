"""Checks every codec layout shares: field keys/dtypes/shapes, the versioned header, pad bits.

A layout is data (a ``{key: (dtype, ndim)}`` table); these helpers turn a violation into a
``PayloadError`` naming the field, the value found and what is allowed, so each codec's
``validate_*`` reads as a list of its own rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import numpy as np

from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec

MAGIC = b"FB"
FLOAT32_MAX = float(np.finfo(np.float32).max)

ANY_STEP = AlphaBounds(param=(0.0, FLOAT32_MAX), stat=(0.0, FLOAT32_MAX))
"""Bounds for sign payloads whose step sizes another rule already checked."""

Layout = Mapping[str, tuple[np.dtype | tuple[np.dtype, ...], int]]
"""Field key -> (exact dtype, or the dtypes a header chooses between; ndim)."""


def make_header(codec_id: int, version: int, *extra: int) -> np.ndarray:
    """``b"FB"``, codec id, layout version, then codec-specific bytes (e.g. bits per value)."""
    return np.frombuffer(MAGIC + bytes([codec_id, version, *extra]), dtype=np.uint8).copy()


def declared_codec(payload: object) -> int | None:
    """The codec id a payload's header declares, read only from a header of the layouts' type
    (uint8, 1-D); None otherwise, and ``check_fields`` then names what is wrong. For kinds
    that accept two layouts and pick one by the header."""
    header = payload.get("header") if isinstance(payload, Mapping) else None
    if isinstance(header, np.ndarray) and header.dtype == np.uint8 and header.ndim == 1:
        return int(header[2]) if header.size > 2 else None
    return None


def check_fields(payload: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Exactly the layout's keys, each a numpy array of its dtype and number of dimensions."""
    if not isinstance(payload, Mapping):
        raise PayloadError(None, "payload", f"type={type(payload).__name__} (allowed: mapping)")
    allowed = ", ".join(layout)
    for key in layout:
        if key not in payload:
            raise PayloadError(None, key, f"missing (required keys: {allowed})")
    for key in payload:
        if key not in layout:
            raise PayloadError(None, str(key), f"unexpected key (allowed keys: {allowed})")
    for key, (dtype, ndim) in layout.items():
        value = payload[key]
        if not isinstance(value, np.ndarray):
            raise PayloadError(None, key, f"type={type(value).__name__} (allowed: numpy.ndarray)")
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if value.dtype not in dtypes:
            allowed_dtypes = " or ".join(str(d) for d in dtypes)
            raise PayloadError(None, key, f"dtype={value.dtype} (allowed: {allowed_dtypes})")
        if value.ndim != ndim:
            reason = f"ndim={value.ndim}, shape={value.shape} (allowed: {ndim}-D)"
            raise PayloadError(None, key, reason)


def check_header(
    header: np.ndarray, codec_id: int, version: int, codec_name: str, length: int = 4
) -> None:
    """Length, magic, codec id and layout version of a header made by ``make_header``."""
    if header.size != length:
        raise PayloadError(None, "header", f"length={header.size} (allowed: {length})")
    magic = header[:2].tobytes()
    if magic != MAGIC:
        raise PayloadError(None, "header", f"magic={magic!r} (allowed: {MAGIC!r})")
    if int(header[2]) != codec_id:
        reason = f"codec id={int(header[2])} (allowed: {codec_id} = {codec_name})"
        raise PayloadError(None, "header", reason)
    if int(header[3]) != version:
        reason = f"layout version={int(header[3])} is not supported (supported: {version})"
        raise PayloadError(None, "header", reason)


def check_length(value: np.ndarray, expected: int, field: str, rule: str) -> None:
    if value.size != expected:
        raise PayloadError(None, field, f"length={value.size} (allowed: {expected} = {rule})")


def check_pad_bits(
    stream: np.ndarray, counts: Sequence[int], names: Sequence[str], field: str, bits: int = 1
) -> None:
    """Each tensor's entries start on a byte; the unused top bits of its last byte must be 0.

    ``counts[i]`` entries of ``bits`` bits each belong to ``names[i]``; ``stream`` holds the
    tensors' ``ceil(counts * bits / 8)`` bytes back to back (little bit order, as
    ``np.packbits`` and ``kbit.pack_uint`` write them). Every packed-bits codec checks its
    stream here, so a forged pad bit is named the same way whatever the codec.
    """
    sizes = np.asarray(counts, dtype=np.int64) * bits
    ends = np.cumsum((sizes + 7) // 8)
    partial = np.flatnonzero(sizes % 8)  # tensors whose last byte has pad bits
    used = sizes[partial] % 8
    last = stream[ends[partial] - 1].astype(np.int64)
    bad = np.flatnonzero(last & ((0xFF << used) & 0xFF))
    if bad.size:
        i, r = int(partial[bad[0]]), int(used[bad[0]])
        entries = f"d={int(counts[i])}" + (f" x {bits} bits use" if bits > 1 else " uses")
        reason = (
            f"pad bits of last byte=0x{int(last[bad[0]]):02x} are not zero "
            f"(allowed: {entries} the low {r} bits, the top {8 - r} must be 0)"
        )
        raise PayloadError(names[i], field, reason)


def check_nonnegative(values: np.ndarray, spec: ModelSpec, field: str, name: str) -> np.ndarray:
    """One finite value >= 0 per tensor of ``spec`` (a scale or a step: ``name``); returns a
    read-only private copy."""
    check_length(values, len(spec), field, "one per tensor")
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if bad.size:
        i = int(bad[0])
        reason = f"{name}={float(values[i])!r} (allowed: finite, >= 0)"
        raise PayloadError(spec.tensors[i].name, field, reason)
    return read_only_copy(values)


def read_only_copy(value: np.ndarray) -> np.ndarray:
    """A private, read-only copy: the payload can change after validation without harm."""
    out = value.copy()
    out.flags.writeable = False
    return out


def split_by(stream: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """``stream`` cut into consecutive pieces of ``lengths`` (which sum to its size)."""
    return np.split(stream, np.cumsum(np.asarray(lengths, dtype=np.int64))[:-1]) if lengths else []


def check_float_tensors(
    values: np.ndarray, spec: ModelSpec, field: str, *, weights: bool
) -> list[np.ndarray]:
    """``values`` (the spec's tensors flattened, spec order) cut per tensor, read-only pieces
    of a private copy in the payload's float dtype.

    Checked: the length, finite entries and, when they are weights rather than updates, a
    log-domain tensor (``running_var``) > 0: the mean of positive variances stays positive.
    """
    dtype = values.dtype.name
    check_length(values, spec.num_params, field, f"the sizes of the {dtype} tensors")
    pieces = split_by(read_only_copy(values), [t.size for t in spec])
    for t, v in zip(spec, pieces, strict=True):
        if not np.isfinite(v).all():
            raise PayloadError(t.name, field, f"non-finite values (allowed: finite {dtype})")
        if weights and t.domain == "log" and v.size and v.min() <= 0:
            reason = f"value={float(v.min())!r} (allowed: > 0 for a variance)"
            raise PayloadError(t.name, field, reason)
    return pieces


def flat_target(acc: MutableMapping[str, np.ndarray], t: TensorSpec) -> np.ndarray:
    """``acc[t.name]`` as a flat writable float32 view, or ValueError (a caller bug)."""
    if t.name not in acc:
        raise ValueError(f"acc: tensor {t.name!r} is missing")
    a = acc[t.name]
    usable = (
        isinstance(a, np.ndarray)
        and a.dtype == np.float32
        and a.shape in (t.shape, (t.size,))
        and a.flags.c_contiguous
        and a.flags.writeable
    )
    if not usable:
        found = f"{type(a).__name__} {getattr(a, 'dtype', '?')} {getattr(a, 'shape', '?')}"
        raise ValueError(
            f"acc[{t.name!r}] is {found} "
            f"(allowed: writable C-contiguous float32 of shape {t.shape} or ({t.size},))"
        )
    return a.reshape(-1)


def check_weight(weight: float) -> None:
    if not math.isfinite(weight):
        raise ValueError(f"weight={weight!r} is not finite (allowed: a finite float)")


def check_names(given: Mapping[str, object], spec: ModelSpec, field: str) -> None:
    """Encoder inputs name exactly the spec's tensors."""
    for t in spec:
        if t.name not in given:
            raise PayloadError(t.name, field, f"missing (the spec has {len(spec)} tensors)")
    expected = set(spec.names)
    for name in given:
        if name not in expected:
            raise PayloadError(name, field, "unexpected tensor (allowed: the spec's tensors)")


def dense_by_accumulating(
    spec: ModelSpec, accumulate: Callable[[MutableMapping[str, np.ndarray], float], None]
) -> dict[str, np.ndarray]:
    """The dense update an ``accumulate(acc, weight)`` adds: zeros per tensor, accumulated once.

    Every codec's ``delta()``: decoding stays the one code path the streaming server uses.
    """
    out = {t.name: np.zeros(t.shape, np.float32) for t in spec}
    accumulate(out, 1.0)
    return out


def check_stat_steps(
    spec: ModelSpec, steps: Sequence[np.ndarray], bounds: AlphaBounds, field: str
) -> None:
    """Every entry of an update is at most its bound in size: ``stat-alpha-max`` for a
    BatchNorm statistic, ``max-update-entry`` (``bounds.update``) for a parameter.

    k-bit and sparse updates carry raw values, so they are checked here (``steps[i]``: values
    whose sizes bound how far ``spec.tensors[i]`` moves). Without it one client could send a
    log-variance update of 1e30 (``w * exp(p * 1e30)`` overflows the global model to inf), or
    move any parameter by up to 3.4e38.
    """
    for t, step in zip(spec, steps, strict=True):
        stat = t.kind == "stat"
        hi = np.float32(bounds.stat[1] if stat else bounds.update)
        if step.size and np.abs(step).max() > hi:
            key = "stat-alpha-max" if stat else "max-update-entry"
            reason = (
                f"|update|={float(np.abs(step).max()):.7g} is out of range "
                f"(allowed: within [0, {float(hi):g}], the run's {key})"
            )
            raise PayloadError(t.name, field, reason)
