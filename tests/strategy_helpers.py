"""Hand-built Flower replies for strategy tests (no runtime needed)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.app.error import Error

from fedbat_flwr.methods.server.fedbif import FedBiFPart
from fedbat_flwr.records import payload_to_record
from fedbat_flwr.strategy import ValidatingStrategy, build_strategy
from fedbat_flwr.wire import AlphaBounds, ModelSpec, TensorSpec, encode_signs
from fedbat_tools.messages import metadata_from, reply

__all__ = ["FEDBIF_SPEC", "error_reply", "fedbif_strategy", "reply", "signs_record"]

# The smallest model FedBiF's replies cover: a quantized conv weight, a BatchNorm parameter
# and a log-domain running statistic (both sent as 1 bit + alpha).
FEDBIF_SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (1, 2)),
        TensorSpec("bn.weight", (2,)),
        TensorSpec("bn.running_var", (2,), kind="stat", domain="log"),
    )
)


def error_reply(node: int, reason: str = "ClientApp raised") -> Message:
    return Message(error=Error(code=1, reason=reason), metadata=metadata_from(node))


def signs_record(spec: ModelSpec, rng: np.random.Generator, alpha: float = 0.01) -> ArrayRecord:
    """A valid 1-bit payload with random signs and the same alpha everywhere."""
    bits = {t.name: rng.random(t.shape) < 0.5 for t in spec}
    return payload_to_record(encode_signs(spec, bits, dict.fromkeys(spec.names, alpha)))


def fedbif_strategy(bounds: AlphaBounds) -> ValidatingStrategy:
    """A round-1 strategy over FEDBIF_SPEC with FedBiF's server part (m = 4, one bit a round:
    bit 3 in round 1); global conv weight [-0.8, 0.4], BatchNorm tensors ones."""
    part = FedBiFPart(FEDBIF_SPEC, 4, 1, "cycle", seed=0)
    strategy = build_strategy(
        "fedavg", spec=FEDBIF_SPEC, payload_kind="fedbif-bits", bounds=bounds,
        max_num_examples=100, min_train_nodes=1, part=part,
    )  # fmt: skip
    strategy.global_arrays = {
        "conv.weight": np.array([[-0.8, 0.4]], np.float32),
        "bn.weight": np.ones(2, np.float32),
        "bn.running_var": np.ones(2, np.float32),
    }
    return strategy
