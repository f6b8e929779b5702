"""Noisy-SignSGD (Chen et al., 2020): Gaussian noise before the sign makes it unbiased in mean.

Send sign(m + z), z ~ N(0, sigma^2) per entry, with a fixed alpha; Appendix A.2 sets
alpha = 0.01 (`noisy-alpha`) and sigma = 0.01 (`noisy-sigma`). BatchNorm running statistics
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
class NoisySignSGD(Method):
    """SignSGD on a Gaussian-perturbed update."""

    name = "noisy-signsgd"
    payload_kind = "signs"  # the parameter alpha is exactly noisy-alpha (step_bounds)
    options = ("bn-payload", "noisy-alpha", "noisy-sigma")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.alpha = noisy_alpha(config)
        self.sigma = option(
            config, "noisy-sigma", 0.01, lambda s: math.isfinite(s) and s >= 0, "a float >= 0"
        )

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The server accepts exactly the configured `noisy-alpha` as a parameter's alpha: a
        client cannot buy influence with a larger step."""
        alpha = noisy_alpha(config)
        return replace(super().step_bounds(config), param=(alpha, alpha))

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        rng = np.random.default_rng(task.seed)
        params = signed_params(task)
        bits = {t.name: noisy_sign_bits(delta[t.name], self.sigma, rng) for t in params}
        alphas = {t.name: self.alpha for t in params}
        payload = encode_param_signs(task, delta, bits, alphas)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


def noisy_sign_bits(m: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """sign(m + N(0, sigma^2)) as bits (True = +alpha)."""
    return m + rng.normal(0.0, sigma, size=m.shape) >= 0


def noisy_alpha(config: RunConfig) -> float:
    """`noisy-alpha`: the fixed step size, read alike by the clients and the server."""
    return option(config, "noisy-alpha", 0.01, lambda a: math.isfinite(a) and a > 0, "a float > 0")
