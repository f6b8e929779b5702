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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedbat_flwr.wire.signs import SignsPayload, accumulate_signs
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec


def majority_vote(spec: ModelSpec, views: Sequence[SignsPayload]) -> dict[str, np.ndarray]:
    """The update ``median_k(alpha_kl) * sign(sum_k sign_k)`` of every tensor (float32)."""
    if not views:
        raise ValueError("majority_vote needs at least one payload")
    votes = {t.name: np.zeros(t.shape, np.float32) for t in spec}
    ones = np.ones(len(spec), np.float32)
    for view in views:
        unit = SignsPayload(view.spec, view.packed, ones)  # the same bits, alpha = 1
        accumulate_signs(votes, unit, spec, AlphaBounds(), 1.0)
    alphas = np.median(np.stack([view.alphas.astype(np.float64) for view in views]), axis=0)
    return {
        t.name: (np.float32(a) * np.sign(votes[t.name])).astype(np.float32)
        for t, a in zip(spec, alphas, strict=True)
    }


def sign_median(spec: ModelSpec, views: Sequence[SignsPayload]) -> dict[str, np.ndarray]:
    """The coordinate-wise median of ``alpha_kl * (±1)`` over payloads (float32, spec shapes).

    Vectorised per tensor: the K packed bit rows are unpacked into a (K, d) uint8 array, turned
    into ``±alpha_k`` with one ``np.where`` and reduced with ``np.median`` (mean of the two middle
    values for an even K), in float64 so that two middle values near float32's maximum do not
    overflow. For a log-domain tensor this is the median in the log domain, which
    ``ModelSpec.apply`` maps to the median of the implied variances (``exp`` is monotonic).
    """
    if not views:
        raise ValueError("sign_median needs at least one payload")
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(spec):
        bits = np.stack(
            [np.unpackbits(v.packed[i], count=t.size, bitorder="little") for v in views]
        )
        alpha = np.array([v.alphas[i] for v in views], dtype=np.float64)[:, None]
        steps = np.where(bits.astype(bool), alpha, -alpha)
        out[t.name] = np.median(steps, axis=0).astype(np.float32).reshape(t.shape)
    return out
