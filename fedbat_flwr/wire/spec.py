"""What the server expects on the wire: tensor names, shapes, kinds and update domains.

Shapes and order always come from the server's ``ModelSpec``, never from a payload, so a client
cannot make the server allocate or reshape anything it did not plan for.

Update domains (docs/ARCHITECTURE.md, "What travels"):

- ``"linear"``: ``delta = new - old``, applied as ``w + delta``.
- ``"log"`` (BatchNorm ``running_var``): ``delta = log(new) - log(old)``, applied as
  ``w * exp(delta)``, so an aggregated variance stays positive whatever the signs say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

Kind = Literal["param", "stat"]
Domain = Literal["linear", "log"]
_KINDS = ("param", "stat")
_DOMAINS = ("linear", "log")


@dataclass(frozen=True)
class TensorSpec:
    """One exchanged tensor: its state_dict name, shape, kind and update domain."""

    name: str
    shape: tuple[int, ...]
    kind: Kind = "param"
    domain: Domain = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name={self.name!r} is invalid (allowed: non-empty str)")
        shape = tuple(self.shape)
        if not all(isinstance(s, (int, np.integer)) and s >= 0 for s in shape):
            raise ValueError(
                f"tensor {self.name!r}: shape={shape!r} is invalid (allowed: non-negative ints)"
            )
        # Normalise torch.Size / numpy ints so equal specs compare and hash equal.
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        if self.kind not in _KINDS:
            raise ValueError(f"tensor {self.name!r}: kind={self.kind!r} (allowed: {_KINDS})")
        if self.domain not in _DOMAINS:
            raise ValueError(f"tensor {self.name!r}: domain={self.domain!r} (allowed: {_DOMAINS})")

    @property
    def size(self) -> int:
        """Number of elements (1 for a scalar, 0 for an empty tensor)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """The ordered tensors exchanged each round (state_dict order)."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        seen: set[str] = set()
        for t in self.tensors:
            if not isinstance(t, TensorSpec):
                raise ValueError(f"spec entry {t!r} is not a TensorSpec")
            if t.name in seen:
                raise ValueError(f"tensor name {t.name!r} appears twice (allowed: unique names)")
            seen.add(t.name)

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, np.ndarray],
        stat_suffixes: tuple[str, ...] = ("running_mean", "running_var"),
    ) -> ModelSpec:
        """Build a spec from a name->array mapping, keeping its order.

        Names ending with one of ``stat_suffixes`` are ``kind="stat"``; names ending with
        ``running_var`` use the ``"log"`` domain. The caller filters out what does not travel
        (e.g. ``num_batches_tracked``).
        """
        tensors = []
        for name, array in arrays.items():
            kind: Kind = "stat" if name.endswith(tuple(stat_suffixes)) else "param"
            domain: Domain = "log" if name.endswith("running_var") else "linear"
            tensors.append(TensorSpec(name, tuple(np.shape(array)), kind, domain))
        return cls(tuple(tensors))

    @cached_property
    def _by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def num_params(self) -> int:
        """Total number of exchanged elements (parameters and statistics)."""
        return sum(t.size for t in self.tensors)

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in the model spec") from None

    def delta(
        self, new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The float32 update from ``old`` to ``new`` of every spec tensor, in its domain.

        Extra keys in the inputs (e.g. ``num_batches_tracked``) are ignored.
        """
        out = {}
        for t in self.tensors:
            a, b = _get(new, t, "new"), _get(old, t, "old")
            if t.domain == "log":
                d = np.log(_positive(a, t, "new")) - np.log(_positive(b, t, "old"))
            else:
                d = a - b
            out[t.name] = d.astype(np.float32, copy=False)
        return out

    def apply(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """New float32 weights ``w (+) delta`` of every spec tensor; the inputs are untouched."""
        out = {}
        for t in self.tensors:
            w = _get(weights, t, "weights").astype(np.float32, copy=False)
            d = _get(delta, t, "delta").astype(np.float32, copy=False)
            out[t.name] = w * np.exp(d) if t.domain == "log" else w + d
        return out


def _get(arrays: Mapping[str, np.ndarray], t: TensorSpec, role: str) -> np.ndarray:
    """``arrays[t.name]`` as an ndarray of exactly the spec's shape."""
    if t.name not in arrays:
        raise ValueError(f"{role}: tensor {t.name!r} is missing (spec has {t.shape})")
    a = np.asarray(arrays[t.name])
    if a.shape != t.shape:
        raise ValueError(f"{role}: tensor {t.name!r} has shape={a.shape} (allowed: {t.shape})")
    return a


def _positive(a: np.ndarray, t: TensorSpec, role: str) -> np.ndarray:
    """Reject values the log domain cannot represent (variance must stay > 0)."""
    if a.size and not (np.all(a > 0) and np.all(np.isfinite(a))):
        bad = a.reshape(-1)[~((a > 0) & np.isfinite(a)).reshape(-1)][0]
        raise ValueError(
            f"{role}: tensor {t.name!r} (log domain) has value={float(bad)!r} "
            "(allowed: finite, > 0)"
        )
    return a


@dataclass(frozen=True)
class AlphaBounds:
    """Allowed alpha range per tensor kind: ``[lo, hi]``, inclusive, and the per-entry cap
    ``update`` of parameter steps whose size the client's data decides.

    Trainable parameters use the method's [alpha-min, alpha-max] (FedBAT's learned alpha; a
    fixed-step method's exact alpha); BN running statistics get their alpha from mean|delta|
    and use the wider ``stat`` range. ``update`` (run-config ``max-update-entry``) bounds what
    no rule fixes: EF-SignSGD's alpha, FedPAQ's scale, top-k's kept values, FedBiF's
    full-precision parameters.
    """

    param: tuple[float, float] = (5e-4, 5e-2)
    stat: tuple[float, float] = (0.0, 20.0)  # the run defaults (config.RunConfig)
    update: float = 5.0

    def __post_init__(self) -> None:
        for kind in _KINDS:
            object.__setattr__(self, kind, _checked_range(kind, getattr(self, kind)))
        object.__setattr__(self, "update", _checked_range("update", (0.0, self.update))[1])

    def for_tensor(self, t: TensorSpec) -> tuple[float, float]:
        return self.stat if t.kind == "stat" else self.param


def _checked_range(kind: str, bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"alpha bounds {kind}={bounds!r} (allowed: a pair (lo, hi))") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"alpha bounds {kind}=({lo!r}, {hi!r}) are not finite")
    if lo < 0:
        raise ValueError(f"alpha bounds {kind}: lo={lo!r} (allowed: lo >= 0)")
    if lo > hi:
        raise ValueError(f"alpha bounds {kind}: lo={lo!r} > hi={hi!r} (allowed: lo <= hi)")
    return (lo, hi)
