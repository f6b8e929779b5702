"""FedAvg (McMahan et al., 2017): plain local SGD, dense float32 weights, Flower's FedAvg."""

from __future__ import annotations

from ..task import state_arrays
from ..training import run_sgd
from .base import ClientUpdate, LocalTask, Method, register


@register
class FedAvg(Method):
    """The uncompressed reference every compressor is measured against."""

    name = "fedavg"
    payload_kind = "dense"

    def train(self, task: LocalTask) -> ClientUpdate:
        params = [p for p in task.model.parameters() if p.requires_grad]
        _, loss = run_sgd(
            task.model,
            params,
            task.batches,
            epochs=self.config.local_epochs,
            lr=self.config.lr,
            device=task.device,
        )
        payload = state_arrays(task.model)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})
