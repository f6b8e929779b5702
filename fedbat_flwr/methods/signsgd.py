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

import math
from dataclasses import replace

from ..config import ConfigError, RunConfig
from ..wire import AlphaBounds
from .base import ClientUpdate, LocalTask, Method, register
from .common import encode_param_signs, local_delta, option, signed_params, train_plain

SIGN_AGGREGATIONS = ("mean", "majority")


@register
class SignSGD(Method):
    """The 1-bit baseline every other sign method improves on."""

    name = "signsgd"
    payload_kind = "signs"  # the parameter alpha is exactly signsgd-alpha (step_bounds)
    options = ("bn-payload", "signsgd-alpha", "sign-aggregation")

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.alpha = signsgd_alpha(config)
        self.aggregator(config)  # `sign-aggregation` checked wherever the method is built

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The server accepts exactly the configured `signsgd-alpha` as a parameter's alpha: a
        client cannot buy influence with a larger step."""
        alpha = signsgd_alpha(config)
        return replace(super().step_bounds(config), param=(alpha, alpha))

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

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        params = signed_params(task)
        bits = {t.name: delta[t.name] >= 0 for t in params}
        alphas = {t.name: self.alpha for t in params}
        payload = encode_param_signs(task, delta, bits, alphas)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


def signsgd_alpha(config: RunConfig) -> float:
    """`signsgd-alpha`: the fixed step size, read alike by the clients and the server."""
    return option(
        config, "signsgd-alpha", 0.001, lambda a: math.isfinite(a) and a > 0, "a float > 0"
    )
