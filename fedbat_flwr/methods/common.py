"""Pieces several methods share: the update a client made, and 1-bit BatchNorm statistics."""

from __future__ import annotations

import numpy as np

from ..task import state_arrays
from .base import LocalTask


def local_delta(task: LocalTask) -> dict[str, np.ndarray]:
    """The client's update of every exchanged tensor, in each tensor's update domain."""
    return task.spec.delta(state_arrays(task.model), task.global_state)


def stat_signs(task: LocalTask) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """BatchNorm running statistics as sign bits with alpha = mean |delta| (docs/ARCHITECTURE.md).

    Statistics are not trained by gradients, so no method learns their binarization; every 1-bit
    method sends them the way EF-SignSGD sends its update.
    """
    delta = local_delta(task)
    bits: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    for tensor in task.spec:
        if tensor.kind == "stat":
            d = delta[tensor.name]
            bits[tensor.name] = d >= 0
            alphas[tensor.name] = float(np.abs(d).mean()) if d.size else 0.0
    return bits, alphas
