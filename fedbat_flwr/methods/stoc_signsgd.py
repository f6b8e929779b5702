"""Stoc-SignSGD (Safaryan & Richtarik, 2021): stochastic sign, unbiased up to the step size.

Entry i is sent as +1 with probability 1/2 + m_i / (2 ||m||_inf) and -1 otherwise, so
E[||m||_inf * sign] = m. Appendix A.2 uses ||m||_inf per tensor (not ||m||_2, which makes both
probabilities ~1/2) and a fixed alpha = 0.01 (`stoc-alpha`). BatchNorm running statistics
travel 1-bit with alpha = mean|delta| (`stat_signs`), refitted to the sent weights
first (`encode_param_signs`).
"""

from __future__ import annotations

import numpy as np

from .base import register
from .common import FixedStepSigns


@register
class StocSignSGD(FixedStepSigns):
    """SignSGD with the sign drawn at random, biased towards the update's sign."""

    name = "stoc-signsgd"
    alpha_key, alpha_default = "stoc-alpha", 0.01
    options = ("bn-payload", "stoc-alpha")

    def sign_bits(self, m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return stochastic_sign_bits(m, rng)


def stochastic_sign_bits(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bits with P(True) = 1/2 + m_i / (2 ||m||_inf) (1/2 everywhere when m = 0)."""
    scale = float(np.abs(m).max()) if m.size else 0.0
    p_plus = 0.5 + m / (2.0 * scale) if scale > 0 else np.full(m.shape, 0.5)
    return rng.random(m.shape) < p_plus
