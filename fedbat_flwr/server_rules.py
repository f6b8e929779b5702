"""Server rules: what a method's server does when it is more than "decode + average updates".

Most methods send the dense global model down and let the strategy average decoded replies.
A few need their own server side:

- the downlink is not the dense model (FedBiF sends m-bit integers, FedPM mask probabilities);
- the server keeps a state that is not the model's weights (FedPM: probabilities theta and
  Beta posteriors; the evaluated model is w_init * mask);
- the aggregation is not a weighted mean of updates (FedBiF Eq. 6, FedPM's Bayesian update).

Such a method returns a `ServerRule` from `Method.server_rule(config, spec)`; the strategy then
sends `downlink(...)` (packed as a raw payload, its wire bytes are the counted downlink), hands
the validated replies to `aggregate(...)` and evaluates `eval_arrays(...)`. The client side
turns the payload back into a model with `Method.receive`. This module is glue-neutral: numpy
only, no torch, no flwr, so a rule is tested without either.

"Global arrays" are whatever the rule keeps between rounds, one array per spec name (FedBiF: the
model weights; FedPM: theta for masked tensors, weights for the rest). The `ModelSpec` stays
the model's, so replies are validated against the model's shapes.

What the server *tests* is an `Evaluation` (every `ServerRule` is one). A method whose server
averages plain weights but whose clients run a different network on them returns an
`Evaluation` from `Method.evaluation(config, spec)` without a rule: BiFL's clients compute with
alpha * sign(w), so its server scores that binary network (`BinaryNetworkEvaluation`) and the
latent float weights only beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .config import ConfigError, RunConfig
from .wire import Decoded, ModelSpec, PayloadError, is_binarized

Arrays = dict[str, np.ndarray]


class Evaluation:
    """What the server tests out of the global arrays; by default they are the model as it is."""

    def eval_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The model weights (every spec tensor) the server evaluates and saves."""
        return dict(global_arrays)

    def eval_metrics(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Extra numbers about the evaluated model for the round's results row (e.g. sparsity)."""
        return {}

    def side_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, Arrays]:
        """Other readings of the same global arrays, scored beside the evaluated model: name ->
        weights; the round's row gets ``test_accuracy_<name>`` and ``test_loss_<name>``."""
        return {}


class BinaryNetworkEvaluation(Evaluation):
    """The binary network BiFL's clients compute with: every binarized tensor (conv / linear
    weight, `wire.is_binarized`) as alpha * sign(w) with alpha = mean |w| (XNOR-Net, as the
    clients' `SignSTE` forward pass); BatchNorm and biases as they are. The global arrays
    themselves (the averaged latent weights, a float model) are scored beside it as ``latent``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def eval_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        return binary_network(self.spec, global_arrays)

    def side_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, Arrays]:
        return {"latent": dict(global_arrays)}


def binary_network(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> Arrays:
    """alpha * sign(w), alpha = mean |w|, for binarized tensors (sign(0) = +1, as the clients'
    forward pass); every other tensor unchanged."""
    out = dict(weights)
    for t in spec:
        if is_binarized(t):
            w = np.asarray(weights[t.name], np.float32)
            alpha = np.float32(np.abs(w).mean(dtype=np.float64)) if w.size else np.float32(0)
            out[t.name] = np.where(w >= 0, alpha, -alpha).astype(np.float32)
    return out


class ServerRule(Evaluation):
    """A method's server side. Subclasses implement `downlink` and `aggregate`."""

    def initial(self, model_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The global arrays before round 1, from the freshly built model's state."""
        return dict(model_arrays)

    def downlink(self, global_arrays: Mapping[str, np.ndarray], server_round: int) -> Arrays:
        """The wire payload every sampled client receives this round."""
        raise NotImplementedError

    def check(self, decoded: Decoded, server_round: int) -> None:
        """Reject (PayloadError) a reply that is valid on its own but not for this round."""

    def aggregate(
        self,
        global_arrays: Mapping[str, np.ndarray],
        accepted: Sequence[tuple[int, Decoded]],
        server_round: int,
    ) -> Arrays:
        """The new global arrays from the accepted replies (num_examples, decoded payload)."""
        raise NotImplementedError

    def state(self) -> Arrays:
        """What a checkpoint must keep besides the global arrays (e.g. Beta posteriors)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state()` from a checkpoint."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state)}")


def require_fedavg(config: RunConfig) -> None:
    """A rule replaces the strategy's aggregation, so no other aggregator can be combined."""
    if config.aggregator != "fedavg":
        raise ConfigError(
            f"run-config 'aggregator' = {config.aggregator!r} is not allowed with method "
            f"{config.method!r}, which aggregates with its own server rule; allowed: 'fedavg'"
        )


def expect(condition: bool, field: str, reason: str) -> None:
    """PayloadError(None, field, reason) unless ``condition`` (for `ServerRule.check`)."""
    if not condition:
        raise PayloadError(None, field, reason)


def weights_of(accepted: Sequence[tuple[int, Decoded]]) -> list[float]:
    """Example weights p_k = n_k / sum n of the accepted replies."""
    total = float(sum(n for n, _ in accepted))
    return [n / total for n, _ in accepted]
