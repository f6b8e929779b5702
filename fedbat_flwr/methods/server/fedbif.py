"""FedBiF's server: the m-bit downlink (Eq. 5) and bit aggregation (Eq. 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...server_part import OwnServerPart, expect, weights_of
from ...wire import Decoded, ModelSpec
from ...wire.binary import split_spec
from ...wire.fedbif import (
    FedBiFBitsDecoded,
    bit_planes,
    encode_fedbif_model,
    quantize_eq5,
    validate_fedbif_model,
)
from ..fedbif import active_bits


class FedBiFPart(OwnServerPart):
    """Quantized downlink (Eq. 5) and bit aggregation (Eq. 6); the global arrays are weights."""

    def __init__(self, spec: ModelSpec, bits: int, count: int, selector: str, *, seed: int) -> None:
        super().__init__(spec)
        self.bits, self.count, self.selector, self.seed = bits, count, selector, seed

    def active(self, server_round: int) -> tuple[int, ...]:
        return active_bits(self.selector, self.bits, self.count, self.seed, server_round)

    def payload(
        self, global_arrays: Mapping[str, np.ndarray], server_round: int
    ) -> dict[str, np.ndarray]:
        """Eq. 5 per weight tensor, with a generator seeded by (seed, round): `aggregate`
        recomputes exactly what the clients received."""
        rng = np.random.default_rng([self.seed, server_round])
        quantized, others = split_spec(self.spec)
        codes, alphas = {}, {}
        for t in quantized:
            codes[t.name], alphas[t.name] = quantize_eq5(global_arrays[t.name], self.bits, rng)
        dense = {t.name: global_arrays[t.name] for t in others}
        return encode_fedbif_model(self.spec, codes, alphas, dense, self.bits)

    def check(self, decoded: Decoded, server_round: int) -> None:
        expect(isinstance(decoded, FedBiFBitsDecoded), "payload", "not a fedbif-bits payload")
        view = decoded.view  # type: ignore[attr-defined]
        expect(view.bits == self.bits, "header", f"bits={view.bits} (this run: {self.bits})")
        expected = self.active(server_round)
        reason = f"active bits {list(view.active)} (round {server_round} trains {list(expected)})"
        expect(view.active == expected, "header", reason)

    def aggregate(
        self,
        global_arrays: Mapping[str, np.ndarray],
        accepted: Sequence[tuple[int, Decoded]],
        server_round: int,
    ) -> dict[str, np.ndarray]:
        sent = validate_fedbif_model(self.payload(global_arrays, server_round), self.spec)
        acc = {t.name: np.zeros(t.shape, np.float32) for t in self.spec}
        weights = weights_of(accepted)
        for weight, (_, decoded) in zip(weights, accepted, strict=True):
            decoded.accumulate(acc, weight)
        for name in sent.codes:  # exact where all clients agree: a pruned weight stays 0.0
            acc[name] = mean_active_value(name, weights, accepted).reshape(acc[name].shape)
        frozen = [i for i in range(self.bits) if i not in self.active(server_round)]
        half = float(1 << (self.bits - 1))
        new = {}
        for t in self.spec:
            if t.name in sent.codes:
                planes = bit_planes(sent.codes[t.name], self.bits)
                kept = sum(
                    (float(1 << j) * planes[j] for j in frozen), np.zeros(t.shape, np.float32)
                )
                new[t.name] = np.float32(sent.alphas[t.name]) * (acc[t.name] + kept - half)
            elif t.domain == "log":
                new[t.name] = sent.dense[t.name] * np.exp(acc[t.name])
            else:
                new[t.name] = sent.dense[t.name] + acc[t.name]
        return {k: v.astype(np.float32) for k, v in new.items()}

    def eval_metrics(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Fraction of exactly-zero weights (q = 0 at every client: pruned, paper Sec. 4.4)."""
        quantized, _ = split_spec(self.spec)
        zeros = sum(int((global_arrays[t.name] == 0).sum()) for t in quantized)
        return {"model_sparsity": zeros / max(quantized.num_params, 1)}


def mean_active_value(
    name: str, weights: Sequence[float], accepted: Sequence[tuple[int, Decoded]]
) -> np.ndarray:
    """``sum_k p_k sum_{i in S} 2^i b_ik`` of one tensor (flat), summed in float64 and rounded
    once, so that clients that agree give an exact integer (float32 sums of p_k = 0.1 do not)."""
    views = [decoded.view for _, decoded in accepted]  # type: ignore[attr-defined]
    total = np.zeros(views[0].spec[name].size, np.float64)
    for weight, view in zip(weights, views, strict=True):
        total += weight * view.active_value(name).astype(np.float64)
    return total.astype(np.float32)
