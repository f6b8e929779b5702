"""Aggregators: how a round's validated replies become the new global model.

The strategy (strategy.py) validates every reply, then hands the accepted ones to one
aggregator, chosen by the run config's `aggregator` (`make_aggregator`):

| name | aggregator | replies |
|------|------------|---------|
| `fedavg` | `StreamedMean` (Eq. 11: w + sum_k p_k decoded_k) | any compressed kind, one at a time |
| `fedavg` | Flower's `FedAvg` | dense weights (FedAvg, BiFL-full): Flower averages them |
| `majority` | `SignVote` with `wire.votes.majority_vote` | sign kinds only |
| `sign-median` | `SignVote` with `wire.votes.sign_median` | sign kinds only |
| `fedadam`, `fedyogi` | Flower's FedAdam / FedYogi (`FedOptAggregator`) | "w + update_k" |
| `fedmedian`, `fedtrimmedavg`, `krum` | Flower's strategy (`FlowerAggregator`) | "w + update_k" |

A method whose server aggregates in its own way (FedBiF, FedPM) replaces the run's aggregator
with `OwnAggregator` (its `ServerPart.aggregator`). Flower's strategies are used by composition:
each gets Messages it can read and no Flower code is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from .broadcast import Broadcast
from .config import ConfigError
from .keys import ARRAYS_KEY, METRICS_KEY
from .records import arrays_to_record, record_to_arrays
from .wire import SIGN_KINDS, Decoded, ModelSpec, majority_vote
from .wire.votes import sign_median

Arrays = dict[str, np.ndarray]
Result = tuple[ArrayRecord | None, MetricRecord | None]


@dataclass(frozen=True)
class Accepted:
    """One validated reply: its weight, its wire size and its decoding (None once dropped by a
    streaming aggregator, which decodes the reply's record again when it adds it)."""

    message: Message
    num_examples: int
    nbytes: int
    decoded: Decoded | None
    # The validated scalar metrics, `num-examples` set to the weight actually used.
    metrics: Mapping[str, int | float] = field(default_factory=dict)

    @property
    def record(self) -> ArrayRecord:
        return self.message.content[ARRAYS_KEY]


@dataclass(frozen=True)
class Replies:
    """A round's accepted replies and their aggregated metrics (shared keys, weighted)."""

    accepted: list[Accepted]
    metrics: MetricRecord

    def pairs(self) -> list[tuple[int, Decoded]]:
        """(num_examples, decoded) of every reply (for aggregators that keep them decoded)."""
        return [(a.num_examples, cast(Decoded, a.decoded)) for a in self.accepted]

    def sign_views(self) -> list[Any]:
        """The sign view of every reply (sign kinds only, which `make_aggregator` ensures)."""
        return [cast(Any, a.decoded).view for a in self.accepted]


class Aggregator:
    """Turns the accepted replies into the new global arrays, given the master they update."""

    # True: each reply is dropped once validated and decoded again when added (memory O(model)).
    streams: ClassVar[bool] = False

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        raise NotImplementedError

    def state(self) -> Arrays:
        """What a checkpoint must keep of this aggregator (FedOpt's moments)."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state)}")


class StreamedMean(Aggregator):
    """Eq. 11: w + sum_k (n_k / sum n) * decoded_k, one accumulator for all replies.

    Each reply is decoded again here (validation is cheap next to holding K decoded payloads),
    added, and dropped before the next one. Replies that carry weights (BiFL) average into the
    model itself, rebased onto the master (`Broadcast.rebase`).
    """

    streams = True

    def __init__(
        self, spec: ModelSpec, broadcast: Broadcast, decode: Callable[[ArrayRecord], Decoded]
    ) -> None:
        self.spec, self.broadcast, self.decode = spec, broadcast, decode

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        acc = {t.name: np.zeros(t.shape, dtype=np.float32) for t in self.spec}
        total = float(sum(a.num_examples for a in replies.accepted))
        absolute = False
        for a in replies.accepted:
            decoded = a.decoded or self.decode(a.record)
            decoded.accumulate(acc, a.num_examples / total)
            absolute = bool(getattr(decoded, "absolute", False))
        if absolute:  # replies carry weights (BiFL): the mean is the model
            return arrays_to_record(self.broadcast.rebase(acc, master)), replies.metrics
        return arrays_to_record(self.spec.apply(master, acc)), replies.metrics


class SignVote(Aggregator):
    """w (+) vote(sign replies): unweighted, one voice per client whatever its `num-examples`.

    `vote` is `wire.votes.majority_vote` (median_k(alpha_kl) * sign(sum_k sign_k); ties leave a
    coordinate unchanged) or `wire.votes.sign_median` (coordinate-wise median of alpha_k *
    sign_k, robust to a minority flipping signs *and* inflating alpha or `num-examples`; the
    same median as Flower's `fedmedian` on these replies, straight from the packed bits).
    Tensors every reply sends as floats (BatchNorm by default) take their coordinate-wise median.
    """

    def __init__(self, spec: ModelSpec, vote: Callable[[ModelSpec, Sequence[Any]], Arrays]) -> None:
        self.spec = spec
        self.vote = vote

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        delta = self.vote(self.spec, replies.sign_views())
        return arrays_to_record(self.spec.apply(master, delta)), replies.metrics


class FlowerAggregator(Aggregator):
    """One of Flower's strategies, on the weights each reply implies: dense replies as their
    validated weights, updates as ``master (+) update_k``, weights rebased onto the master."""

    def __init__(self, flower: FedAvg, spec: ModelSpec, broadcast: Broadcast) -> None:
        self.flower, self.spec, self.broadcast = flower, spec, broadcast

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        messages = [_dense_message(a, self._implied(master, a)) for a in replies.accepted]
        return self.flower.aggregate_train(server_round, messages)

    def _implied(self, master: Arrays, a: Accepted) -> Arrays:
        """The client's weights this reply implies: its own (rebased) or master (+) update."""
        decoded: Any = a.decoded
        if decoded.absolute:
            return self.broadcast.rebase(decoded.delta(), master)
        return self.spec.apply(master, decoded.delta())


def _dense_message(a: Accepted, weights: Arrays) -> Message:
    """A reply Flower can average: `weights` and the reply's validated (capped) metrics."""
    content = RecordDict(
        {ARRAYS_KEY: arrays_to_record(weights), METRICS_KEY: MetricRecord(dict(a.metrics))}
    )
    return Message(content=content, metadata=a.message.metadata)


class FedOptAggregator(FlowerAggregator):
    """Flower's FedAdam / FedYogi on the trainable parameters only; its moments `m_t` / `v_t`
    are checkpointed.

    The master is the model its server optimizer steps from. BatchNorm running statistics are
    statistics, not parameters: an Adam step would move a variance by eta whatever its scale
    (and below zero), so they take the weighted mean of the clients' implied statistics, which
    stays positive.
    """

    flower: FedOpt

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        trainable = [t.name for t in self.spec if t.kind != "stat"]
        self.flower.current_arrays = {k: master[k] for k in trainable}
        implied = [(a, self._implied(master, a)) for a in replies.accepted]
        messages = [_dense_message(a, {k: w[k] for k in trainable}) for a, w in implied]
        stepped, metrics = self.flower.aggregate_train(server_round, messages)
        if stepped is None:
            return None, metrics
        total = float(sum(a.num_examples for a in replies.accepted))
        statistics = {
            t.name: sum((a.num_examples / total) * w[t.name] for a, w in implied)
            for t in self.spec
            if t.kind == "stat"
        }
        return arrays_to_record({**record_to_arrays(stepped), **statistics}), metrics

    def state(self) -> Arrays:
        state: Arrays = {}
        for attr in ("m_t", "v_t"):
            for name, value in (getattr(self.flower, attr) or {}).items():
                state[f"{attr}/{name}"] = np.asarray(value)
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        groups: dict[str, Arrays] = {}
        for key, value in state.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = np.array(value)
        if set(groups) - {"m_t", "v_t"}:
            raise ValueError(f"FedOpt state {sorted(groups)} is not m_t / v_t")
        for attr, values in groups.items():
            setattr(self.flower, attr, values)


class OwnAggregator(Aggregator):
    """A method's own aggregation of the decoded replies (FedBiF Eq. 6, FedPM's posteriors)."""

    def __init__(
        self, combine: Callable[[Arrays, Sequence[tuple[int, Decoded]], int], Arrays]
    ) -> None:
        self.combine = combine

    def aggregate(self, master: Arrays, replies: Replies, server_round: int) -> Result:
        return arrays_to_record(self.combine(master, replies.pairs(), server_round)), (
            replies.metrics
        )


FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}
# Aggregators that only exist for sign payloads (robust sign aggregation).
SIGN_VOTES: dict[str, Callable[[ModelSpec, Sequence[Any]], Arrays]] = {
    "majority": majority_vote,
    "sign-median": sign_median,
}
SIGN_AGGREGATORS = tuple(SIGN_VOTES)
AGGREGATORS = ("fedavg", *FLOWER_STRATEGIES, *SIGN_AGGREGATORS)


def check_aggregator(name: str, *, payload_kind: str, method: str | None = None) -> None:
    """A ConfigError naming the `aggregator` value and what is allowed for this payload kind."""
    if name not in AGGREGATORS:
        allowed = ", ".join(repr(a) for a in AGGREGATORS)
        raise ConfigError(f"run-config 'aggregator' = {name!r} is not allowed; allowed: {allowed}")
    if name in SIGN_AGGREGATORS and payload_kind not in SIGN_KINDS:
        raise ConfigError(
            f"run-config 'aggregator' = {name!r} votes on sign payloads and "
            f"{f'method {method!r}' if method else 'the method'} sends {payload_kind!r}; allowed: "
            + ", ".join(repr(a) for a in AGGREGATORS if a not in SIGN_AGGREGATORS)
        )


def make_aggregator(
    name: str,
    *,
    spec: ModelSpec,
    payload_kind: str,
    broadcast: Broadcast,
    decode: Callable[[ArrayRecord], Decoded],
    **flower_kwargs: Any,
) -> Aggregator:
    """The aggregator the run config's `aggregator` names (`check_aggregator` first)."""
    check_aggregator(name, payload_kind=payload_kind)
    if name in SIGN_VOTES:
        return SignVote(spec, SIGN_VOTES[name])
    if name == "fedavg" and payload_kind != "dense":
        return StreamedMean(spec, broadcast, decode)
    if name == "fedavg":
        return FlowerAggregator(FedAvg(**flower_kwargs), spec, broadcast)
    flower = FLOWER_STRATEGIES[name](**flower_kwargs)
    wrapper = FedOptAggregator if isinstance(flower, FedOpt) else FlowerAggregator
    return wrapper(flower, spec, broadcast)
