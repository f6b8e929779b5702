"""FedPM (Isik et al., ICLR 2023): clients train a Bernoulli mask over frozen random weights.

The weights never travel: every client and the server rebuild the same random network from the
run's seed (`reference_weights`: the configured model, conv / linear weights drawn as +-c with
c = e / sqrt(fan_in), the authors' "ME_init"). Per conv / linear weight entry the clients train a
real-valued score s; theta = sigmoid(s) is the probability of keeping the weight. The forward
pass uses ``w_init * m`` with a fresh sample m ~ Bernoulli(theta) (`torch.nn.utils.parametrize`)
and the straight-through gradient d m / d theta = 1. Scores are trained with Adam (`fedpm-lr`,
0.1 as in the authors' code), initialised from the received theta.

Uplink: one mask sampled from the final theta, 1 bit per weight (`wire.fedpm`), or range-coded
(`fedpm-entropy-coding = true`): under each tensor's own density (`fedpm-coding-model =
"density"`, the default: below 1 bit when the mask is sparse), or against the theta the client
received (`"theta"`: the server sent that theta, so entries every client agreed on cost almost
nothing and a mask costs about the entropy of theta). Optional regulariser
(`fedpm-reg`, default 0 = plain FedPM): ``reg * mean(theta)``, the expected density of the sent
mask, a differentiable proxy of its entropy while the density is below 1/2 -- it pushes masks
sparse, which the range coder turns into fewer bits.

Server (`FedPMPart`), Bayesian aggregation: per entry a Beta(a, b) posterior, reset to
Beta(1, 1) every `fedpm-prior-reset` rounds (default 1: every round, as the authors' code does;
their paper resets less often under partial participation), ``a += sum_k m_k``,
``b += K - sum_k m_k`` and theta = the posterior *mode* (a - 1) / (a + b - 2), as FedPM's
Bayesian aggregation prescribes (`fedpm-theta = "mode"`, the default). With a reset every round
that is the plain mean of the K masks, so theta reaches 0 or 1 where all clients agree: the
evaluation mask then keeps exactly the weights every client kept, and a client still moves such
an entry because it clips theta into [eps, 1 - eps] before taking the logit (`_score`;
`fedpm-theta-eps`, default 1e-3). The clip decides how far from "decided" a round starts: the
authors' clients upload masks smoothed to {0.01, 0.99}, so their server's mode never leaves
[0.01, 0.99] (logit +-4.6); 1e-3 starts at +-6.9, where one round of Adam steps (at most
`fedpm-lr` each) rarely brings an entry back into the masks the clients sample.
Where a + b - 2 = 0 (no mask since the reset: Beta(1, 1) has no mode) theta is the mean, 1/2.
`fedpm-theta = "mean"` keeps the posterior mean a / (a + b) instead, which with K = 10 and a
reset every round stays inside [1/12, 11/12]. Downlink: theta as float16 (16 bits per weight)
plus the running statistics.

BatchNorm (decided): affine parameters stay frozen at torch's initialisation (weight 1, bias 0,
as the authors' mask networks have no learnable normalisation); the running statistics are
re-estimated by the clients and sent 1-bit (sign(update), alpha = mean |update|) like every
1-bit method here, and float16 down.

The server evaluates ``w_init * m`` with one mask drawn from theta by uniforms fixed for the run
(the final model is "a seed and a mask"); `model_sparsity` is its fraction of zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, RunConfig
from ..task import build_model_for, state_arrays
from ..training import input_memory_format
from ..training.loop import keep_strides  # channels_last
from ..wire import ModelSpec, payload_nbytes
from ..wire.fedpm import (
    encode_fedpm_mask,
    fedpm_groups,
    validate_fedpm_probs,
)
from .base import ClientUpdate, LocalTask, Method, register
from .common import option, parametrized_by_name, require_fedavg, update_signs

if TYPE_CHECKING:  # the server side loads only where a server runs (tests/test_doors.py)
    from ..server_part import ServerPart

THETA_RULES = ("mode", "mean")  # `fedpm-theta`: the server's point estimate of the Beta posterior
CODING_MODELS = ("density", "theta")  # `fedpm-coding-model`: what the range coder codes against


@lru_cache(maxsize=4)
def _reference(
    model: str, dataset: str, resnet_width: int, cnn4_width: int, seed: int
) -> dict[str, np.ndarray]:
    config = RunConfig(
        model=model, dataset=dataset, resnet_width=resnet_width, cnn4_width=cnn4_width, seed=seed
    )
    net = build_model_for(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                c = math.e / math.sqrt(p[0].numel())  # fan_in = in_channels * kernel size
                signs = torch.randint(0, 2, p.shape, generator=generator) * 2 - 1
                p.copy_(c * signs)
    arrays = state_arrays(net)
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def reference_weights(config: RunConfig) -> dict[str, np.ndarray]:
    """The frozen random network of this run (read-only arrays; never transmitted)."""
    c = config
    return _reference(c.model, c.dataset, c.resnet_width, c.cnn4_width, c.seed)


class SampledMask(nn.Module):
    """``w * m``, m ~ Bernoulli(sigmoid(score)) drawn anew every forward pass; straight-through
    gradient, so d out / d score = w * sigmoid'(score)."""

    def __init__(self, score: torch.Tensor, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.score = nn.Parameter(score)
        self.generator = generator

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        theta = torch.sigmoid(self.score)
        sample = torch.bernoulli(theta.detach(), generator=self.generator)
        mask = theta + (sample - theta).detach()
        return keep_strides(w * mask, w)


def train_scores(task: LocalTask, scores: Sequence[torch.Tensor], lr: float, reg: float) -> float:
    """Adam on the scores for `local-epochs` passes; loss = cross-entropy + reg * mean(theta).
    Returns the mean cross-entropy."""
    optimizer = torch.optim.Adam(scores, lr=lr)
    batches = task.batches.to(task.device, input_memory_format(task.model))
    count = sum(s.numel() for s in scores)
    task.model.train()
    loss_sum, steps = torch.zeros((), device=task.device), 0
    for _ in range(task.config.local_epochs):
        for x, y in batches:
            ce = F.cross_entropy(task.model(x), y)
            loss = ce
            if reg:
                loss = ce + reg * sum(torch.sigmoid(s).sum() for s in scores) / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += ce.detach()
            steps += 1
    return float(loss_sum) / max(steps, 1)


@register
class FedPM(Method):
    """Probabilistic mask training; Bayesian aggregation of sampled masks on the server."""

    name = "fedpm"
    payload_kind = "fedpm-mask"
    options = (
        "fedpm-lr",
        "fedpm-reg",
        "fedpm-entropy-coding",
        "fedpm-coding-model",
        "fedpm-prior-reset",
        "fedpm-theta",
        "fedpm-theta-eps",
    )
    own_downlink = True

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        require_fedavg(config)
        finite_pos = "a finite float > 0"
        self.lr = option(config, "fedpm-lr", 0.1, lambda v: math.isfinite(v) and v > 0, finite_pos)
        self.reg = option(config, "fedpm-reg", 0.0, lambda v: math.isfinite(v) and v >= 0, ">= 0")
        self.coding = uplink_coding(config)
        self.reset = prior_reset(config)
        self.theta_rule = theta_rule(config)
        self.theta_eps = option(
            config, "fedpm-theta-eps", 1e-3, lambda v: 0 < v < 0.5, "a float in (0, 0.5)"
        )

    def server_part(self, spec: ModelSpec) -> ServerPart:
        from .server.fedpm import FedPMPart

        return FedPMPart(
            spec,
            reference_weights(self.config),
            self.reset,
            seed=self.config.seed,
            theta=self.theta_rule,
        )

    def receive(
        self,
        payload: Mapping[str, np.ndarray],
        spec: ModelSpec,
        state: MutableMapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """The frozen reference network with the received running statistics."""
        stats = validate_fedpm_probs(payload, spec).stats
        reference = reference_weights(self.config)
        return {t.name: np.array(stats.get(t.name, reference[t.name])) for t in spec}

    def train(self, task: LocalTask) -> ClientUpdate:
        theta = validate_fedpm_probs(task.downlink, task.spec).theta
        generator = torch.Generator(device=task.device).manual_seed(task.seed)
        for p in task.model.parameters():
            p.requires_grad_(False)
        parts = {
            name: SampledMask(_score(t, self.theta_eps, task.device), generator)
            for name, t in theta.items()
        }
        with parametrized_by_name(task.model, parts):
            loss = train_scores(task, [p.score for p in parts.values()], self.lr, self.reg)
        masks = {}
        for name, part in parts.items():
            probs = torch.sigmoid(part.score.detach())
            masks[name] = torch.bernoulli(probs, generator=generator).bool().cpu().numpy()
        for p in task.model.parameters():
            p.requires_grad_(True)
        payload = self._encode(task, masks, theta)
        density = sum(int(m.sum()) for m in masks.values()) / max(
            sum(m.size for m in masks.values()), 1
        )
        return ClientUpdate(
            payload, task.batches.num_examples, {"train-loss": loss, "mask-density": density}
        )

    def _encode(
        self, task: LocalTask, masks: dict[str, np.ndarray], theta: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        _, stats = fedpm_groups(task.spec)
        signs, alphas = update_signs(task, stats)
        return encode_masks(task.spec, masks, signs, alphas, self.coding, theta)


def encode_masks(
    spec: ModelSpec,
    masks: Mapping[str, np.ndarray],
    signs: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    coding: str,
    theta: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The uplink in ``coding``'s layout; coded against theta, the packed layout if that is
    smaller (a theta that says little about the mask costs more than 1 bit an entry)."""
    payload = encode_fedpm_mask(spec, masks, signs, alphas, coding=coding, theta=theta)
    if coding != "theta":
        return payload
    packed = encode_fedpm_mask(spec, masks, signs, alphas, coding="packed")
    return packed if payload_nbytes(packed) <= payload_nbytes(payload) else payload


def uplink_coding(config: RunConfig) -> str:
    """The uplink layout (`wire.fedpm.CODINGS`) from `fedpm-entropy-coding` and
    `fedpm-coding-model`; a coding model without entropy coding is a contradiction."""
    coded = option(config, "fedpm-entropy-coding", False, lambda v: True, "true, false")
    allowed = ", ".join(repr(m) for m in CODING_MODELS)
    model = option(config, "fedpm-coding-model", "density", lambda v: v in CODING_MODELS, allowed)
    if model != "density" and not coded:
        raise ConfigError(
            f"run-config 'fedpm-coding-model' = {model!r} needs 'fedpm-entropy-coding' = true "
            "(packed masks are not coded against anything)"
        )
    return model if coded else "packed"


def _score(theta: np.ndarray, eps: float, device: torch.device) -> torch.Tensor:
    """logit(theta), theta clipped into [eps, 1 - eps] so the score is finite."""
    clipped = np.clip(theta, eps, 1.0 - eps).astype(np.float32)
    return torch.logit(torch.from_numpy(clipped)).to(device)


def prior_reset(config: RunConfig) -> int:
    return option(config, "fedpm-prior-reset", 1, lambda r: r >= 1, "an integer >= 1")


def theta_rule(config: RunConfig) -> str:
    """`fedpm-theta`: the Beta posterior's mode (FedPM's aggregation, default) or its mean."""
    return check_theta_rule(config.get("fedpm-theta", "mode"))


def check_theta_rule(rule: str) -> str:
    if rule not in THETA_RULES:
        allowed = ", ".join(repr(r) for r in THETA_RULES)
        raise ConfigError(f"run-config 'fedpm-theta' = {rule!r} is not allowed; allowed: {allowed}")
    return rule


def posterior_theta(a: np.ndarray, b: np.ndarray, rule: str = "mode") -> np.ndarray:
    """theta from Beta(a, b): the mode (a - 1) / (a + b - 2), or the mean a / (a + b).

    The mode is undefined where a + b - 2 <= 0 (with the Beta(1, 1) prior: no mask since the
    last reset); there theta is the mean, 1/2 for the uniform prior.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean = a64 / (a64 + b64)
    if check_theta_rule(rule) == "mean":
        return mean.astype(np.float32)
    evidence = a64 + b64 - 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        mode = np.clip((a64 - 1.0) / evidence, 0.0, 1.0)
    return np.where(evidence > 0, mode, mean).astype(np.float32)
