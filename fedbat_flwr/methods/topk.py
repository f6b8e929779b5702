"""Top-k sparsification of the update: keep the largest 3% |m| entries of each tensor.

Appendix A.2 prunes ZeroFL's update to 97% sparsity "to ensure a communication compression ratio
similar to the binarization methods"; this is that upload after plain local SGD (`zerofl` adds
ZeroFL's sparse local training). Per parameter tensor ceil(density * d) entries are kept
(`topk-density`, default 0.03; at least one); kept values go as float32 with compact positions
(`wire.sparse`). BatchNorm running statistics are few (0.25% of CNN4) and a 3% sample of them
would leave the global statistics stale, so they are sent whole (format "all", counted),
refitted first to the model the server builds from the kept entries (`encode_top_k`).
"""

from __future__ import annotations

from ..config import RunConfig
from .base import ClientUpdate, LocalTask, Method, register
from .common import encode_top_k, local_delta, option, train_plain


@register
class TopK(Method):
    """Local SGD, then the largest-magnitude entries of each tensor's update."""

    name = "topk"
    payload_kind = "sparse"
    options = ("topk-density",)

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.density = option(
            config, "topk-density", 0.03, lambda r: 0.0 < r <= 1.0, "a float in (0, 1]"
        )

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        payload = encode_top_k(task, local_delta(task), self.density)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})
