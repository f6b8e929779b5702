"""Flower ClientApp: unpack the Message, run the configured method, pack the reply."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .bn_refit import statistic_names
from .client import run_round
from .config import FAULT_KINDS, ConfigError, RunConfig
from .data import TensorData, load_partition
from .keys import ARRAYS_KEY, METRICS_KEY, NODE_INFO_KEY, NUM_EXAMPLES_KEY, PARTITION_ID_KEY
from .methods import get_method
from .records import arrays_to_record, record_to_arrays
from .task import build_model_for, data_config, load_state, model_spec, state_arrays
from .training import (
    TensorBatches,
    default_device,
    evaluate,
    keep_freed_memory,
    prepare_model,
    recompute_batchnorm_statistics,
    use_threads,
)

app = ClientApp()


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    """Process set-up before a message is handled: glibc keeps freed tensor memory for reuse
    (`training.keep_freed_memory`; process-wide and set once, ~15 % of a CPU training step)."""
    keep_freed_memory()
    yield


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round of the configured method; the reply is its encoded payload."""
    config = RunConfig.from_flower(context.run_config)
    use_threads(config.torch_threads)
    method = get_method(config.method)(config)
    partition_id, num_partitions = _partition(context)
    server_round = int(msg.content["config"]["server-round"])
    inject_fault(config, partition_id, server_round)  # test hook, off by default
    data = load_partition(data_config(config, num_partitions), partition_id)
    return run_round(method, data, msg, client_id=partition_id, memory=context.state)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which partition this node trains on (the server samples partitions, not node ids:
    sampling.py) and its torch thread count (the run's provenance)."""
    use_threads(RunConfig.from_flower(context.run_config).torch_threads)
    partition_id, num_partitions = _partition(context)
    info = MetricRecord(
        {
            PARTITION_ID_KEY: partition_id,
            "num-partitions": num_partitions,
            "torch-threads": torch.get_num_threads(),
        }
    )
    return Message(content=RecordDict({NODE_INFO_KEY: info}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """The received network on this client's data: its BatchNorm statistics measured afresh
    (the server pools them: bn_refit.py), then its loss and accuracy with them."""
    config = RunConfig.from_flower(context.run_config)
    use_threads(config.torch_threads)
    partition_id, num_partitions = _partition(context)
    data = load_partition(data_config(config, num_partitions), partition_id)
    statistics, loss, accuracy = measure_network(
        config, data, record_to_arrays(msg.content[ARRAYS_KEY])
    )
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": accuracy, NUM_EXAMPLES_KEY: len(data)})
    content = RecordDict({ARRAYS_KEY: arrays_to_record(statistics), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def measure_network(
    config: RunConfig, data: TensorData, arrays: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float, float]:
    """(BatchNorm statistics, loss, accuracy) of the network `arrays` on `data`: statistics
    from one pass in train mode (a cumulative average), then scored in eval mode with them."""
    device = default_device()
    model = build_model_for(config)
    load_state(model, arrays)
    model = prepare_model(model, device)
    generator = torch.Generator().manual_seed(config.seed)
    batches = TensorBatches(data.x, data.y, config.batch_size, generator)
    recompute_batchnorm_statistics(model, batches, device=device)
    loss, accuracy = evaluate(
        model, data.x, data.y, batch_size=config.eval_batch_size, device=device
    )
    measured = state_arrays(model)
    return {name: measured[name] for name in statistic_names(model_spec(model))}, loss, accuracy


def inject_fault(config: RunConfig, partition_id: int, server_round: int) -> None:
    """Test hook (tests/test_faults.py): make one partition's ClientApp fail, to show that the
    server treats the failure as a failed reply and the round proceeds without it.

    Run-config keys, only tests set them: `fault-partition` (default -1 = off) is the partition
    that fails, `fault-round` (default 0 = every round) the round, `fault-kind` how:
    "raise" (the ClientApp raises; Flower sends the server an error reply) or "hang" (it sleeps
    1.5 x `round-timeout`, so its reply comes too late, then trains as usual).
    """
    if config.get("fault-partition", -1) != partition_id:
        return
    if config.get("fault-round", 0) not in (0, server_round):
        return
    kind = config.get("fault-kind", "raise")
    if kind == "raise":
        raise RuntimeError(f"fault injected: partition {partition_id}, round {server_round}")
    if kind == "hang":
        time.sleep(1.5 * config.round_timeout)
        return
    raise ConfigError(f"run-config 'fault-kind' = {kind!r} is not allowed; allowed: {FAULT_KINDS}")


def _partition(context: Context) -> tuple[int, int]:
    """This node's partition, from `--node-config "partition-id=i num-partitions=N"`."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            f"node config lacks {exc}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<N>"'
        ) from None
