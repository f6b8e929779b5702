"""Robust aggregation of sign payloads: a majority vote, or the median, per coordinate.

signSGD with majority vote (Bernstein et al., 2019): every client casts one vote per coordinate
(example counts are ignored, so claiming more examples buys nothing) and the server keeps only
the sign of ``v = sum_k sign_k``, stepping by the median of the clients' alphas for the tensor:
``delta_l = median_k(alpha_kl) * sign(v_l)``; a tied coordinate (v = 0) does not move. One bad
client can flip no more than its own vote, and cannot inflate the step while honest clients
are a majority. Votes use the fused sign accumulator with alpha = 1 and weight 1, so the float32
sums are exact integers and ties are exact zeros.

The coordinate-wise median (`sign_median`) of the decoded updates ``alpha_kl * sign_k`` bounds
both what a client's bit and its alpha can do: while honest clients are a majority, every
coordinate's step lies within the range of honest steps. It ignores example counts (as Flower's
FedMedian does). Memory: the K decoded copies of one tensor at a time, ``K * max_l d_l``
float64 (the model's largest tensor, not the whole model).

Tensors that travel as floats (BatchNorm with ``bn-payload`` float16 / float32, `mixed.py`) have
no bits to vote with: both rules take their coordinate-wise median, which bounds them the same
way. A tensor gets a vote only where every reply sends it as signs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedbat_flwr.wire.mixed import MixedPayload
from fedbat_flwr.wire.signs import SignsPayload, accumulate_signs
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec

SignView = SignsPayload | MixedPayload


def majority_vote(spec: ModelSpec, views: Sequence[SignView]) -> dict[str, np.ndarray]:
    """The update ``median_k(alpha_kl) * sign(sum_k sign_k)`` of every tensor sent as signs by
    every reply, the coordinate-wise median of the others (float32)."""
    if not views:
        raise ValueError("majority_vote needs at least one payload")
    signed = [_signs_part(view) for view in views]
    voted = set.intersection(*(set(s.spec.names) for s in signed))
    votes = {t.name: np.zeros(t.shape, np.float32) for t in spec}
    alphas: dict[str, list[float]] = {name: [] for name in voted}
    for signs in signed:
        unit = SignsPayload(signs.spec, signs.packed, np.ones(len(signs.spec), np.float32))
        accumulate_signs(votes, unit, signs.spec, AlphaBounds(), 1.0)  # the same bits, alpha 1
        for name, alpha in zip(signs.spec.names, signs.alphas, strict=True):
            if name in voted:
                alphas[name].append(float(alpha))
    out = {
        t.name: (np.float32(np.median(alphas[t.name])) * np.sign(votes[t.name])).astype(np.float32)
        for t in spec
        if t.name in voted
    }
    rest = ModelSpec(tuple(t for t in spec if t.name not in voted))
    return out | sign_median(rest, views)


def sign_median(spec: ModelSpec, views: Sequence[SignView]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of the decoded updates over payloads (float32, spec shapes).

    Vectorised per tensor: the K rows (a sign tensor's packed bits unpacked and turned into
    ``±alpha_k`` with one ``np.where``, a float tensor as sent) are stacked into a (K, d) array
    and reduced with ``np.median`` (mean of the two middle values for an even K), in float64 so
    that two middle values near float32's maximum do not overflow. For a log-domain tensor this
    is the median in the log domain, which ``ModelSpec.apply`` maps to the median of the implied
    variances (``exp`` is monotonic).
    """
    if not views:
        raise ValueError("sign_median needs at least one payload")
    out: dict[str, np.ndarray] = {}
    for t in spec:
        steps = np.stack([_steps(view, t) for view in views])
        out[t.name] = np.median(steps, axis=0).astype(np.float32).reshape(t.shape)
    return out


def _signs_part(view: SignView) -> SignsPayload:
    return view.signs if isinstance(view, MixedPayload) else view


def _steps(view: SignView, t: TensorSpec) -> np.ndarray:
    """One reply's update of tensor ``t``, flat float64: ``±alpha`` from its bits, or its floats."""
    signs = _signs_part(view)
    if t.name not in signs.spec.names:
        return np.asarray(view.dense[t.name], np.float64)  # type: ignore[union-attr]
    i = signs.spec.names.index(t.name)
    bits = np.unpackbits(signs.packed[i], count=t.size, bitorder="little").astype(bool)
    alpha = np.float64(signs.alphas[i])
    return np.where(bits, alpha, -alpha)
