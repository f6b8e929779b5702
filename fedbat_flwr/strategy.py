"""Flower message strategies that decode compressed replies before aggregating them.

`UplinkMixin` sits in front of any Flower message strategy (FedAvg, FedAdam, FedMedian, Krum,
...): it validates and decodes every reply with the wire codec of the method's payload kind, drops
the bad ones, and then either

- streams the decoded updates into one accumulator (FedAvg over compressed updates, Eq. 11:
  w <- w + sum_k p_k alpha_k sign_k; memory O(model), whatever the number of replies), or
- hands Flower's strategy dense "w + update_k" replies, so its own aggregation rule applies
  unchanged (no Flower code is copied).

Dense payloads (FedAvg) are validated and go to Flower's own aggregation as those validated
weights (never the reply's own record).
A method with its own `ServerRule` (FedBiF, FedPM) replaces both: the rule makes the downlink
payload and aggregates the validated replies (docs/ARCHITECTURE.md, "Methods").
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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

from .broadcast import Broadcast
from .records import (
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
    wire_bytes,
)
from .server_rules import ServerRule
from .wire import (
    SIGN_KINDS,
    AlphaBounds,
    Decoded,
    ModelSpec,
    PayloadError,
    decode_payload,
    majority_vote,
)
from .wire.votes import sign_median

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
# What a reply claiming more than `max-num-examples` gets: weighed as the cap, or rejected.
NUM_EXAMPLES_POLICIES = ("cap", "reject")

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
    # Sampled clients whose update was not aggregated: invalid replies, failed replies (a
    # ClientApp that raised) and replies that never came (round-timeout).
    num_rejected: int = 0
    model_updated: bool = False
    train_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """One validated reply: its weight, its wire size and (for compressed kinds) its decoding."""

    message: Message
    num_examples: int
    nbytes: int
    decoded: object | None  # a wire `Decoded` (for dense payloads: the validated weights)
    # The validated scalar metrics, `num-examples` set to the weight actually used.
    metrics: Mapping[str, int | float] = field(default_factory=dict)


class UplinkMixin:
    """Validate + decode replies of one payload kind in front of a Flower message strategy.

    Every reply is validated before it touches an accumulator (`_accept`): message errors,
    `num-examples` (a positive int, at most `max-num-examples`), finite scalar metrics, then the
    payload's keys, dtypes, byte lengths, pad bits and alphas/scales by the wire codec of its kind.
    A rejected reply is logged (node, layer, field, reason) and counted in `num_rejected`; the
    new model is exactly the one the other replies make, as if that client had not been sampled.

    Influence of one accepted client (weighted mean, `p = n / sum n` with `n` capped at
    `max-num-examples`; `num-examples-policy = "reject"` drops larger claims instead): per round
    it moves any weight by at most

    - 1-bit kinds (`signs`): `p * alpha-max` for a parameter (SignSGD family: `p * alpha`, its
      configured alpha exactly), `p * stat-alpha-max` for a BatchNorm statistic, in the
      statistic's domain (a running variance by a factor within `exp(+-p * stat-alpha-max)`).
      `signs-unbounded` (EF-SignSGD, alpha = mean |p|): `p * max-update-entry` for parameters.
    - `kbit` / `sparse` updates, FedBiF's full-precision tensors: `p * max-update-entry` for a
      parameter, `p * stat-alpha-max` for a statistic (checked on the scale / kept values).
    - `dense` / `binary-weights` (absolute weights): unbounded by design: the mean of weights
      moves by `p * (w_k - mean of the others)`.

    Each node counts once a round (a second reply of a node is rejected), and any exception
    while one reply is handled rejects that reply only (`_accept_once`).

    `aggregator = "majority"` bounds a client's vote (not its alpha: the step is the mean
    alpha), `aggregator = "sign-median"` bounds both by the honest clients' range as long as they
    are a majority; Flower's `fedmedian` / `fedtrimmedavg` / `krum` do the same for any kind.
    """

    # True only where the strategy's own rule is FedAvg's weighted mean, which can be streamed.
    stream_mean: bool = False

    def __init__(
        self,
        *,
        spec: ModelSpec,
        payload_kind: str,
        bounds: AlphaBounds,
        max_num_examples: int,
        rule: ServerRule | None = None,
        num_examples_policy: str = "cap",
        broadcast: Broadcast | None = None,
        **strategy_kwargs: object,
    ) -> None:
        if num_examples_policy not in NUM_EXAMPLES_POLICIES:
            raise ValueError(
                f"run-config 'num-examples-policy' = {num_examples_policy!r} is unknown; "
                f"allowed: {', '.join(repr(p) for p in NUM_EXAMPLES_POLICIES)}"
            )
        super().__init__(**strategy_kwargs)  # type: ignore[call-arg]
        self.num_examples_policy = num_examples_policy
        self.rule = rule
        self.spec = spec
        self.payload_kind = payload_kind
        self.bounds = bounds
        self.max_num_examples = max_num_examples
        self.global_arrays: dict[str, np.ndarray] = {}  # the master weights
        self.broadcast = broadcast or Broadcast(spec, bits=32, seed=0)
        self.rounds: dict[int, RoundStats] = {}
        # Rounds already done before this `start` (a resumed run): Flower counts from 1 again,
        # every hook here works in the run's own round numbers.
        self.round_offset = 0

    # -- training round ----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the master model the replies are updates of, send its downlink (the dense
        model, a method's own payload, or a quantized copy: `downlink-bits`), count it."""
        server_round += self.round_offset
        stats = RoundStats()
        self.rounds[server_round] = stats
        self.global_arrays = record_to_arrays(arrays)
        if self.rule is not None:  # the method's own downlink payload instead of the dense model
            sent = payload_to_record(self.rule.downlink(self.global_arrays, server_round))
        else:
            sent = self.broadcast.encode(self.global_arrays, server_round) or arrays
        # Flower's strategy sees the master (FedOpt keeps it); the messages carry `sent`.
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        for message in messages:
            message.content[ARRAYS_KEY] = sent
        stats.num_sent = len(messages)
        stats.downlink_bytes = wire_bytes(sent) * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        streaming = self._streams_each_reply()
        accepted = []
        seen: set[object] = set()
        for msg in replies:
            a = self._accept_once(msg, server_round, seen)
            if a is not None and streaming:
                # Not kept: `_stream_mean` decodes again, one reply at a time, so memory stays
                # O(model) whatever the number of replies.
                a = replace(a, decoded=None)
            if a is not None:
                accepted.append(a)
        accepted = _shared_metrics(accepted)
        stats.num_replies = len(accepted)
        # Replies that never came before the round's timeout are rejected too (num_sent is 0
        # when configure_train did not run, e.g. in unit tests).
        stats.num_rejected = max(len(replies), stats.num_sent) - len(accepted)
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
        if arrays is not None and not _all_finite(arrays):
            # Valid replies can still add up past float32 (unbounded kinds, a running variance
            # pushed up round after round): never hand Flower a non-finite model.
            log(
                WARNING,
                "round %d: the aggregate has non-finite values: keeping the previous model",
                server_round,
            )
            return None, None
        stats.model_updated = arrays is not None
        stats.train_metrics = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _aggregate(
        self, server_round: int, accepted: list[Accepted]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.rule is not None:
            pairs = [(a.num_examples, a.decoded) for a in accepted]
            new = self.rule.aggregate(self.global_arrays, pairs, server_round)  # type: ignore[arg-type]
            return arrays_to_record(new), self._metrics(accepted)
        if self.stream_mean and self.payload_kind != "dense":
            return self._stream_mean(accepted), self._metrics(accepted)
        messages = [self._as_dense(a) for a in accepted]
        return super().aggregate_train(server_round, messages)  # type: ignore[misc]

    def _streams_each_reply(self) -> bool:
        """The plain weighted mean: each reply can be added as it is validated, then dropped."""
        return (
            self.stream_mean
            and self.payload_kind != "dense"
            and self.rule is None
            and type(self)._stream_mean is UplinkMixin._stream_mean
        )

    def _stream_mean(self, accepted: list[Accepted]) -> ArrayRecord:
        """Eq. 11: w + sum_k (n_k / sum n) * decoded_k, one accumulator for all replies.

        Each accepted reply is decoded again here (validation is cheap next to holding K
        decoded payloads), added, and dropped before the next one.
        """
        acc = {t.name: np.zeros(t.shape, dtype=np.float32) for t in self.spec}
        total = float(sum(a.num_examples for a in accepted))
        absolute = False
        for a in accepted:
            decoded = a.decoded or self._decode(a.message.content[ARRAYS_KEY])
            decoded.accumulate(acc, a.num_examples / total)
            absolute = bool(getattr(decoded, "absolute", False))
        if absolute:  # replies carry weights (BiFL): the mean is the model
            return arrays_to_record(self.broadcast.rebase(acc, self.global_arrays))
        return arrays_to_record(self.spec.apply(self.global_arrays, acc))

    def _decode(self, record: ArrayRecord) -> Decoded:
        """Validate and decode one reply's ArrayRecord (raises PayloadError)."""
        return decode_payload(self.payload_kind, record_to_payload(record), self.spec, self.bounds)

    # -- checkpoint state ----------------------------------------------------------------------
    def strategy_state(self) -> dict[str, np.ndarray]:
        """Arrays a checkpoint needs besides the model: server-optimizer moments, rule state."""
        state: dict[str, np.ndarray] = {}
        for attr in ("m_t", "v_t"):  # Flower's FedOpt family (FedAdam, FedYogi, ...)
            for name, value in (getattr(self, attr, None) or {}).items():
                state[f"{attr}/{name}"] = np.asarray(value)
        if self.rule is not None:
            state.update({f"rule/{k}": v for k, v in self.rule.state().items()})
        return state

    def load_strategy_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `strategy_state()`; keys this strategy does not know are an error."""
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name] = np.array(value)
        unknown = set(groups) - {"m_t", "v_t", "rule"}
        if unknown or ({"m_t", "v_t"} & set(groups) and not hasattr(self, "m_t")):
            raise ValueError(
                f"checkpoint strategy state {sorted(groups)} does not fit {type(self).__name__}"
            )
        for attr in ("m_t", "v_t"):
            if attr in groups:
                setattr(self, attr, groups[attr])
        if self.rule is not None:
            self.rule.load_state(groups.get("rule", {}))
        elif "rule" in groups:
            raise ValueError("checkpoint has server-rule state but this method has no rule")

    def _as_dense(self, a: Accepted) -> Message:
        """A reply Flower's strategies can average: the client's implied weights, capped weight."""
        if a.decoded is None:
            arrays = a.message.content[ARRAYS_KEY]
        elif getattr(a.decoded, "absolute", False):
            weights = self.broadcast.rebase(a.decoded.delta(), self.global_arrays)  # type: ignore[union-attr]
            arrays = arrays_to_record(weights)
        else:
            new = self.spec.apply(self.global_arrays, a.decoded.delta())  # type: ignore[union-attr]
            arrays = arrays_to_record(new)
        content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(dict(a.metrics))})
        return Message(content=content, metadata=a.message.metadata)

    def _metrics(self, accepted: list[Accepted]) -> MetricRecord:
        contents = [self._as_metrics_only(a) for a in accepted]
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]

    @staticmethod
    def _as_metrics_only(a: Accepted) -> RecordDict:
        return RecordDict({METRICS_KEY: MetricRecord(dict(a.metrics))})

    # -- validation --------------------------------------------------------------------------
    def _accept_once(self, msg: Message, server_round: int, seen: set[object]) -> Accepted | None:
        """`_accept`, for the first reply of each node only, and total.

        One node, one reply a round: a later reply from a node already seen (a replayed or
        duplicated message) is rejected whatever it holds, so it cannot count twice. Any
        exception while one reply is handled (a decoder bug, a forged object no check foresaw)
        rejects that reply, logged and counted in `num_rejected`, never the round.
        """
        try:
            node = msg.metadata.src_node_id
            if node in seen:
                log(WARNING, "rejected reply from node %s: a second reply this round", node)
                return None
            seen.add(node)
            return self._accept(msg, server_round)
        except Exception as exc:  # defence in depth: one reply never ends the round
            log(
                WARNING,
                "rejected a reply: %s while handling it: %s",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, PayloadError),
            )
            return None

    def _accept(self, msg: Message, server_round: int = 0) -> Accepted | None:
        """Validate one reply; log and drop it (None) if it is invalid (PayloadError)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "rejected reply from node %s: message error: %s", node, msg.error.reason)
            return None
        try:
            metrics = self._checked_metrics(msg)
            record = msg.content.array_records.get(ARRAYS_KEY)
            if record is None:
                raise PayloadError(None, ARRAYS_KEY, "reply carries no ArrayRecord 'arrays'")
            decoded = self._decode(record)
            if self.rule is not None:
                self.rule.check(decoded, server_round)
            nbytes = wire_bytes(record)
        except PayloadError as exc:
            log(WARNING, "rejected reply from node %s: %s", node, exc)
            return None
        # Dense payloads keep their validated weights too: Flower averages those, never the
        # reply's own record (which may hold raw Arrays Flower cannot read).
        num_examples = int(metrics[NUM_EXAMPLES_KEY])
        return Accepted(msg, num_examples, nbytes, decoded, metrics)

    def _checked_metrics(self, msg: Message) -> dict[str, int | float]:
        """Finite scalar metrics and a positive integer `num-examples`, capped (or rejected).

        Lists are refused: Flower's metric aggregation zips them across replies and raises on
        unequal lengths, so one client could stop the round. Ints beyond float range would
        raise in the same place.
        """
        record = msg.content.metric_records.get(METRICS_KEY)
        if record is None:
            raise PayloadError(None, METRICS_KEY, "reply carries no MetricRecord 'metrics'")
        metrics = dict(record)
        for key, value in metrics.items():
            if not _finite_number(value):
                reason = f"value {value!r} is not allowed (a finite number, no list)"
                raise PayloadError(None, f"metrics.{key}", reason)
        n = metrics.get(NUM_EXAMPLES_KEY)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise PayloadError(
                None, NUM_EXAMPLES_KEY, f"value {n!r} is not allowed (a positive integer)"
            )
        if n > self.max_num_examples:
            if self.num_examples_policy == "reject":
                reason = (
                    f"value {n} is above max-num-examples={self.max_num_examples} "
                    "(num-examples-policy 'reject')"
                )
                raise PayloadError(None, NUM_EXAMPLES_KEY, reason)
            log(
                INFO,
                "node %s claims %d examples; weighted as the cap %d",
                msg.metadata.src_node_id,
                n,
                self.max_num_examples,
            )
        metrics[NUM_EXAMPLES_KEY] = min(n, self.max_num_examples)
        return metrics


