"""What the server broadcasts each round: the master model in float32, or a quantized copy.

Run-config ``downlink-bits`` (wire/downlink.py). The server keeps the full-precision master
weights and applies every aggregated update to them; clients train from the decoded broadcast.
Replies that carry weights rather than updates (FedAvg, BiFL) were trained from the broadcast,
so `rebase` moves them onto the master before they are averaged: the master never absorbs the
broadcast's rounding noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

from .records import payload_to_record
from .wire import ModelSpec
from .wire.downlink import decode_downlink, encode_downlink

# Stream of the run seed that draws the broadcast's rounding noise (apart from every other use).
_NOISE_STREAM = 0xD0


class Broadcast:
    """The round's downlink: `encode` it once, `rebase` weights trained from it."""

    def __init__(self, spec: ModelSpec, bits: int, seed: int) -> None:
        self.spec = spec
        self.bits = bits
        self.seed = seed
        self.sent: dict[str, np.ndarray] | None = None  # the model clients decode this round

    def encode(self, master: Mapping[str, np.ndarray], server_round: int) -> ArrayRecord | None:
        """The quantized broadcast of ``master`` (None: send the dense float32 model).

        The rounding noise comes from (run seed, round): a resumed round sends the same bytes.
        """
        if self.bits == 32:
            self.sent = None
            return None
        rng = np.random.default_rng([self.seed, server_round, _NOISE_STREAM])
        payload = encode_downlink(self.spec, master, self.bits, rng)
        self.sent = decode_downlink(payload, self.spec)
        return payload_to_record(payload)

    def rebase(
        self, weights: Mapping[str, np.ndarray], master: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Weights a client trained from the broadcast, as if it had started from ``master``:
        ``master (+) (weights (-) broadcast)``, each tensor in its update domain."""
        if self.sent is None:
            return dict(weights)
        return self.spec.apply(master, self.spec.delta(weights, self.sent))
