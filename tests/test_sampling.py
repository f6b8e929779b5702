"""Seeded sampling by partition: the partitions that train are a function of (seed, round,
partitions connected), never of the random node ids a run gets."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fedbat_flwr.keys import NODE_INFO_KEY, PARTITION_ID_KEY
from fedbat_flwr.sampling import PartitionSampler, SamplingError

pytestmark = pytest.mark.usefixtures("in_a_run")


class FakeGrid:
    """Nodes with given ids holding given partitions; answers the sampler's queries."""

    def __init__(self, partition_of: dict[int, int]) -> None:
        self.partition_of = dict(partition_of)
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(reversed(self.partition_of))  # no useful order, as in Flower

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            info = MetricRecord({PARTITION_ID_KEY: self.partition_of[node], "torch-threads": 1})
            reply = Message(RecordDict({NODE_INFO_KEY: info}), metadata=_from(node))
            replies.append(reply)
        return replies


def _from(node: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"q{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60.0,
        message_type="query",
    )  # fmt: skip


def _grid(node_ids: list[int], num_partitions: int = 20) -> FakeGrid:
    return FakeGrid(dict(zip(node_ids, range(num_partitions), strict=True)))


def _partitions(sampler: PartitionSampler, grid: FakeGrid, rounds: int = 5) -> list[list[int]]:
    return [[p for p, _ in sampler.sample(grid, r, 0.3, 2)] for r in range(1, rounds + 1)]


def test_same_seed_samples_the_same_partitions_whatever_the_node_ids() -> None:
    first = _grid([1000 + 7 * i for i in range(20)])
    second = _grid([98765 - 13 * i for i in range(20)])
    picks = _partitions(PartitionSampler(seed=3), first)
    assert picks == _partitions(PartitionSampler(seed=3), second)
    assert all(len(p) == 6 and p == sorted(set(p)) for p in picks)  # int(0.3 * 20), sorted
    assert len({tuple(p) for p in picks}) > 1, "rounds draw different partitions"
    assert picks != _partitions(PartitionSampler(seed=4), first), "the seed matters"


def test_nodes_are_asked_once_and_mapped_back_to_their_ids() -> None:
    grid = _grid([50 + i for i in range(20)])
    sampler = PartitionSampler(seed=0)
    for r in (1, 2, 3):
        for partition, node in sampler.sample(grid, r, 0.3, 2):
            assert grid.partition_of[node] == partition
    assert sorted(grid.queried) == sorted(grid.partition_of), "each node queried exactly once"
    assert sampler.client_threads() == [1]


def test_a_node_leaving_only_removes_its_partition_from_the_candidates() -> None:
    grid = _grid(list(range(100, 120)))
    sampler = PartitionSampler(seed=1)
    sampler.sample(grid, 1, 1.0, 2)
    gone = next(node for node, p in grid.partition_of.items() if p == 7)
    del grid.partition_of[gone]
    chosen = [p for p, _ in sampler.sample(grid, 2, 1.0, 2)]
    assert chosen == [p for p in range(20) if p != 7]


def test_two_nodes_claiming_one_partition_count_once() -> None:
    grid = FakeGrid({10: 0, 11: 1, 12: 1})
    chosen = PartitionSampler(seed=0).sample(grid, 1, 1.0, 1)
    assert chosen == [(0, 10), (1, 11)]


def test_too_few_partitions_fail_naming_the_minimum() -> None:
    sampler = PartitionSampler(seed=0, wait_timeout=0.0)
    with pytest.raises(SamplingError, match="min-train-nodes = 5"):
        sampler.sample(_grid([1, 2, 3], num_partitions=3), 1, 1.0, 5)


def test_replies_are_summed_in_partition_order() -> None:
    grid = FakeGrid({30: 2, 10: 0, 20: 1})
    sampler = PartitionSampler(seed=0)
    sampler.sample(grid, 1, 1.0, 1)
    replies = [Message(RecordDict(), metadata=_from(n)) for n in (20, 99, 30, 10)]
    ordered = [m.metadata.src_node_id for m in sampler.in_partition_order(replies)]
    assert ordered == [10, 20, 30, 99]  # an unknown node last
