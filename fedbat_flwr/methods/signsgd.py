"""SignSGD (Bernstein et al., 2018) on model updates: alpha * sign(m), alpha fixed (Eq. 3).

Appendix A.2 tunes alpha in {1, 0.1, 0.01, 0.001} and sets 0.001 (`signsgd-alpha`). A zero entry
of m is sent as +alpha (one bit has no zero). BatchNorm running statistics travel 1-bit with
alpha = mean|delta| (`stat_signs`), refitted to the
sent weights first (`encode_param_signs`), as for every sign method.

`sign-aggregation = "majority"` selects the server's weighted majority vote (Bernstein et al.,
2019) instead of the mean of Eq. 3; it maps onto `aggregator = "majority"`, which any sign
method may use directly.
"""

from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import register
from .common import FixedStepSigns, option

SIGN_AGGREGATIONS = ("mean", "majority")


@register
class SignSGD(FixedStepSigns):
    """The 1-bit baseline every other sign method improves on."""

    name = "signsgd"
    alpha_key, alpha_default = "signsgd-alpha", 0.001
    options = ("bn-payload", "signsgd-alpha", "sign-aggregation")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.aggregator(config)  # `sign-aggregation` checked wherever the method is built

    @classmethod
    def aggregator(cls, config: RunConfig) -> str:
        """`sign-aggregation = "majority"` selects the vote; "mean" keeps `aggregator`."""
        mode = option(
            config, "sign-aggregation", "mean", SIGN_AGGREGATIONS.__contains__, "mean, majority"
        )
        if mode == "mean":
            return config.aggregator
        if config.aggregator not in ("fedavg", "majority"):
            raise ConfigError(
                f"run-config 'sign-aggregation' = 'majority' conflicts with 'aggregator' = "
                f"{config.aggregator!r}; allowed: aggregator 'fedavg' or 'majority'"
            )
        return "majority"
