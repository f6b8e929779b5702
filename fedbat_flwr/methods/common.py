"""Pieces several methods share: the update a client made, 1-bit BatchNorm statistics, and
the fixed-step sign methods' common part (`FixedStepSigns`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError, RunConfig, option
from ..task import state_arrays
from ..training import recompute_batchnorm_statistics, run_sgd
from ..wire import AlphaBounds, ModelSpec, TensorSpec, encode_signs, encode_sparse, is_binarized
from ..wire.mixed import encode_mixed
from .base import ClientUpdate, LocalTask, Method


def local_delta(task: LocalTask) -> dict[str, np.ndarray]:
    """The client's update of every exchanged tensor, in each tensor's update domain."""
    return task.spec.delta(state_arrays(task.model), task.global_state)


def stat_signs(
    spec: ModelSpec, delta: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """BatchNorm running statistics as sign bits with alpha = mean |delta| (docs/ARCHITECTURE.md).

    Statistics are not trained by gradients, so no method learns their binarization; every 1-bit
    method sends them the way EF-SignSGD sends its update.
    """
    return signs_with_mean_step(delta, [t for t in spec if t.kind == "stat"])


def update_signs(
    task: LocalTask, tensors: Iterable[TensorSpec]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The client's update of each of ``tensors`` as sign bits with alpha = mean |update|: how
    1-bit methods send what they do not binarize themselves."""
    return signs_with_mean_step(local_delta(task), tensors)


