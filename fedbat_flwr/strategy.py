"""The server's Flower strategy: validate every reply, then aggregate the accepted ones.

`ValidatingStrategy` is Flower's FedAvg loop (client sampling, `start`) with two overrides:

- `configure_train` sends the method's downlink (`ServerPart.downlink`: the dense model, its
  quantized copy, or a method's own payload) and remembers the master weights;
- `aggregate_train` validates each reply (`validate`, total: any problem rejects that reply
  only), then hands the accepted ones to the round's aggregator (aggregators.py: a streamed
  weighted mean, a vote, a median, or one of Flower's strategies through dense replies).

Round statistics (bytes, replies, rejections) go to the `rounds` mapping the caller passes in,
which the results writer reads; the strategy keeps no other record of past rounds.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregators import (
    Accepted,
    Aggregator,
    Replies,
    make_aggregator,
)
from .bn_refit import check_statistics, pool_statistics
from .config import NUM_EXAMPLES_POLICIES
from .keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from .records import arrays_to_record, record_to_arrays, record_to_payload, wire_bytes
from .results import RoundStats
from .sampling import PartitionSampler
from .server_part import ServerPart
from .wire import AlphaBounds, Decoded, ModelSpec, PayloadError, decode_payload

if TYPE_CHECKING:
    from .config import RunConfig
    from .methods import Method

# The part of a checkpoint's strategy state that belongs to the server part (FedPM's
# posteriors); the prefix checkpoints have always used.
PART_PREFIX = "rule/"

__all__ = [
    "ARRAYS_KEY",
    "METRICS_KEY",
    "NUM_EXAMPLES_KEY",
    "Accepted",
    "Rejected",
    "ValidatingStrategy",
    "build_strategy",
]


@dataclass(frozen=True)
class Rejected:
    """Why one reply was not aggregated (logged as a warning, counted in `num_rejected`)."""

    reason: str
    traceback: bool = False  # an unexpected exception, not a PayloadError: log its traceback


class ValidatingStrategy(FedAvg):
    """Flower's FedAvg loop whose replies are validated, then aggregated by `aggregator`.

    Every reply is validated before it touches an accumulator (`validate`): message errors,
    finite scalar metrics, `num-examples` (a positive int, capped at `max-num-examples` or,
    with `num-examples-policy = "reject"`, rejected above it), then the payload by the wire
    codec of the method's kind and the server part's `check`. A rejected reply is logged and
    counted in `num_rejected`; the new model is exactly the one the other replies make, as if
    that client had not been sampled. Each node counts once a round.

    `round_offset` is the number of rounds done before this `start` (a resumed run): Flower
    counts from 1 again, every hook here works in the run's own round numbers.
    """

    def __init__(
        self,
        *,
        part: ServerPart,
        aggregator: Aggregator,
        payload_kind: str,
        decode: Callable[[ArrayRecord], Decoded],
        max_num_examples: int,
        num_examples_policy: str = "cap",
        round_offset: int = 0,
        rounds: MutableMapping[int, RoundStats] | None = None,
        sampler: PartitionSampler | None = None,
        client_config: Mapping[str, Any] | None = None,
        **flower_kwargs: Any,
    ) -> None:
        if num_examples_policy not in NUM_EXAMPLES_POLICIES:
            raise ValueError(
                f"run-config 'num-examples-policy' = {num_examples_policy!r} is unknown; "
                f"allowed: {', '.join(repr(p) for p in NUM_EXAMPLES_POLICIES)}"
            )
        super().__init__(**flower_kwargs)
        self.part, self.aggregator = part, aggregator
        self.spec: ModelSpec = part.spec
        # `decode` validates and decodes one reply's record as `payload_kind` (PayloadError).
        self.payload_kind, self.decode = payload_kind, decode
        self.max_num_examples, self.num_examples_policy = max_num_examples, num_examples_policy
        self.round_offset = round_offset
        self.rounds: MutableMapping[int, RoundStats] = {} if rounds is None else rounds
        self.global_arrays: dict[str, np.ndarray] = {}  # the master weights of this round
        # None: Flower's own sampling (random node ids); else partitions drawn by (seed, round).
        self.sampler = sampler
        self.trained_nodes: list[int] = []  # the nodes of this round's train messages
        # Added to every train message's config: what a client step needs to know of the run
        # (method and its options; fedbat_flwr.client reads them).
        self.client_config = dict(client_config or {})
        # What `start` should begin from, when the strategy was built from a model's arrays.
        self.initial_arrays: ArrayRecord | None = None

    # -- a training round ----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the master model the replies are updates of; send the part's downlink."""
        server_round += self.round_offset
        stats = self.rounds[server_round] = RoundStats()
        # The spec's tensors only (a state_dict's num_batches_tracked stays with the clients).
        names = set(self.spec.names)
        self.global_arrays = {k: v for k, v in record_to_arrays(arrays).items() if k in names}
        for key, value in self.client_config.items():
            if key not in config:  # a `train_config` passed to `start` wins
                config[key] = value
        sent = self.part.downlink(self.global_arrays, server_round)
        if self.sampler is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            messages = self._seeded_messages(server_round, arrays, config, grid)
            stats.sampled_partitions = self.sampler.partitions(messages)
        for message in messages:
            message.content[ARRAYS_KEY] = sent
        stats.num_sent = len(messages)
        stats.downlink_bytes = wire_bytes(sent) * len(messages)
        self.trained_nodes = [m.metadata.dst_node_id for m in messages]
        return messages

    # -- statistics of the evaluated network (server parts that refit them) -------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's federated evaluation, off unless the part refits BatchNorm statistics:
        then the round's clients get the network the server evaluates, to measure them."""
        if not self.part.refits_statistics:
            return super().configure_evaluate(server_round, arrays, config, grid)
        server_round += self.round_offset
        network = arrays_to_record(self.part.eval_arrays(record_to_arrays(arrays)))
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: network, self.configrecord_key: config})
        messages = list(self._construct_messages(record, self.trained_nodes, MessageType.EVALUATE))
        stats = self.rounds.setdefault(server_round, RoundStats())
        stats.downlink_bytes += wire_bytes(network) * len(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The pooled statistics of the valid replies become the evaluated network's."""
        if not self.part.refits_statistics:
            return super().aggregate_evaluate(server_round, replies)
        server_round += self.round_offset
        measured: list[tuple[int, dict[str, np.ndarray]]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise PayloadError(None, "message", msg.error.reason)
                n = int(self._checked_metrics(msg)[NUM_EXAMPLES_KEY])
                arrays = record_to_arrays(msg.content.array_records[ARRAYS_KEY])
                measured.append((n, check_statistics(self.spec, arrays)))
            except (PayloadError, KeyError, ValueError) as exc:
                log(WARNING, "statistics from node %s not used: %s", node, exc)
        if not measured:
            log(WARNING, "round %d: no valid statistics; keeping the previous ones", server_round)
            return None
        self.part.fit_statistics(pool_statistics(self.spec, measured))
        return MetricRecord({"statistics-clients": len(measured)})

    def _seeded_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's train messages, to the nodes of the partitions the sampler draws."""
        assert self.sampler is not None
        if self.fraction_train == 0.0:
            return []
        chosen = self.sampler.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = [node for _, node in chosen]
        return list(self._construct_messages(record, nodes, MessageType.TRAIN))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, count the round, aggregate the accepted ones (if enough)."""
        server_round += self.round_offset
        stats = self.rounds.setdefault(server_round, RoundStats())
        replies = list(replies)
        if self.sampler is not None:  # summed in partition order: same seed, same sums
            replies = self.sampler.in_partition_order(replies)
        accepted = _shared_metrics(self._accept_all(replies, server_round))
        stats.count_replies(len(replies), [a.nbytes for a in accepted], self.spec.num_params)
        if len(accepted) < max(1, self.min_train_nodes):
            log(
                WARNING,
                "round %d: %d valid replies, fewer than the minimum %d: keeping the previous model",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        batch = Replies(accepted, self._metrics(accepted))
        arrays, metrics = self.aggregator.aggregate(self.global_arrays, batch, server_round)
        if arrays is not None:  # Flower's FedOpt returns float64: the master keeps its dtypes
            arrays = _in_dtypes_of(self.global_arrays, arrays)
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

    def _accept_all(self, replies: list[Message], server_round: int) -> list[Accepted]:
        """The valid replies, the first of each node only; every rejection logged."""
        accepted: list[Accepted] = []
        seen: set[object] = set()
        for msg in replies:
            outcome = self._validate_once(msg, server_round, seen)
            if isinstance(outcome, Rejected):
                log(WARNING, "%s", outcome.reason, exc_info=outcome.traceback)
            elif self.aggregator.streams:
                # Not kept: the aggregator decodes again, one reply at a time, so memory stays
                # O(model) whatever the number of replies.
                accepted.append(replace(outcome, decoded=None))
            else:
                accepted.append(outcome)
        return accepted

    def _validate_once(
        self, msg: Message, server_round: int, seen: set[object]
    ) -> Accepted | Rejected:
        """`validate` for the first reply of each node only (a replayed or duplicated message
        cannot count twice), and total: any exception rejects this reply, never the round."""
        try:
            node = msg.metadata.src_node_id
            if node in seen:
                return Rejected(f"rejected reply from node {node}: a second reply this round")
            seen.add(node)
            return self.validate(msg, server_round)
        except Exception as exc:  # defence in depth: one reply never ends the round
            reason = f"rejected a reply: {type(exc).__name__} while handling it: {exc}"
            return Rejected(reason, traceback=not isinstance(exc, PayloadError))

    # -- validation ---------------------------------------------------------------------------
    def validate(self, msg: Message, server_round: int = 0) -> Accepted | Rejected:
        """One reply, checked completely: its metrics, then its payload (PayloadError ->
        Rejected naming the node, layer, field and reason)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return Rejected(f"rejected reply from node {node}: message error: {msg.error.reason}")
        try:
            metrics = self._checked_metrics(msg)
            record = msg.content.array_records.get(ARRAYS_KEY)
            if record is None:
                raise PayloadError(None, ARRAYS_KEY, "reply carries no ArrayRecord 'arrays'")
            decoded = self.decode(record)
            self.part.check(decoded, server_round)
            nbytes = wire_bytes(record)
        except PayloadError as exc:
            return Rejected(f"rejected reply from node {node}: {exc}")
        # Dense payloads keep their validated weights too: Flower averages those, never the
        # reply's own record (which may hold raw Arrays Flower cannot read).
        return Accepted(msg, int(metrics[NUM_EXAMPLES_KEY]), nbytes, decoded, metrics)

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

    def _metrics(self, accepted: list[Accepted]) -> MetricRecord:
        """The accepted replies' metrics, weighted as Flower's FedAvg weighs them."""
        contents = [RecordDict({METRICS_KEY: MetricRecord(dict(a.metrics))}) for a in accepted]
        return self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    # -- checkpoint state ---------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """What a checkpoint needs besides the model: the aggregator's and the part's state."""
        part = {PART_PREFIX + k: v for k, v in self.part.state().items()}
        return {**self.aggregator.state(), **part}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state()`; keys this strategy does not keep are an error."""
        part = {
            k.removeprefix(PART_PREFIX): v for k, v in state.items() if k.startswith(PART_PREFIX)
        }
        own = {k: v for k, v in state.items() if not k.startswith(PART_PREFIX)}
        self.aggregator.load_state(own)
        self.part.load_state(part)


def _finite_number(value: object) -> bool:
    """An int or float that float arithmetic can weigh without overflowing or turning nan."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and abs(value) <= sys.float_info.max


def _in_dtypes_of(master: Mapping[str, np.ndarray], record: ArrayRecord) -> ArrayRecord:
    """`record` with every array cast to the dtype of the master array of the same name."""
    arrays = record_to_arrays(record)
    if all(arrays[k].dtype == master[k].dtype for k in arrays if k in master):
        return record
    return arrays_to_record(
        {k: v.astype(master[k].dtype) if k in master else v for k, v in arrays.items()}
    )


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


_FEDAVG_KWARGS = frozenset(inspect.signature(FedAvg.__init__).parameters) - {"self"}


def strategy_arguments(
    aggregator: str,
    *,
    spec: ModelSpec,
    payload_kind: str,
    bounds: AlphaBounds,
    max_num_examples: int,
    part: ServerPart | None = None,
    num_examples_policy: str = "cap",
    round_offset: int = 0,
    rounds: MutableMapping[int, RoundStats] | None = None,
    sampler: PartitionSampler | None = None,
    client_config: Mapping[str, Any] | None = None,
    **flower_kwargs: Any,
) -> dict[str, Any]:
    """`ValidatingStrategy`'s arguments for one method's payload kind and server part (default:
    `ServerPart`), aggregating with the run config's `aggregator` unless the part aggregates
    itself (a subclass such as `FedBATStrategy` passes them to its own `__init__`).

    ``flower_kwargs`` configure Flower's sampling (FedAvg's arguments) and, all of them, the
    Flower strategy an aggregator wraps (e.g. Krum's `num_malicious_nodes`).
    """
    part = part or ServerPart(spec)

    def decode(record: ArrayRecord) -> Decoded:
        """One reply's record validated and decoded as `payload_kind` (raises PayloadError)."""
        return decode_payload(payload_kind, record_to_payload(record), spec, bounds)

    configured = make_aggregator(
        aggregator,
        spec=spec,
        payload_kind=payload_kind,
        broadcast=part.broadcast,
        decode=decode,
        **flower_kwargs,
    )
    return {
        "part": part,
        "aggregator": part.aggregator(configured),
        "payload_kind": payload_kind,
        "decode": decode,
        "max_num_examples": max_num_examples,
        "num_examples_policy": num_examples_policy,
        "round_offset": round_offset,
        "rounds": rounds,
        "sampler": sampler,
        "client_config": client_config,
        **{k: v for k, v in flower_kwargs.items() if k in _FEDAVG_KWARGS},
    }


def build_strategy(aggregator: str, **kwargs: Any) -> ValidatingStrategy:
    """The strategy `strategy_arguments(aggregator, **kwargs)` describes."""
    return ValidatingStrategy(**strategy_arguments(aggregator, **kwargs))


def method_arguments(
    method: Method, config: RunConfig, part: ServerPart, **kwargs: Any
) -> dict[str, Any]:
    """The strategy arguments of a method's server: its aggregator, payload kind and step
    bounds, the run's example cap; ``kwargs`` as for `strategy_arguments`."""
    return strategy_arguments(
        method.aggregator(config),
        part=part,
        spec=part.spec,
        payload_kind=method.payload_kind,
        bounds=method.step_bounds(config),
        max_num_examples=config.max_num_examples,
        num_examples_policy=config.num_examples_policy,
        **kwargs,
    )


def method_strategy(
    method: Method, config: RunConfig, part: ServerPart, **kwargs: Any
) -> ValidatingStrategy:
    """The strategy a method's server runs (`method_arguments`)."""
    return ValidatingStrategy(**method_arguments(method, config, part, **kwargs))
