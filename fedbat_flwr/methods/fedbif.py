"""FedBiF (bits freezing): every client trains only the activated bit of each m-bit weight.

Server (`FedBiFPart`): each round it quantizes the global model's conv / linear weights to m bits
(Eq. 5, stochastic rounding seeded by (seed, round)) and sends the packed integers with one alpha
per tensor, ~m bits per parameter down (`wire.fedbif`). After the round, Eq. 6:

    theta_l <- alpha_l * (sum_k p_k sum_{i in S} 2^i b_ilk + sum_{j not in S} 2^j b_jl - 2^(m-1))

with p_k = n_k / sum n (the paper's 1/|C| when clients hold equal data).

Client (`FedBiF.train`): the weight is seen through `torch.nn.utils.parametrize` as
``alpha * (sum_i 2^i b_i - 2^(m-1))`` with the activated bits b_i = h(v_i) of real-valued
virtual bits v_i (forward: step h(v) = [v > 0], backward: straight-through) and every other bit
frozen at its received value. Virtual bits inheritance (VBI): the magnitudes of the client's
virtual bits from its last round (Kaiming-initialised at first) get the signs of the received
bits. Only the activated bits travel up: 1 bit per weight per activated bit.

The activated bits come from a selector all clients and the server share: "cycle" walks through
the bits without overlap, most significant first (m = 4, one bit: 3, 2, 1, 0, 3, ...); "random"
draws them from a generator seeded by (seed, round).

BatchNorm (decided, docs/ARCHITECTURE.md): its affine parameters and running statistics (and any
1-D bias) are not bit-trained -- a 4-bit zero-centred grid cannot hold weights near 1, and a
zero-initialised bias would get alpha = 0 and never move. They go down as float16 and come back
as sign(update) with alpha = mean |update|, trained in full precision locally, as every 1-bit
method here sends BatchNorm statistics. On CNN4 that is 0.5% of the entries.

Keys: `fedbif-bits` (m, default 4), `fedbif-active-bits` (default 1), `fedbif-selector`
("cycle" | "random"), `fedbif-init-scale` (default 1: the paper's Kaiming magnitudes). The
paper trains 5 local epochs (`local-epochs = 5`).

Why `fedbif-init-scale`: a virtual bit's straight-through gradient is dL/dw * alpha * 2^i, with
alpha = max|w| / 2^(m-1) (Eq. 5), far smaller than a Kaiming magnitude sqrt(2 / fan_in); with
the paper's initialisation a CNN4 client on 3 labels flips 0.9 % of its activated bits in 10
local epochs and ends the round at training loss 0.92; at 0.1 / 0.01 times those magnitudes it
flips 2.2 % / 7.0 % and ends at 0.42 / 0.36 (one client, round 1, measured 2026-12-03).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..training import run_sgd
from ..training.loop import keep_strides  # channels_last
from ..wire import ModelSpec, PayloadError
from ..wire.binary import split_spec
from ..wire.fedbif import (
    FedBiFModel,
    bit_planes,
    encode_fedbif_bits,
    validate_fedbif_model,
)
from ..wire.kbit import MAX_BITS
from .base import ClientUpdate, LocalTask, Method, register
from .common import option, parametrized_by_name, require_fedavg, update_signs

if TYPE_CHECKING:  # the server side loads only where a server runs (tests/test_doors.py)
    from ..server_part import ServerPart

SELECTORS = ("cycle", "random")
STATE_PREFIX = "virtual-bits/"
MIN_MAGNITUDE = 1e-6  # a virtual bit of magnitude 0 would read as b = 0 whatever it received


def active_bits(
    selector: str, bits: int, count: int, seed: int, server_round: int
) -> tuple[int, ...]:
    """The bits every client trains in ``server_round`` (ascending)."""
    if selector == "cycle":
        start = bits - 1 - ((server_round - 1) * count) % bits
        chosen = {(start - j) % bits for j in range(count)}
    else:
        rng = np.random.default_rng([seed, server_round])
        chosen = {int(i) for i in rng.choice(bits, size=count, replace=False)}
    return tuple(sorted(chosen))


# --- client: the parametrization and virtual bits -----------------------------------------


class ActiveBits(nn.Module):
    """``w + alpha * sum_j 2^(i_j) (h(v_j) - b_j)``: the received weight w = alpha * q with its
    activated bits b replaced by the steps of their virtual bits v (straight-through)."""

    def __init__(self, virtual: torch.Tensor, received: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.virtual = nn.Parameter(virtual)
        self.register_buffer("received", received)
        self.register_buffer("scales", scales.reshape(-1, *([1] * (virtual.dim() - 1))))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v = self.virtual
        step = v + ((v > 0).to(v.dtype) - v).detach()
        change = (self.scales * (step - self.received)).sum(0)
        return keep_strides(w + change, w)


def inherit(
    previous: np.ndarray | None, planes: np.ndarray, fresh: np.ndarray | None = None
) -> np.ndarray:
    """VBI: the magnitudes of last round's virtual bits (``fresh`` at first), signed by the
    received bits ``planes`` (m, ...), so h(v) reproduces the received integer exactly."""
    if previous is not None and previous.shape != planes.shape:
        raise ValueError(
            f"virtual bits have shape {previous.shape}, the received bits {planes.shape}: "
            "the client state belongs to another model or bit width"
        )
    source = previous if previous is not None else fresh
    if source is None:
        raise ValueError("a client's first round needs fresh (Kaiming) magnitudes")
    magnitude = np.maximum(np.abs(source), MIN_MAGNITUDE)
    return np.where(planes, magnitude, -magnitude).astype(np.float32)


def kaiming_magnitudes(shape: Sequence[int], bits: int, generator: torch.Generator) -> np.ndarray:
    """|N(0, 2 / fan_in)| for each of the m virtual bits of a weight of ``shape``."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    draws = torch.randn((bits, *shape), generator=generator) * (2.0 / fan_in) ** 0.5
    return draws.abs().numpy()


