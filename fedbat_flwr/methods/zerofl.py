"""ZeroFL (Qiu et al., 2022): sparse local training (SWAT) and a 97%-sparse upload of the update.

Local training follows SWAT (Raihan & Aamodt, 2020) for the weights: in the forward pass every
conv / linear layer uses only its largest-|w| fraction (1 - s) of weights (`zerofl-sparsity`,
default 0.9, ZeroFL's sparsest setting); the backward pass propagates errors through those same
sparse weights and gives *every* weight its gradient (straight-through), so the kept set can
change from step to step. Not implemented: SWAT's top-k sparsification of the activations kept
for the backward pass, which saves compute and memory but changes no bit on the wire.

The server's bound on a reply's update entries is ZeroFL's own (`zerofl-max-update-entry`), not
the `max-update-entry` calibrated on FedAvg-like updates: a weight outside the forward pass still
gets its gradient but never changes the loss, so it drifts by lr x steps x |gradient| with nothing
pulling it back; honest first-layer updates are far above FedAvg's (docs/ARCHITECTURE.md,
"Influence of one client", has the measurement). The bound only keeps sums finite; a hostile
ZeroFL client is bounded by a robust aggregator (median, trimmed mean, Krum), not by it. The
BatchNorm statistics follow the weights' scale (with FedAdam the first layer's running mean moved
by 21-50 in a round), so the same bound covers them.

Upload as `topk` (Appendix A.2: "prune the model updates after training", 97% sparsity): per
parameter tensor the largest `zerofl-density` (0.03) of |update| as float32 values with compact
positions; BatchNorm running statistics whole, refitted to the sent update (`encode_top_k`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..config import RunConfig
from ..wire import AlphaBounds
from .base import ClientUpdate, LocalTask, Method, register
from .common import encode_top_k, local_delta, option, parametrized_weights, train_plain

MAX_UPDATE_KEY = "zerofl-max-update-entry"


class TopKWeights(nn.Module):
    """The forward pass sees w where |w| is among the top (1 - sparsity); the gradient is dense."""

    def __init__(self, sparsity: float) -> None:
        super().__init__()
        self.sparsity = sparsity

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        keep = max(1, math.ceil(round((1.0 - self.sparsity) * w.numel(), 9)))
        magnitude = w.detach().abs()
        threshold = magnitude.flatten().kthvalue(w.numel() - keep + 1).values
        return w + (w * (magnitude >= threshold) - w).detach()


@register
class ZeroFL(Method):
    """SWAT local training (sparse weights forward, dense weight gradients), top-k upload."""

    name = "zerofl"
    payload_kind = "sparse"
    options = ("zerofl-sparsity", "zerofl-density", "zerofl-max-update-entry")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.sparsity = option(
            config, "zerofl-sparsity", 0.9, lambda s: 0.0 <= s < 1.0, "a float in [0, 1)"
        )
        self.density = option(
            config, "zerofl-density", 0.03, lambda r: 0.0 < r <= 1.0, "a float in (0, 1]"
        )
        self.step_bounds(config)  # its bound is checked at start-up with the other options

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The run's bounds, with ZeroFL's own bound on an update entry (module docstring)."""
        bound = option(
            config, MAX_UPDATE_KEY, 1e6, lambda b: 0.0 < b < math.inf, "a float in (0, inf)"
        )
        bounds = super().step_bounds(config)
        return replace(bounds, update=bound, stat=(0.0, max(bounds.stat[1], bound)))

    def train(self, task: LocalTask) -> ClientUpdate:
        with parametrized_weights(task.model, lambda: TopKWeights(self.sparsity)):
            loss = train_plain(task)
        payload = encode_top_k(task, local_delta(task), self.density)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})
