"""Stoc-SignSGD (Safaryan & Richtarik, 2021): stochastic sign, unbiased up to the step size.

Entry i is sent as +1 with probability 1/2 + m_i / (2 ||m||_inf) and -1 otherwise, so
E[||m||_inf * sign] = m. Appendix A.2 uses ||m||_inf per tensor (not ||m||_2, which makes both
probabilities ~1/2) and a fixed alpha = 0.01 (`stoc-alpha`). BatchNorm running statistics
travel 1-bit with alpha = mean|delta| (`stat_signs`), refitted to the sent weights
first (`encode_param_signs`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..config import RunConfig
from ..wire import AlphaBounds
from .base import ClientUpdate, LocalTask, Method, register
from .common import encode_param_signs, local_delta, option, signed_params, train_plain


@register
class StocSignSGD(Method):
    """SignSGD with the sign drawn at random, biased towards the update's sign."""

    name = "stoc-signsgd"
    payload_kind = "signs"  # the parameter alpha is exactly stoc-alpha (step_bounds)
    options = ("bn-payload", "stoc-alpha")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.alpha = stoc_alpha(config)

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The server accepts exactly the configured `stoc-alpha` as a parameter's alpha: a
        client cannot buy influence with a larger step."""
        alpha = stoc_alpha(config)
        return replace(super().step_bounds(config), param=(alpha, alpha))

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        rng = np.random.default_rng(task.seed)
        params = signed_params(task)
        bits = {t.name: stochastic_sign_bits(delta[t.name], rng) for t in params}
        alphas = {t.name: self.alpha for t in params}
        payload = encode_param_signs(task, delta, bits, alphas)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


def stochastic_sign_bits(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bits with P(True) = 1/2 + m_i / (2 ||m||_inf) (1/2 everywhere when m = 0)."""
    scale = float(np.abs(m).max()) if m.size else 0.0
    p_plus = 0.5 + m / (2.0 * scale) if scale > 0 else np.full(m.shape, 0.5)
    return rng.random(m.shape) < p_plus


def stoc_alpha(config: RunConfig) -> float:
    """`stoc-alpha`: the fixed step size, read alike by the clients and the server."""
    return option(config, "stoc-alpha", 0.01, lambda a: math.isfinite(a) and a > 0, "a float > 0")