def _finite_number(value: object) -> bool:
    """An int or float that float arithmetic can weigh without overflowing or turning nan."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and abs(value) <= sys.float_info.max


def _all_finite(record: ArrayRecord) -> bool:
    return all(np.isfinite(value).all() for value in record_to_arrays(record).values())


def _shared_metrics(accepted: list[Accepted]) -> list[Accepted]:
    """Keep the metric keys every accepted reply has (always `num-examples`).

    Flower's consistency check (dense path) raises when replies' metric keys differ, so one
    client adding or dropping a metric would otherwise stop the round.
    """
    if not accepted:
        return accepted
    keys = set.intersection(*(set(a.metrics) for a in accepted))
    return [replace(a, metrics={k: v for k, v in a.metrics.items() if k in keys}) for a in accepted]


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
    """Majority vote over sign payloads (`aggregator = "majority"`, any sign method).

    w <- w (+) median_k(alpha_kl) * sign(sum_k sign_k): one vote per client whatever its
    `num-examples`, ties leave a coordinate unchanged (`wire.votes.majority_vote`, vectorised).
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
        delta = majority_vote(self.spec, views)
        return arrays_to_record(self.spec.apply(self.global_arrays, delta))


class SignMedianStrategy(UplinkMixin, FedAvg):
    """Coordinate-wise median of the decoded updates ``alpha_k * sign_k`` (any sign method).

    `aggregator = "sign-median"`: robust to a minority of clients flipping their signs *and*
    inflating alpha or `num-examples` (the median ignores example counts, as FedMedian does).
    The same median as Flower's `fedmedian` on these replies, but straight from the packed
    bits: no dense `w + update` message per client, memory ``K * max_l d_l`` float64 (one
    tensor's K decoded copies at a time, `wire.votes.sign_median`).
    """

    stream_mean = True

    def __init__(self, *, payload_kind: str, **kwargs: object) -> None:
        if payload_kind not in SIGN_KINDS:
            raise ValueError(
                f"run-config 'aggregator' = 'sign-median' needs a sign payload; method payload "
                f"kind {payload_kind!r} is not one of {SIGN_KINDS}"
            )
        super().__init__(payload_kind=payload_kind, **kwargs)  # type: ignore[arg-type]

    def _stream_mean(self, accepted: list[Accepted]) -> ArrayRecord:
        delta = sign_median(self.spec, [a.decoded.view for a in accepted])  # type: ignore[union-attr]
        return arrays_to_record(self.spec.apply(self.global_arrays, delta))


# Aggregators that only exist for sign payloads (robust sign aggregation, issue 6).
SIGN_AGGREGATORS: dict[str, type[FedAvg]] = {
    "majority": SignMajorityStrategy,
    "sign-median": SignMedianStrategy,
}
