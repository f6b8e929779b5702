"""Flower message strategies that decode compressed replies before aggregating them.

`UplinkMixin` sits in front of any Flower message strategy (FedAvg, FedAdam, FedMedian, Krum,
...): it validates and decodes every reply with the wire codec of the method's payload kind, drops
the bad ones, and then either

- streams the decoded updates into one accumulator (FedAvg over compressed updates, Eq. 11:
  w <- w + sum_k p_k alpha_k sign_k; memory O(model), whatever the number of replies), or
- hands Flower's strategy dense "w + update_k" replies, so its own aggregation rule applies
  unchanged (no Flower code is copied).

Dense payloads (FedAvg) skip decoding and go to Flower's own aggregation after validation.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from .records import arrays_to_record, record_to_arrays, record_to_payload, wire_bytes
from .wire import SIGN_KINDS, AlphaBounds, ModelSpec, PayloadError, decode_payload, majority_vote

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"

AGGREGATORS: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


@dataclass
class RoundStats:
    """What the results writer records about one round's uplink and downlink."""

    started: float = field(default_factory=time.monotonic)
    downlink_bytes: int = 0
    num_sent: int = 0
    uplink_bytes: int = 0
    uplink_bits_per_param: float = 0.0
    num_replies: int = 0
    num_rejected: int = 0
    model_updated: bool = False
    train_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """One validated reply: its weight, its wire size and (for compressed kinds) its decoding."""

    message: Message
    num_examples: int
    nbytes: int
    decoded: object | None  # a wire `Decoded`, None for dense payloads


