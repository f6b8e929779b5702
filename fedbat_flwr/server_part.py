"""A method's server part: what the server sends, how it aggregates, what it evaluates and keeps.

Every method has one (`Method.server_part`). Ordinary methods share the default `ServerPart`:

- downlink: the global model, dense float32 or its quantized copy (`downlink-bits`,
  `broadcast.Broadcast`);
- aggregation: the run's `aggregator` over the decoded replies (the mean of updates by default,
  `aggregators.py`);
- evaluation: the global weights as they are; no state beyond them.

A method overrides what its server does differently:

- BiFL's clients compute with alpha * sign(w), so its server evaluates that binary network
  (`BinaryNetworkPart`) and scores the latent float weights beside it;
- FedBiF sends m-bit integers and aggregates bits (Eq. 6); FedPM sends mask probabilities,
  keeps Beta posteriors (its state) and evaluates ``w_init * mask`` (methods/fedbif.py,
  methods/fedpm.py). Their "global arrays" are whatever they keep between rounds, one array
  per spec name (FedBiF: the weights; FedPM: theta for masked tensors); the `ModelSpec` stays
  the model's, so replies are validated against the model's shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from flwr.app import ArrayRecord

from .broadcast import Broadcast
from .records import arrays_to_record, payload_to_record
from .wire import Decoded, ModelSpec, PayloadError, is_binarized

if TYPE_CHECKING:  # the aggregators (flwr.serverapp) load only where a server runs
    from .aggregators import Aggregator

Arrays = dict[str, np.ndarray]


class ServerPart:
    """The default server side: broadcast the model, aggregate with the run's aggregator,
    evaluate the weights as they are, keep no state."""

    # True: after each round, the clients that trained measure the BatchNorm statistics of the
    # network the server evaluates, on their own data, and the server pools them
    # (`fit_statistics`; Flower's federated-evaluation step, strategy.py).
    refits_statistics: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, broadcast: Broadcast | None = None) -> None:
        self.spec = spec
        self.broadcast = broadcast or Broadcast(spec, bits=32, seed=0)

    def initial(self, model_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The global arrays before round 1, from the freshly built model's state."""
        return dict(model_arrays)

    def downlink(self, global_arrays: Mapping[str, np.ndarray], server_round: int) -> ArrayRecord:
        """What every sampled client receives this round; its wire bytes are the counted
        downlink. Default: the model, or its quantized broadcast (`downlink-bits`)."""
        return self.broadcast.encode(global_arrays, server_round) or arrays_to_record(global_arrays)

    def check(self, decoded: Decoded, server_round: int) -> None:
        """Reject (PayloadError) a reply that is valid on its own but not for this round."""

    def aggregator(self, configured: Aggregator) -> Aggregator:
        """How the accepted replies are aggregated: the run's `aggregator` by default."""
        return configured

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

    def fit_statistics(self, statistics: Mapping[str, np.ndarray]) -> None:
        """Pooled BatchNorm statistics of the evaluated network (parts that refit them)."""
        raise NotImplementedError(f"{type(self).__name__} does not refit statistics")

    def state(self) -> Arrays:
        """What a checkpoint must keep besides the global arrays (e.g. Beta posteriors)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state()` from a checkpoint."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state)}")


class OwnServerPart(ServerPart):
    """A server part with its own downlink payload and its own aggregation (FedBiF, FedPM):
    subclasses implement `payload` and `aggregate`."""

    def downlink(self, global_arrays: Mapping[str, np.ndarray], server_round: int) -> ArrayRecord:
        """`payload`, packed raw: its wire bytes are the counted downlink."""
        return payload_to_record(self.payload(global_arrays, server_round))

    def aggregator(self, configured: Aggregator) -> Aggregator:
        """`aggregate` instead of the run's aggregator (such methods require `fedavg`)."""
        from .aggregators import OwnAggregator

        return OwnAggregator(self.aggregate)

    def payload(
        self, global_arrays: Mapping[str, np.ndarray], server_round: int
    ) -> dict[str, np.ndarray]:
        """The wire payload every sampled client receives this round."""
        raise NotImplementedError

    def aggregate(
        self,
        global_arrays: Mapping[str, np.ndarray],
        accepted: Sequence[tuple[int, Decoded]],
        server_round: int,
    ) -> Arrays:
        """The new global arrays from the accepted replies (num_examples, decoded payload)."""
        raise NotImplementedError


class BinaryNetworkPart(ServerPart):
    """The binary network BiFL's clients compute with: every binarized tensor (conv / linear
    weight, `wire.is_binarized`) as alpha * sign(w) with alpha = mean |w| (XNOR-Net, as the
    clients' `SignSTE` forward pass); BatchNorm affine parameters and biases as they are.

    BatchNorm statistics must fit the averaged binary network, not the clients' own networks
    whose statistics the replies carry: the clients measure them on the evaluated network
    (`refits_statistics`) and the pooled ones replace the averaged ones. The global arrays
    themselves (the averaged latent weights, a float model) are scored beside it as ``latent``.
    """

    refits_statistics = True

    def __init__(self, spec: ModelSpec, broadcast: Broadcast | None = None) -> None:
        super().__init__(spec, broadcast)
        self.statistics: Arrays = {}  # pooled by `fit_statistics` for the latest global arrays

    def fit_statistics(self, statistics: Mapping[str, np.ndarray]) -> None:
        """The BatchNorm statistics the clients measured on this round's evaluated network."""
        self.statistics = dict(statistics)

    def eval_arrays(self, global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        return {**binary_network(self.spec, global_arrays), **self.statistics}

    def state(self) -> Arrays:
        return {f"statistics/{k}": v for k, v in self.statistics.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.statistics = {k.removeprefix("statistics/"): np.array(v) for k, v in state.items()}

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


def expect(condition: bool, field: str, reason: str) -> None:
    """PayloadError(None, field, reason) unless ``condition`` (for `ServerPart.check`)."""
    if not condition:
        raise PayloadError(None, field, reason)


def weights_of(accepted: Sequence[tuple[int, Decoded]]) -> list[float]:
    """Example weights p_k = n_k / sum n of the accepted replies."""
    total = float(sum(n for n, _ in accepted))
    return [n / total for n, _ in accepted]
