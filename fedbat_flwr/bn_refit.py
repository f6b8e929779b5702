"""BatchNorm statistics that fit the network the server evaluates, measured by the clients.

A server part that `refits_statistics` (BiFL's binary network) has the clients that trained in
a round measure, on their own data, the running mean and variance of the network the server is
about to evaluate (`client_app.evaluate_global`); their replies are checked here and pooled as
the statistics of the union of their data: mean = sum_k p_k m_k and, by the law of total
variance, var = sum_k p_k (v_k + m_k^2) - mean^2, with p_k proportional to examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .wire import ModelSpec, PayloadError

Arrays = dict[str, np.ndarray]
MEAN, VAR = "running_mean", "running_var"


def statistic_names(spec: ModelSpec) -> list[str]:
    """The spec's BatchNorm statistics a client measures (running mean and variance)."""
    return [t.name for t in spec if t.kind == "stat"]


def check_statistics(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> Arrays:
    """One reply's statistics: exactly the spec's, each of its shape, finite, variances > 0."""
    names = statistic_names(spec)
    if set(arrays) != set(names):
        missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
        raise PayloadError(None, "statistics", f"missing {missing}, unexpected {extra}")
    checked = {}
    for name in names:
        value = np.asarray(arrays[name])
        if value.shape != spec[name].shape or not np.issubdtype(value.dtype, np.floating):
            reason = f"{value.dtype} {value.shape}; allowed: float {spec[name].shape}"
            raise PayloadError(name, "statistics", reason)
        if not np.isfinite(value).all() or (name.endswith(VAR) and not (value > 0).all()):
            raise PayloadError(name, "statistics", "not finite (or a variance <= 0)")
        checked[name] = value.astype(np.float64)
    return checked


def pool_statistics(spec: ModelSpec, measured: Sequence[tuple[int, Arrays]]) -> Arrays:
    """The statistics of all the clients' data together, from (examples, checked statistics)."""
    total = float(sum(n for n, _ in measured))
    pooled: Arrays = {}
    for name in statistic_names(spec):
        weights = [(n / total, stats[name]) for n, stats in measured]
        if name.endswith(VAR):
            mean_name = name.removesuffix(VAR) + MEAN
            means = [stats[mean_name] for _, stats in measured]
            second = sum(p * (v + m**2) for (p, v), m in zip(weights, means, strict=True))
            mean = sum(p * m for (p, _), m in zip(weights, means, strict=True))
            value = np.maximum(second - mean**2, np.min([v for _, v in weights], axis=0))
        else:
            value = sum(p * v for p, v in weights)
        pooled[name] = np.asarray(value, dtype=np.float32)
    return pooled