class UplinkMixin:
    """Validate + decode replies of one payload kind in front of a Flower message strategy."""

    # True only where the strategy's own rule is FedAvg's weighted mean, which can be streamed.
    stream_mean: bool = False

    def __init__(
        self,
        *,
        spec: ModelSpec,
        payload_kind: str,
        bounds: AlphaBounds,
        max_num_examples: int,
        **strategy_kwargs: object,
    ) -> None:
        super().__init__(**strategy_kwargs)  # type: ignore[call-arg]
        self.spec = spec
        self.payload_kind = payload_kind
        self.bounds = bounds
        self.max_num_examples = max_num_examples
        self.global_arrays: dict[str, np.ndarray] = {}
        self.rounds: dict[int, RoundStats] = {}

    # -- training round ----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies are updates of, and count the downlink."""
        stats = RoundStats()
        self.rounds[server_round] = stats
        self.global_arrays = record_to_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        stats.num_sent = len(messages)
        stats.downlink_bytes = wire_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        accepted = [a for a in (self._accept(msg) for msg in replies) if a is not None]
        stats.num_replies = len(accepted)
        stats.num_rejected = len(replies) - len(accepted)
        stats.uplink_bytes = sum(a.nbytes for a in accepted)
        if accepted:
            stats.uplink_bits_per_param = float(
                np.mean([8 * a.nbytes / self.spec.num_params for a in accepted])
            )
        if len(accepted) < max(1, self.min_train_nodes):  # type: ignore[attr-defined]
            log(
                WARNING,
                "round %d: %d valid replies, fewer than the minimum %d: keeping the previous model",
                server_round,
                len(accepted),
                self.min_train_nodes,  # type: ignore[attr-defined]
            )
            return None, None
        arrays, metrics = self._aggregate(server_round, accepted)
        stats.model_updated = arrays is not None
        stats.train_metrics = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _aggregate(
        self, server_round: int, accepted: list[Accepted]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.stream_mean and self.payload_kind != "dense":
            return self._stream_mean(accepted), self._metrics(accepted)
        messages = [self._as_dense(a) for a in accepted]
        return super().aggregate_train(server_round, messages)  # type: ignore[misc]

    def _stream_mean(self, accepted: list[Accepted]) -> ArrayRecord:
        """Eq. 11: w + sum_k (n_k / sum n) * decoded_k, one accumulator for all replies."""
        acc = {t.name: np.zeros(t.shape, dtype=np.float32) for t in self.spec}
        total = float(sum(a.num_examples for a in accepted))
        for a in accepted:
            a.decoded.accumulate(acc, a.num_examples / total)  # type: ignore[union-attr]
        if getattr(accepted[0].decoded, "absolute", False):  # weights (BiFL): the mean is the model
            return arrays_to_record(acc)
        return arrays_to_record(self.spec.apply(self.global_arrays, acc))

    def _as_dense(self, a: Accepted) -> Message:
        """A reply Flower's strategies can average: the client's implied weights, capped weight."""
        if a.decoded is None:
            arrays = a.message.content[ARRAYS_KEY]
        elif getattr(a.decoded, "absolute", False):
            arrays = arrays_to_record(a.decoded.delta())  # type: ignore[union-attr]
        else:
            new = self.spec.apply(self.global_arrays, a.decoded.delta())  # type: ignore[union-attr]
            arrays = arrays_to_record(new)
        metrics = MetricRecord(dict(a.message.content[METRICS_KEY]))
        metrics[NUM_EXAMPLES_KEY] = a.num_examples
        content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics})
        return Message(content=content, metadata=a.message.metadata)

    def _metrics(self, accepted: list[Accepted]) -> MetricRecord:
        contents = [self._as_metrics_only(a) for a in accepted]
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]

    @staticmethod
    def _as_metrics_only(a: Accepted) -> RecordDict:
        metrics = MetricRecord(dict(a.message.content[METRICS_KEY]))
        metrics[NUM_EXAMPLES_KEY] = a.num_examples
        return RecordDict({METRICS_KEY: metrics})

    # -- validation --------------------------------------------------------------------------
    def _accept(self, msg: Message) -> Accepted | None:
        """Validate one reply; log and drop it (None) if anything is wrong."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "rejected reply from node %s: message error: %s", node, msg.error.reason)
            return None
        try:
            num_examples = self._num_examples(msg)
            record = msg.content.array_records.get(ARRAYS_KEY)
            if record is None:
                raise PayloadError(None, ARRAYS_KEY, "reply carries no ArrayRecord 'arrays'")
            payload = record_to_payload(record)
            decoded = decode_payload(self.payload_kind, payload, self.spec, self.bounds)
        except PayloadError as exc:
            log(WARNING, "rejected reply from node %s: %s", node, exc)
            return None
        dense = self.payload_kind == "dense"
        return Accepted(msg, num_examples, wire_bytes(record), None if dense else decoded)

    def _num_examples(self, msg: Message) -> int:
        """`num-examples` must be a positive integer; claims above the cap count as the cap."""
        metrics = msg.content.metric_records.get(METRICS_KEY)
        if metrics is None:
            raise PayloadError(None, METRICS_KEY, "reply carries no MetricRecord 'metrics'")
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(np.isfinite(v) for v in values):
                raise PayloadError(None, f"metrics.{key}", f"value {value!r} is not finite")
        n = metrics.get(NUM_EXAMPLES_KEY)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise PayloadError(
                None, NUM_EXAMPLES_KEY, f"value {n!r} is not allowed (a positive integer)"
            )
        if n > self.max_num_examples:
            log(
                INFO,
                "node %s claims %d examples; weighted as the cap %d",
                msg.metadata.src_node_id,
                n,
                self.max_num_examples,
            )
        return min(n, self.max_num_examples)


def build_strategy(
    aggregator: str,
    *,
    spec: ModelSpec,
    payload_kind: str,
    bounds: AlphaBounds,
    max_num_examples: int,
    **strategy_kwargs: object,
) -> FedAvg:
    """`UplinkMixin` in front of the Flower strategy named by the run config's `aggregator`."""
    if aggregator in SIGN_AGGREGATORS:
        return SIGN_AGGREGATORS[aggregator](
            spec=spec,
            payload_kind=payload_kind,
            bounds=bounds,
            max_num_examples=max_num_examples,
            **strategy_kwargs,
        )
    try:
        base = AGGREGATORS[aggregator]
    except KeyError:
        allowed = ", ".join(repr(a) for a in [*AGGREGATORS, *SIGN_AGGREGATORS])
        raise ValueError(
            f"run-config 'aggregator' = {aggregator!r} is unknown; allowed: {allowed}"
        ) from None
    cls = (
        FedBATStrategy
        if base is FedAvg
        else type(f"Uplink{base.__name__}", (UplinkMixin, base), {})
    )
    return cls(
        spec=spec,
        payload_kind=payload_kind,
        bounds=bounds,
        max_num_examples=max_num_examples,
        **strategy_kwargs,
    )


class FedBATStrategy(UplinkMixin, FedAvg):
    """Flower's FedAvg over decoded 1-bit replies: Eq. 11, streamed into one accumulator."""

    stream_mean = True


class SignMajorityStrategy(UplinkMixin, FedAvg):
    """Weighted majority vote over sign payloads (`aggregator = "majority"`, any sign method).

    w <- w (+) alpha_l * sign(sum_k n_k sign_k), alpha_l the example-weighted mean alpha, ties
    leave a coordinate unchanged (`wire.votes.majority_vote`, vectorised).
    """

    stream_mean = True

    def __init__(self, *, payload_kind: str, **kwargs: object) -> None:
        if payload_kind not in SIGN_KINDS:
            raise ValueError(
                f"run-config 'aggregator' = 'majority' needs a sign payload; method payload kind "
                f"{payload_kind!r} is not one of {SIGN_KINDS}"
            )
        super().__init__(payload_kind=payload_kind, **kwargs)  # type: ignore[arg-type]

    def _stream_mean(self, accepted: list[Accepted]) -> ArrayRecord:
        views = [a.decoded.view for a in accepted]  # type: ignore[union-attr]
        delta = majority_vote(self.spec, views, [a.num_examples for a in accepted])
        return arrays_to_record(self.spec.apply(self.global_arrays, delta))


# Aggregators that only exist for sign payloads (robust sign aggregation, issue 6).
SIGN_AGGREGATORS: dict[str, type[FedAvg]] = {"majority": SignMajorityStrategy}
