"""Robust aggregation of sign payloads: a weighted majority vote per coordinate.

signSGD with majority vote (Bernstein et al., 2019): the server keeps only the sign of the
(example-weighted) vote ``v = sum_k n_k sign_k`` and steps by the mean alpha of the tensor,
``delta_l = alpha_l * sign(v_l)`` with ``alpha_l = sum_k n_k alpha_kl / sum_k n_k``; a tied
coordinate (v = 0) does not move. One bad client can flip no more than its own vote.

Votes use the fused sign accumulator with alpha = 1 and *integer* weights, so the float32 sums
are exact and ties are exact zeros (weights are rescaled to integers summing to about 2^23
when the example counts are larger than that).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedbat_flwr.wire.signs import SignsPayload, accumulate_signs
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec

EXACT_TOTAL = 1 << 23  # integer vote sums up to 2^24 are exact in float32


def majority_vote(
    spec: ModelSpec, views: Sequence[SignsPayload], num_examples: Sequence[int]
) -> dict[str, np.ndarray]:
    """The update ``alpha_l * sign(sum_k n_k sign_k)`` of every tensor (float32, spec shapes)."""
    if not views or len(views) != len(num_examples):
        raise ValueError(
            f"{len(views)} payloads for {len(num_examples)} weights (need >= 1, equal)"
        )
    n = np.asarray(num_examples, dtype=np.float64)
    if not (np.isfinite(n).all() and (n > 0).all()):
        raise ValueError(f"num_examples={list(num_examples)} (allowed: positive numbers)")
    votes = {t.name: np.zeros(t.shape, np.float32) for t in spec}
    ones = np.ones(len(spec), np.float32)
    for view, weight in zip(views, _integer_weights(n), strict=True):
        unit = SignsPayload(view.spec, view.packed, ones)  # the same bits, alpha = 1
        accumulate_signs(votes, unit, spec, AlphaBounds(), weight)
    alphas = np.stack([view.alphas.astype(np.float64) for view in views])  # (K, L)
    mean_alpha = (n @ alphas) / n.sum()
    return {
        t.name: (np.float32(a) * np.sign(votes[t.name])).astype(np.float32)
        for t, a in zip(spec, mean_alpha, strict=True)
    }


def _integer_weights(n: np.ndarray) -> list[float]:
    """``n`` itself when small enough to sum exactly, else rescaled and rounded (>= 1 each)."""
    scale = min(1.0, EXACT_TOTAL / float(n.sum()))
    return [float(max(1.0, round(x * scale))) for x in n]
