"""FedAvg (McMahan et al., 2017): plain local SGD, dense float32 weights, Flower's FedAvg."""

from __future__ import annotations

from ..task import state_arrays
from .base import ClientUpdate, LocalTask, Method, register
from .common import train_plain


@register
class FedAvg(Method):
    """The uncompressed reference every compressor is measured against."""

    name = "fedavg"
    payload_kind = "dense"

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        payload = state_arrays(task.model)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})