def signs_with_mean_step(
    delta: Mapping[str, np.ndarray], tensors: Iterable[TensorSpec]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sign bits (True = +alpha) of ``delta`` per tensor, alpha = mean |delta| (0 for an empty
    tensor)."""
    tensors = list(tensors)
    bits = {t.name: delta[t.name] >= 0 for t in tensors}
    alphas = {t.name: float(np.abs(delta[t.name]).mean()) if t.size else 0.0 for t in tensors}
    return bits, alphas


def train_plain(task: LocalTask) -> float:
    """Plain local SGD on every trainable parameter (FedAvg's client step); the mean loss."""
    params = [p for p in task.model.parameters() if p.requires_grad]
    _, loss = run_sgd(
        task.model,
        params,
        task.batches,
        epochs=task.config.local_epochs,
        lr=task.config.lr,
        device=task.device,
    )
    return loss


def encode_param_signs(
    task: LocalTask,
    trained: Mapping[str, np.ndarray],
    bits: dict[str, np.ndarray],
    alphas: dict[str, float],
) -> dict[str, np.ndarray]:
    """A post-training 1-bit payload: the method's bits + alphas for parameters, BatchNorm as
    the run's `bn-payload` says (`stat_signs`, or float updates of affine and statistics).

    ``trained`` is the trained model's update (`local_delta`) the caller drew its bits from; a
    parameter without bits is sent as that. The statistics are those of the model the payload
    describes (`statistics_for_sent_update`), not of the locally trained one.
    """
    sent = {
        t.name: np.where(bits[t.name], np.float32(alphas[t.name]), np.float32(-alphas[t.name]))
        if t.name in bits
        else trained[t.name]
        for t in task.spec
        if t.kind == "param"
    }
    statistics_for_sent_update(task, sent)
    return encode_one_bit(task, bits, alphas, sent)


def encode_one_bit(
    task: LocalTask,
    bits: dict[str, np.ndarray],
    alphas: dict[str, float],
    params: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A 1-bit payload: ``bits`` / ``alphas`` for what was binarized, BatchNorm as the run's
    `bn-payload` says, statistics from the model as it is now. A float `bn-payload` sends the
    other parameters' updates from ``params`` (default: the model's own update)."""
    now = local_delta(task)  # after `statistics_for_sent_update`: the statistics to send
    width = bn_float_width(task.config)
    if width is None:
        stat_bits, stat_alphas = stat_signs(task.spec, now)
        return encode_signs(task.spec, {**bits, **stat_bits}, {**alphas, **stat_alphas})
    params = now if params is None else params
    dense = {
        t.name: params[t.name] if t.kind == "param" else now[t.name]
        for t in task.spec
        if not is_binarized(t)
    }
    return encode_mixed(task.spec, bits, alphas, dense, width)


def signed_params(task: LocalTask) -> list[TensorSpec]:
    """The parameters a post-training sign method sends as bits: all of them, or with a float
    `bn-payload` only the conv / linear weights (the rest travel as floats)."""
    binary = bn_float_width(task.config) is None
    return [t for t in task.spec if t.kind == "param" and (binary or is_binarized(t))]


def bn_float_width(config: RunConfig) -> int | None:
    """16 or 32 when `bn-payload` sends BatchNorm as floats; None for 1 bit + alpha."""
    return {"float16": 16, "float32": 32}.get(config.bn_payload)


def statistics_for_sent_update(task: LocalTask, sent: Mapping[str, np.ndarray]) -> None:
    """Re-estimate ``task.model``'s BatchNorm statistics, on the local data, for the weights the
    server will build from this message (global + the ``sent`` parameter updates); the trained
    weights stay.

    A post-training compressor sends an update far from the one it trained (SignSGD: 0.001 per
    entry after 10 epochs at lr 0.1); statistics of the trained
    model would not fit the model the server builds. Measured on FMNIST, 3 labels, N = 100:
    SignSGD's global model stayed at chance in eval mode for 11 rounds while the same weights
    scored 59 % with batch statistics.
    """
    params = dict(task.model.named_parameters())
    trained = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for t in task.spec:
            if t.kind == "param":
                weights = task.global_state[t.name] + sent[t.name].reshape(t.shape)
                params[t.name].copy_(torch.from_numpy(weights))
        recompute_batchnorm_statistics(task.model, task.batches, device=task.device)
        for name, p in params.items():
            p.copy_(trained[name])


def encode_top_k(task: LocalTask, delta: dict[str, np.ndarray], density: float) -> dict:
    """Sparse payload: per parameter tensor the ceil(density * d) largest |delta| entries (at
    least one); BatchNorm statistics whole (a 3% sample of them would leave them stale).

    The statistics are those of the model the kept entries describe
    (`statistics_for_sent_update`), as for the sign methods: the trained model's statistics
    do not fit global + a 3 % update (compare-methods, FMNIST: top-k's global model scored 18 %
    in eval mode and 50 % with batch statistics). In round 1 the refitted running_var of a
    fresh CNN4's first layer moves by up to e^-10.4 from BatchNorm's initial 1: the reason
    stat-alpha-max defaults to 20.
    """
    positions: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    sent: dict[str, np.ndarray] = {}
    for t in task.spec:
        if t.kind == "param":
            m = delta[t.name].reshape(-1)
            positions[t.name] = top_k_positions(m, math.ceil(round(density * m.size, 9)))
            values[t.name] = m[positions[t.name]]
            sent[t.name] = np.zeros_like(m)
            sent[t.name][positions[t.name]] = values[t.name]
    statistics_for_sent_update(task, sent)
    refitted = local_delta(task)
    for t in task.spec:
        if t.kind == "stat":
            positions[t.name] = np.arange(refitted[t.name].size)
            values[t.name] = refitted[t.name].reshape(-1)
    return encode_sparse(task.spec, positions, values)


def top_k_positions(m: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat positions of the ``k`` largest |m| entries (at least one, at most all)."""
    k = min(max(k, 1), m.size)
    if k == m.size:
        return np.arange(m.size)
    return np.sort(np.argpartition(-np.abs(m), k - 1)[:k])


@contextmanager
def parametrized_weights(model: nn.Module, make: Callable[[], nn.Module]) -> Iterator[None]:
    """Inside the block every conv / linear weight (a >= 2-D parameter) is seen through
    ``make()`` (`torch.nn.utils.parametrize`); afterwards the plain latent weights are back."""
    targets = [
        (module, name)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if param.dim() >= 2
    ]
    for module, name in targets:
        parametrize.register_parametrization(module, name, make())
    try:
        yield
    finally:
        for module, name in targets:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


@contextmanager
def parametrized_by_name(model: nn.Module, parts: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside the block each named parameter (``state_dict`` name) is seen through its own
    module (`torch.nn.utils.parametrize`) and does not require grad itself; afterwards the plain
    parameters are back, unchanged (FedBiF's bits, FedPM's masks)."""
    modules = dict(model.named_modules())
    targets = []
    for name, part in parts.items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        flag = getattr(module, attr).requires_grad
        getattr(module, attr).requires_grad_(False)
        parametrize.register_parametrization(module, attr, part)
        targets.append((module, attr, flag))
    try:
        yield
    finally:
        for module, attr, flag in targets:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
            getattr(module, attr).requires_grad_(flag)


class FixedStepSigns(Method):
    """A post-training sign method whose every parameter alpha is one run-config constant
    (SignSGD, Noisy-SignSGD, Stoc-SignSGD): train as FedAvg does, send `sign_bits` of the
    update with alpha = the value of `alpha_key`. A subclass names its key and default and, if
    it does not send the plain sign, how it draws the bits."""

    payload_kind = "signs"  # the parameter alpha is exactly the configured one (step_bounds)
    alpha_key: ClassVar[str]
    alpha_default: ClassVar[float]

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.alpha = self.fixed_alpha(config)

    @classmethod
    def fixed_alpha(cls, config: RunConfig) -> float:
        """The fixed step size, read alike by the clients and the server."""
        return option(
            config,
            cls.alpha_key,
            cls.alpha_default,
            lambda a: math.isfinite(a) and a > 0,
            "a float > 0",
        )

    @classmethod
    def step_bounds(cls, config: RunConfig) -> AlphaBounds:
        """The server accepts exactly the configured alpha as a parameter's alpha: a client
        cannot buy influence with a larger step."""
        alpha = cls.fixed_alpha(config)
        return replace(super().step_bounds(config), param=(alpha, alpha))

    def sign_bits(self, m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The bits sent for update ``m`` (True = +alpha): sign(m), a zero entry as +alpha."""
        return m >= 0

    def train(self, task: LocalTask) -> ClientUpdate:
        loss = train_plain(task)
        delta = local_delta(task)
        rng = np.random.default_rng(task.seed)
        params = signed_params(task)
        bits = {t.name: self.sign_bits(delta[t.name], rng) for t in params}
        alphas = {t.name: self.alpha for t in params}
        payload = encode_param_signs(task, delta, bits, alphas)
        return ClientUpdate(payload, task.batches.num_examples, {"train-loss": loss})


def require_fedavg(config: RunConfig) -> None:
    """A method that aggregates in its own way cannot be combined with another aggregator."""
    if config.aggregator != "fedavg":
        raise ConfigError(
            f"run-config 'aggregator' = {config.aggregator!r} is not allowed with method "
            f"{config.method!r}, which aggregates with its own server part; allowed: 'fedavg'"
        )
