"""Noisy-SignSGD (Chen et al., 2020): Gaussian noise before the sign makes it unbiased in mean.

Send sign(m + z), z ~ N(0, sigma^2) per entry, with a fixed alpha; Appendix A.2 sets
alpha = 0.01 (`noisy-alpha`) and sigma = 0.01 (`noisy-sigma`). BatchNorm running statistics
travel 1-bit with alpha = mean|delta| (`stat_signs`), refitted to the sent weights
first (`encode_param_signs`).
"""

from __future__ import annotations

import math

import numpy as np

from ..config import RunConfig
from .base import register
from .common import FixedStepSigns, option


@register
class NoisySignSGD(FixedStepSigns):
    """SignSGD on a Gaussian-perturbed update."""

    name = "noisy-signsgd"
    alpha_key, alpha_default = "noisy-alpha", 0.01
    options = ("bn-payload", "noisy-alpha", "noisy-sigma")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.sigma = option(
            config, "noisy-sigma", 0.01, lambda s: math.isfinite(s) and s >= 0, "a float >= 0"
        )

    def sign_bits(self, m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return noisy_sign_bits(m, self.sigma, rng)


def noisy_sign_bits(m: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """sign(m + N(0, sigma^2)) as bits (True = +alpha)."""
    return m + rng.normal(0.0, sigma, size=m.shape) >= 0
