"""Every registered method, run the way the ClientApp runs it, decodes the way the server does.

CNN4 on 64 real Fashion-MNIST examples (one local epoch = one batch): the client side is built
as in `client_app.train`, the reply travels as an ArrayRecord, and the server side validates it
and aggregates it through the strategy and the method's server part, as `server_app` builds them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import DataUnavailableError, load_partition
from fedbat_flwr.methods import client_task, get_method, method_names
from fedbat_flwr.records import (
    arrays_to_record,
    payload_to_record,
    record_to_arrays,
    record_to_payload,
)
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.task import (
    build_model_for,
    data_config,
    load_state,
    model_spec,
    state_arrays,
)
from fedbat_flwr.training import evaluate
from tests.strategy_helpers import reply

NUM_PARTITIONS = 10
PARTITION = 3


@pytest.fixture(scope="module")
def partition():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: one intra-op thread is faster for CNN4
    config = RunConfig(max_examples_per_client=64)
    try:
        yield load_partition(data_config(config, NUM_PARTITIONS), PARTITION)
    except DataUnavailableError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", method_names())
def test_method_round_trip_on_cnn4(name: str, partition) -> None:
    config = RunConfig(method=name, max_examples_per_client=64, local_epochs=1)
    server_round = 1
    initial = build_model_for(config)
    spec = model_spec(initial)
    # What the ServerApp sends: the downlink of the method's server part.
    part = get_method(name)(config).server_part(spec)
    server_global = part.initial(state_arrays(initial))
    global_record = part.downlink(server_global, server_round)

    # Client side, as client_app.train builds it.
    method = get_method(config.method)(config)
    downlink = record_to_payload(global_record)
    task = client_task(
        method,
        partition,
        downlink,
        partition_id=PARTITION,
        server_round=server_round,
        device=torch.device("cpu"),
    )
    update = method.train(task)
    assert update.num_examples == 64
    assert all(np.isfinite(v) for v in update.metrics.values())
    pack = arrays_to_record if method.payload_kind == "dense" else payload_to_record
    record = pack(update.payload)
    if task.state:  # client memory survives the ClientApp's context.state round trip
        restored = record_to_arrays(arrays_to_record(task.state))
        assert set(restored) == set(task.state)

    # Server side, through the strategy the ServerApp builds: validate, then aggregate.
    strategy = build_strategy(
        method.aggregator(config),
        part=part,
        spec=spec,
        payload_kind=method.payload_kind,
        bounds=method.step_bounds(config),
        max_num_examples=config.max_num_examples,
        min_train_nodes=1,
    )
    strategy.global_arrays = server_global
    arrays, _ = strategy.aggregate_train(server_round, [reply(1, record, 64, **update.metrics)])
    assert arrays is not None and strategy.rounds[server_round].num_rejected == 0
    new = part.eval_arrays(record_to_arrays(arrays))
    server_global = part.eval_arrays(server_global)
    assert set(new) == set(spec.names)
    for tensor_name, value in new.items():
        assert value.shape == spec[tensor_name].shape
        assert np.isfinite(value).all(), tensor_name
    assert any(not np.array_equal(new[k], server_global[k]) for k in new)  # the model moved

    evaluator = build_model_for(config)
    load_state(evaluator, new)
    loss, accuracy = evaluate(evaluator, partition.x, partition.y, device=task.device)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
