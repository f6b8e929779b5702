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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .config import ConfigError, RunConfig
from .wire import Decoded, PayloadError

Arrays = dict[str, np.ndarray]


class ServerRule:
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

    def eval_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The model weights (every spec tensor) the server evaluates and saves."""
        return dict(global_arrays)

    def eval_metrics(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Extra numbers about the evaluated model for the round's results row (e.g. sparsity)."""
        return {}

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
