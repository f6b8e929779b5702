"""Seeded client sampling by partition: a run's seed decides which partitions train each round.

Flower samples `random.sample(grid.get_node_ids(), k)`. Node ids are random for every run and
the list has no fixed order, so a seed fixes positions, not clients: two runs of one seed train
different partitions. `PartitionSampler` instead asks every node once for the partition it holds
(a Flower query message answered by `client_app.query`), then draws partition ids with a
generator seeded by (run seed, round) from the sorted partitions of the connected nodes and maps
them back to node ids. The sample is a function of (seed, round, partitions connected) only, in
simulation and in deployment; nodes that join or leave change the candidates and are logged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from .keys import NODE_INFO_KEY, PARTITION_ID_KEY

_SAMPLING_STREAM = 0x5A4D  # keeps this generator apart from others seeded by (seed, round)


class SamplingError(RuntimeError):
    """Fewer connected partitions than a round needs, after waiting for them."""


@dataclass
class PartitionSampler:
    """Which partitions (and so which nodes) train in a round; see the module docstring.

    `partition_of` maps node id -> partition id, filled as nodes are discovered; `nodes_info`
    keeps whatever else each node reported (its torch threads, for the run's provenance).
    """

    seed: int
    query_timeout: float = 120.0
    wait_timeout: float = 60.0
    partition_of: dict[int, int] = field(default_factory=dict)
    nodes_info: dict[int, dict[str, int | float]] = field(default_factory=dict)
    _connected: frozenset[int] = frozenset()

    def sample(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int
    ) -> list[tuple[int, int]]:
        """(partition id, node id) of this round's clients, sorted by partition id.

        As many as Flower's FedAvg samples: max(int(fraction * connected), min_nodes).
        """
        by_partition = self._candidates(grid, min_nodes)
        size = max(int(len(by_partition) * fraction), min_nodes)
        partitions = sorted(by_partition)
        rng = np.random.default_rng([self.seed, server_round, _SAMPLING_STREAM])
        chosen = sorted(int(p) for p in rng.choice(partitions, size=size, replace=False))
        log(
            INFO,
            "round %d: sampled partitions %s (%d of %d connected)",
            server_round,
            chosen,
            size,
            len(partitions),
        )
        return [(p, by_partition[p]) for p in chosen]

    def partitions(self, messages: Iterable[Message]) -> list[int]:
        """The partitions of the nodes `messages` go to, sorted (metrics.jsonl's record)."""
        return sorted(self.partition_of[m.metadata.dst_node_id] for m in messages)

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """`replies` sorted by their node's partition (unknown nodes last, by id): the order in
        which a round's replies are summed, so float sums repeat run after run."""
        last = float("inf")

        def key(reply: Message) -> tuple[float, int]:
            node = reply.metadata.src_node_id
            return self.partition_of.get(node, last), node

        return sorted(replies, key=key)

    def _candidates(self, grid: Grid, min_nodes: int) -> dict[int, int]:
        """partition id -> node id over the connected nodes, at least `min_nodes` of them."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            connected = sorted(grid.get_node_ids())
            self._discover(grid, connected)
            by_partition = self._by_partition(connected)
            if len(by_partition) >= min_nodes:
                return by_partition
            if time.monotonic() > deadline:
                raise SamplingError(
                    f"{len(by_partition)} partitions connected after {self.wait_timeout:.0f} s; "
                    f"a round needs min-train-nodes = {min_nodes}"
                )
            time.sleep(1.0)

    def _discover(self, grid: Grid, connected: list[int]) -> None:
        """Ask nodes not seen before for their partition; log joins and departures."""
        now = frozenset(connected)
        if self._connected and now != self._connected:
            log(
                WARNING,
                "connected nodes changed: %d joined, %d left; sampling among the %d connected",
                len(now - self._connected),
                len(self._connected - now),
                len(now),
            )
        self._connected = now
        unknown = [n for n in connected if n not in self.partition_of]
        if not unknown:
            return
        queries = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in unknown
        ]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            self._learn(reply)

    def _learn(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %s did not say its partition: %s", node, reply.error.reason)
            return
        info = dict(reply.content.metric_records.get(NODE_INFO_KEY, MetricRecord()))
        partition = info.get(PARTITION_ID_KEY)
        if not isinstance(partition, int) or partition < 0:
            log(WARNING, "node %s reported partition %r; it is not sampled", node, partition)
            return
        self.partition_of[node] = partition
        self.nodes_info[node] = info

    def _by_partition(self, connected: list[int]) -> dict[int, int]:
        """One node per partition: where two nodes claim one, the lower node id (logged)."""
        by_partition: dict[int, int] = {}
        for node in connected:  # sorted: the lower id wins
            partition = self.partition_of.get(node)
            if partition is None:
                continue
            if partition in by_partition:
                log(
                    WARNING,
                    "nodes %s and %s both hold partition %d; node %s is not sampled",
                    by_partition[partition],
                    node,
                    partition,
                    node,
                )
                continue
            by_partition[partition] = node
        return by_partition

    def client_threads(self) -> list[int]:
        """The distinct torch thread counts the nodes reported (the run's provenance)."""
        threads = {info.get("torch-threads") for info in self.nodes_info.values()}
        return sorted(int(t) for t in threads if isinstance(t, int))
