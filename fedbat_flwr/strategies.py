"""The strategies anyone's ServerApp imports: `FedBATStrategy`, and `make_strategy` for the others.

Used like Flower's own strategies; only the strategy line of a quickstart ServerApp changes:

    arrays = ArrayRecord(model.state_dict())
    strategy = FedBATStrategy(arrays, fraction_train=0.5)          # was: FedAvg(fraction_train=0.5)
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays, num_rounds=3)

The initial arrays give the model's tensors, which every reply is validated against. Every
train message carries the method and its client options in its config, so the ClientApp's
`fedbat_flwr.client.train` needs no setting of its own. The aggregation rule composes:
`aggregator` is "fedavg" (the paper's Eq. 11), "fedadam", "fedyogi", "fedmedian",
"fedtrimmedavg", "krum" (Flower's strategies on the decoded weights) or, for sign payloads,
"majority" / "sign-median"; Flower's arguments (fraction_train, min_train_nodes, eta,
num_malicious_nodes, ...) pass through.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from .aggregators import FLOWER_STRATEGIES
from .config import ConfigError, RunConfig
from .methods import get_method
from .preflight import check_method
from .records import arrays_to_record, record_to_arrays
from .strategy import _FEDAVG_KWARGS, ValidatingStrategy, method_arguments
from .wire import ModelSpec

# Run-config keys the clients read, sent in every train message (with the method's options).
CLIENT_KEYS = ("method", "lr", "local-epochs", "batch-size", "seed", "rho", "phi", "bn-payload")
CLIENT_KEYS += ("alpha-min", "alpha-max", "downlink-bits")
_FLOWER_KWARGS = _FEDAVG_KWARGS.union(
    *(inspect.signature(s.__init__).parameters for s in FLOWER_STRATEGIES.values())
) - {"self", "kwargs"}


def make_strategy(
    method: str, initial_arrays: ArrayRecord | Mapping[str, np.ndarray], **kwargs: Any
) -> ValidatingStrategy:
    """The strategy of `method` (any name `fedbat_flwr.methods.method_names()` lists).

    ``kwargs`` are run-config keys with underscores (lr=0.05, signsgd_alpha=0.001,
    aggregator="krum"; defaults: pyproject.toml / the paper) and Flower's strategy arguments
    (fraction_train=0.3, num_malicious_nodes=1). An unknown name is a TypeError naming it.
    """
    if method == "fedbat":
        return FedBATStrategy(initial_arrays, **kwargs)
    config, flower = _split(method, kwargs)
    parts, initial = _parts(config, initial_arrays, flower)
    strategy = ValidatingStrategy(**parts)
    strategy.initial_arrays = initial
    return strategy


class FedBATStrategy(ValidatingStrategy):
    """FedBAT's server (Li et al., ICML 2024) as a Flower strategy: clients learn a 1-bit update
    and a step size per layer; the server validates every reply and adds sum_k p_k alpha_k
    sign_k (or hands the decoded weights to the chosen Flower aggregation).

    Client options (sent to the clients): rho and phi of the paper's Appendix A.2, the local
    lr / epochs / batch size, bn_payload. Server options: the accepted step sizes
    [alpha_min, alpha_max], the aggregator, downlink_bits (the broadcast's bits per weight).
    """

    def __init__(
        self,
        initial_arrays: ArrayRecord | Mapping[str, np.ndarray],
        *,
        rho: float = 6.0,
        phi: float = 0.5,
        lr: float = 0.1,
        local_epochs: int = 1,
        batch_size: int = 64,
        alpha_min: float = 5e-4,
        alpha_max: float = 5e-2,
        bn_payload: str = "float16",
        downlink_bits: int = 32,
        aggregator: str = "fedavg",
        seed: int = 42,
        **kwargs: Any,
    ) -> None:
        named = dict(rho=rho, phi=phi, lr=lr, local_epochs=local_epochs, batch_size=batch_size)
        named |= dict(alpha_min=alpha_min, alpha_max=alpha_max, bn_payload=bn_payload)
        named |= dict(downlink_bits=downlink_bits, aggregator=aggregator, seed=seed)
        config, flower = _split("fedbat", {**named, **kwargs})
        parts, initial = _parts(config, initial_arrays, flower)
        super().__init__(**parts)
        self.initial_arrays = initial


def _split(method: str, kwargs: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """(the run config, Flower's arguments) out of a strategy's keyword arguments."""
    own = set(get_method(method).options) | set(RunConfig.__dataclass_fields__)
    unknown = sorted(k for k in kwargs if k not in own and k.replace("_", "-") not in own)
    unknown = [k for k in unknown if k not in _FLOWER_KWARGS]
    if unknown:
        raise TypeError(f"{method} strategy: unknown argument(s) {unknown}")
    # fraction_train and min_train_nodes are run-config keys too: checked there, used by Flower.
    flower = {k: v for k, v in kwargs.items() if k in _FLOWER_KWARGS}
    keys = {k.replace("_", "-"): v for k, v in kwargs.items() if k not in flower or k in own}
    config = RunConfig.from_flower({**keys, "method": method})
    return config, flower


def _parts(
    config: RunConfig, initial: ArrayRecord | Mapping[str, np.ndarray], flower: dict[str, Any]
) -> tuple[dict[str, Any], ArrayRecord]:
    """ValidatingStrategy's arguments for `config` and the model that `initial` describes, and
    the arrays to start from (the method's: FedPM starts from mask probabilities)."""
    arrays = record_to_arrays(initial) if isinstance(initial, ArrayRecord) else dict(initial)
    floats = {k: np.asarray(v) for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)}
    if not floats:
        raise ConfigError("initial_arrays hold no floating-point tensor to train")
    method = check_method(config)
    part = method.server_part(ModelSpec.from_arrays(floats))
    try:
        start = arrays_to_record(part.initial(floats))
    except KeyError as exc:  # FedPM: masks over the app's own random network (its `model`)
        raise ConfigError(
            f"method {config.method!r} starts from the app's own model ({config.model_name!r}), "
            f"which has no tensor {exc}; allowed: initial_arrays of that model"
        ) from None
    sent = config.to_flower()
    client = {k: sent[k] for k in (*CLIENT_KEYS, *method.options) if k in sent}
    return method_arguments(method, config, part, client_config=client, **flower), start