# --- the method ---------------------------------------------------------------------------


@register
class FedBiF(Method):
    """Bits freezing: train and send the activated bits; the server applies Eq. 6."""

    name = "fedbif"
    payload_kind = "fedbif-bits"
    options = ("fedbif-bits", "fedbif-active-bits", "fedbif-selector", "fedbif-init-scale")
    own_downlink = True

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        require_fedavg(config)
        self.bits, self.count, self.selector, self.init_scale = fedbif_options(config)

    def server_part(self, spec: ModelSpec) -> ServerPart:
        from .server.fedbif import FedBiFPart

        return FedBiFPart(spec, self.bits, self.count, self.selector, seed=self.config.seed)

    def receive(
        self,
        payload: Mapping[str, np.ndarray],
        spec: ModelSpec,
        state: MutableMapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        return self._model(payload, spec).weights()

    def train(self, task: LocalTask) -> ClientUpdate:
        received = self._model(task.downlink, task.spec)
        active = active_bits(
            self.selector, self.bits, self.count, self.config.seed, task.server_round
        )
        parts = self._parts(task, received, active)
        quantized = set(parts)
        others = [p for n, p in task.model.named_parameters() if n not in quantized]
        with parametrized_by_name(task.model, parts):
            trainable = [part.virtual for part in parts.values()] + others
            _, loss = run_sgd(
                task.model,
                trainable,
                task.batches,
                epochs=self.config.local_epochs,
                lr=self.config.lr,
                device=task.device,
            )
        planes, flipped = {}, 0.0
        for name, part in parts.items():
            trained = part.virtual.detach().cpu().numpy()
            planes[name] = trained > 0
            flipped += float((planes[name] != part.received.cpu().numpy().astype(bool)).sum())
            stored = task.state[STATE_PREFIX + name]
            stored[list(active)] = trained
        payload = self._encode(task, active, planes)
        total = sum(p.virtual.numel() for p in parts.values())
        metrics = {"train-loss": loss, "flipped-bits": flipped / max(total, 1)}
        return ClientUpdate(payload, task.batches.num_examples, metrics)

    def _model(self, payload: Mapping[str, np.ndarray], spec: ModelSpec) -> FedBiFModel:
        model = validate_fedbif_model(payload, spec)
        if model.bits != self.bits:
            raise PayloadError(None, "header", f"bits={model.bits} (run config: {self.bits})")
        return model

    def _parts(
        self, task: LocalTask, received: FedBiFModel, active: tuple[int, ...]
    ) -> dict[str, ActiveBits]:
        """One `ActiveBits` per weight; the full virtual bits (VBI) go to ``task.state``."""
        generator = torch.Generator().manual_seed(task.seed)
        parts = {}
        for name, codes in received.codes.items():
            planes = bit_planes(codes, self.bits)
            previous = task.state.get(STATE_PREFIX + name)
            fresh = (
                None
                if previous is not None
                else self.init_scale * kaiming_magnitudes(codes.shape, self.bits, generator)
            )
            virtual = inherit(previous, planes, fresh)
            task.state[STATE_PREFIX + name] = virtual
            scales = torch.tensor([received.alphas[name] * 2.0**i for i in active])
            parts[name] = ActiveBits(
                torch.from_numpy(virtual[list(active)].copy()).to(task.device),
                torch.from_numpy(planes[list(active)].astype(np.float32)).to(task.device),
                scales.to(task.device),
            )
        return parts

    def _encode(
        self, task: LocalTask, active: tuple[int, ...], planes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The activated bits, and sign(update) + mean |update| for the other tensors."""
        _, others = split_spec(task.spec)
        signs, alphas = update_signs(task, others)
        return encode_fedbif_bits(task.spec, self.bits, active, planes, signs, alphas)


def fedbif_options(config: RunConfig) -> tuple[int, int, str, float]:
    """(m, activated bits per round, selector, initial virtual-bit scale), checked once."""
    bits = option(
        config, "fedbif-bits", 4, lambda m: 2 <= m <= MAX_BITS, f"an integer in [2, {MAX_BITS}]"
    )
    count = option(
        config,
        "fedbif-active-bits",
        1,
        lambda s: 1 <= s <= bits,
        f"an integer in [1, fedbif-bits = {bits}]",
    )
    selector = option(
        config, "fedbif-selector", "cycle", SELECTORS.__contains__, ", ".join(SELECTORS)
    )
    init_scale = option(
        config, "fedbif-init-scale", 1.0, lambda s: math.isfinite(s) and s > 0, "a float > 0"
    )
    return bits, count, selector, init_scale
