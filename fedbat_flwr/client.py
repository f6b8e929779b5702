"""The client step of FedBAT (and of every method here) for anyone's Flower ClientApp.

A ClientApp that trains with Flower's quickstart code changes one call: instead of its own
training loop and `ArrayRecord(model.state_dict())` reply, it returns

    fedbat_flwr.client.train(model, trainloader, msg, context=context)

The server's strategy (`fedbat_flwr.FedBATStrategy`, `make_strategy`) names the method and its
client options in every train message's config, so the ClientApp needs no setting of its own;
keyword arguments override them. The model is any `nn.Module` whose `state_dict` the strategy
was built from; the loader yields (inputs, labels) batches. Its examples are gathered once into
tensors and reshuffled every epoch by a generator seeded by (seed, round, client), as the app's
own ClientApp does, so a reply repeats for the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from .config import RunConfig
from .data import TensorData
from .keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from .methods import Method, client_task, get_method
from .records import arrays_to_record, payload_to_record, record_to_arrays, record_to_payload

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # a DataLoader of (inputs, labels)
CONFIG_KEY = "config"  # the ConfigRecord of a train message (Flower's FedAvg default)
STATE_KEY = "method-state"  # a client's method memory (EF residual, virtual bits, ...)


def train(
    model: nn.Module,
    loader: Batches,
    msg: Message,
    *,
    context: Context | None = None,
    lr: float | None = None,
    local_epochs: int | None = None,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    device: torch.device | None = None,
) -> Message:
    """Train `model` on `loader` from the message's global weights as the message's method
    does; the reply carries the method's payload and `num-examples`.

    `context` keeps the method's memory across rounds (error feedback, virtual bits) in
    `context.state` and names the client (its `partition-id`, else its node id) for the seed.
    `lr`, `local_epochs`, `batch_size` and `options` (run-config keys, e.g. {"rho": 6.0})
    override what the strategy sent.
    """
    sent = {k: v for k, v in msg.content[CONFIG_KEY].items() if k != "server-round"}
    typed = {"lr": lr, "local-epochs": local_epochs, "batch-size": batch_size}
    overrides = {k: v for k, v in typed.items() if v is not None} | dict(options or {})
    config = RunConfig.from_flower({**sent, **overrides})
    method = get_method(config.method)(config)
    x, y = _gather(loader)
    return run_round(
        method,
        TensorData(x=x, y=y),
        msg,
        client_id=_client_id(context),
        memory=context.state if context is not None else None,
        model=model,
        device=device,
    )


def run_round(
    method: Method,
    data: TensorData,
    msg: Message,
    *,
    client_id: int,
    memory: RecordDict | None = None,
    model: nn.Module | None = None,
    device: torch.device | None = None,
) -> Message:
    """One local round of `method` on `data`, from the message's downlink, as a reply Message
    (what `train` and the app's ClientApp both do); `memory` is the client's `context.state`."""
    server_round = int(msg.content[CONFIG_KEY]["server-round"])
    kept = memory[STATE_KEY] if memory is not None and STATE_KEY in memory else ArrayRecord()
    state = record_to_arrays(kept)
    # The dense global model, or a method's own downlink payload (raw arrays) it decodes.
    downlink = record_to_payload(msg.content[ARRAYS_KEY])
    task = client_task(
        method,
        data,
        downlink,
        partition_id=client_id,
        server_round=server_round,
        state=state,
        device=device,
        model=model,
    )
    update = method.train(task)
    if task.state and memory is not None:
        memory[STATE_KEY] = arrays_to_record(task.state)
    pack = arrays_to_record if method.payload_kind == "dense" else payload_to_record
    metrics = MetricRecord({NUM_EXAMPLES_KEY: update.num_examples, **update.metrics})
    content = RecordDict({ARRAYS_KEY: pack(update.payload), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def _gather(loader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (inputs, labels) batch of `loader`, concatenated (dict batches: first two values)."""
    xs, ys = [], []
    for batch in loader:
        x, y = list(batch.values())[:2] if isinstance(batch, Mapping) else batch
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError("the loader yielded no batches; a client needs at least one example")
    return torch.cat(xs), torch.cat(ys).long()


def _client_id(context: Context | None) -> int:
    """The client's partition id (simulation, or a SuperNode's --node-config), else node id."""
    if context is None:
        return 0
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(np.uint32(context.node_id & 0xFFFFFFFF))
