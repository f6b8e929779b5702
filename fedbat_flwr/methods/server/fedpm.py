"""FedPM's server: Beta posteriors over the masks, theta down, masks aggregated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...server_part import OwnServerPart, expect, weights_of
from ...wire import Decoded, ModelSpec
from ...wire.fedpm import (
    FedPMDecoded,
    FedPMProbs,
    encode_fedpm_probs,
    fedpm_groups,
    validate_fedpm_probs,
)
from ..fedpm import check_theta_rule, posterior_theta


class FedPMPart(OwnServerPart):
    """Beta posteriors per masked entry; the global arrays hold theta (masked tensors: the
    posterior's mode or mean, `fedpm-theta`), the running statistics and the frozen tensors."""

    def __init__(
        self,
        spec: ModelSpec,
        reference: Mapping[str, np.ndarray],
        prior_reset: int,
        *,
        seed: int,
        prior: float = 1.0,
        theta: str = "mode",
    ) -> None:
        super().__init__(spec)
        self.theta_rule = check_theta_rule(theta)
        self.masked, self.stats = fedpm_groups(spec)
        self.reference = reference
        self.prior_reset, self.prior = prior_reset, prior
        self.a = {t.name: np.full(t.shape, prior, np.float32) for t in self.masked}
        self.b = {t.name: np.full(t.shape, prior, np.float32) for t in self.masked}
        rng = np.random.default_rng([seed, 0xF3D])  # the run's fixed uniforms for evaluation
        self.uniforms = {t.name: rng.random(t.shape, dtype=np.float32) for t in self.masked}
        self.sent: FedPMProbs | None = None  # this round's downlink, as its clients read it

    def initial(self, model_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """theta = 1/2 everywhere; everything else from the reference network."""
        out = {t.name: np.array(self.reference[t.name], np.float32) for t in self.spec}
        out.update({t.name: np.full(t.shape, 0.5, np.float32) for t in self.masked})
        return out

    def payload(
        self, global_arrays: Mapping[str, np.ndarray], server_round: int
    ) -> dict[str, np.ndarray]:
        """theta as float16 and the running statistics: what every client starts from."""
        payload, self.sent = self._downlink_of(global_arrays)
        return payload

    def _downlink_of(
        self, global_arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], FedPMProbs]:
        """The downlink payload of ``global_arrays``, and the same as its clients read it."""
        theta = {t.name: global_arrays[t.name] for t in self.masked}
        stats = {t.name: global_arrays[t.name] for t in self.stats}
        payload = encode_fedpm_probs(self.spec, theta, stats)
        return payload, validate_fedpm_probs(payload, self.spec)

    def check(self, decoded: Decoded, server_round: int) -> None:
        """A fedpm-mask reply whose masks decode (against the theta sent, if so coded)."""
        expect(isinstance(decoded, FedPMDecoded), "payload", "not a fedpm-mask payload")
        if decoded.needs_theta:  # type: ignore[attr-defined]
            if self.sent is None:
                raise RuntimeError("FedPM: a reply came before any downlink was built")
            decoded.resolved(self.sent.theta)  # type: ignore[attr-defined]

    def aggregate(
        self,
        global_arrays: Mapping[str, np.ndarray],
        accepted: Sequence[tuple[int, Decoded]],
        server_round: int,
    ) -> dict[str, np.ndarray]:
        if (server_round - 1) % self.prior_reset == 0:
            self.reset_prior()
        ones = {t.name: np.zeros(t.shape, np.float32) for t in self.masked}
        _, sent = self._downlink_of(global_arrays)  # what these clients started from
        for _, decoded in accepted:
            decoded.resolved(sent.theta).add_masks(ones, 1.0)  # type: ignore[attr-defined]
        new = dict(global_arrays)
        for t in self.masked:
            self.a[t.name] += ones[t.name]
            self.b[t.name] += len(accepted) - ones[t.name]
            new[t.name] = posterior_theta(self.a[t.name], self.b[t.name], self.theta_rule)
        acc = {t.name: np.zeros(t.shape, np.float32) for t in self.stats}
        for weight, (_, decoded) in zip(weights_of(accepted), accepted, strict=True):
            decoded.add_stats(acc, weight)  # type: ignore[attr-defined]
        stat_spec = self.stats
        new.update(stat_spec.apply(sent.stats, acc))
        return {k: np.asarray(v, np.float32) for k, v in new.items()}

    def reset_prior(self) -> None:
        for t in self.masked:
            self.a[t.name].fill(self.prior)
            self.b[t.name].fill(self.prior)

    def eval_mask(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: self.uniforms[t.name] < global_arrays[t.name] for t in self.masked}

    def eval_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``w_init * m`` for masked tensors, the statistics, the frozen reference tensors."""
        out = {t.name: np.asarray(global_arrays[t.name], np.float32) for t in self.spec}
        for name, mask in self.eval_mask(global_arrays).items():
            out[name] = self.reference[name] * mask
        return out

    def eval_metrics(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        masks = self.eval_mask(global_arrays).values()
        zeros = sum(int(m.size - m.sum()) for m in masks)
        return {"model_sparsity": zeros / max(self.masked.num_params, 1)}

    def state(self) -> dict[str, np.ndarray]:
        return {
            **{f"beta-a/{k}": v for k, v in self.a.items()},
            **{f"beta-b/{k}": v for k, v in self.b.items()},
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            raise ValueError(f"FedPM state keys {sorted(state)} are not {sorted(expected)}")
        for t in self.masked:
            for prefix, target in (("beta-a/", self.a), ("beta-b/", self.b)):
                value = np.asarray(state[prefix + t.name], np.float32)
                if value.shape != t.shape:
                    raise ValueError(f"{prefix}{t.name}: shape {value.shape} (allowed: {t.shape})")
                target[t.name] = value.copy()
