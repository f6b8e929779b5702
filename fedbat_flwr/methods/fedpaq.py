"""FedPAQ (Reisizadeh et al., 2020): unbiased stochastic k-bit quantization of the update.

Every exchanged tensor's update (BatchNorm statistics too, in their domain) is quantized onto
2^k uniform levels over [-||m||_inf, ||m||_inf] with stochastic rounding (`wire.kbit`) and sent
as densely packed k-bit codes plus one float32 scale: k bits per parameter plus overhead.
Appendix B reports k = 3 and 4 (`quant-bits`, default 4).
"""

from __future__ import annotations

import numpy as np

from ..config import RunConfig
from ..wire import encode_kbit, quantize_stochastic
from ..wire.kbit import MAX_BITS
from .base import ClientUpdate, LocalTask, Method, register
from .common import local_delta, option, train_plain


@register
class FedPAQ(Method):
    """Local SGD, then a k-bit unbiased quantizer on the update."""

    name = "fedpaq"
    payload_kind = "kbit"
    options = ("quant-bits",)

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.bits = option(
            config, "quant-bits", 4, lambda k: 1 <= k <= MAX_BITS, f"an integer in [1, {MAX_BITS}]"
        )

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        rng = np.random.default_rng(task.seed)
        codes: dict[str, np.ndarray] = {}
        scales: dict[str, float] = {}
        for t in task.spec:
            codes[t.name], scales[t.name] = quantize_stochastic(delta[t.name], self.bits, rng)
        payload = encode_kbit(task.spec, codes, scales, self.bits)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})
