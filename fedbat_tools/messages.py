"""Flower reply Messages built in memory, for tools and tests that drive a strategy without
Flower's runtime (the matrix, the strategy tests)."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from fedbat_flwr.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY


def reply(
    node: int, arrays: ArrayRecord | None, num_examples: object = 10, **metrics: float
) -> Message:
    """A train reply from `node` carrying `arrays` (if any) and `num-examples` (unchecked:
    tests pass invalid values on purpose)."""
    content = RecordDict()
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    content[METRICS_KEY] = MetricRecord({NUM_EXAMPLES_KEY: num_examples, **metrics})  # type: ignore[dict-item]
    return Message(content=content, metadata=metadata_from(node))


def metadata_from(node: int, message_type: str = "train") -> Metadata:
    """The metadata of a reply from `node`, as the server sees it."""
    return Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
