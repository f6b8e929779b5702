"""Frozen base weight + learned (binarized) update, for any parameter of any model.

``register_parametrization(module, name, BinarizedUpdate(w))`` turns ``module.<name>`` into
``w + m`` (full-precision warm-up, paper Eq. 12) or ``w + S(m, alpha)`` (binarization-aware
training, Eq. 14), where ``w`` is the frozen global weight kept by torch as
``module.parametrizations.<name>.original`` and ``m``/``alpha_e`` live in this module.
No layer classes are rewritten, so every architecture works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.nn.utils import parametrize

from fedbat_flwr.training.binarize import inside_bounds, sample_binarized, straight_through_grads


def unclamped_step_size(
    alpha_e: torch.Tensor, alpha_init: torch.Tensor, rho: float
) -> torch.Tensor:
    """Eq. 10 before the clamp: alpha' e^(rho alpha_e).

    Evaluated as exp(log alpha' + rho alpha_e), so alpha' = 0 gives 0, never 0 * inf = nan.
    """
    return torch.exp(torch.add(torch.log(alpha_init), alpha_e, alpha=rho))


def step_size(
    alpha_e: torch.Tensor, alpha_init: torch.Tensor, rho: float, alpha_min: float, alpha_max: float
) -> torch.Tensor:
    """Eq. 10 clamped into [alpha_min, alpha_max], so alpha stays > 0 even when alpha' = 0."""
    return torch.clamp(unclamped_step_size(alpha_e, alpha_init, rho), alpha_min, alpha_max)


class _BinarizedWeight(torch.autograd.Function):
    """``w + S(m, alpha(alpha_e))`` as one autograd node: Eq. 14 with Eq. 10's chain rule.

    Same maths as ``step_size`` followed by ``StochasticBinarize`` (a test compares them), but one
    node per tensor instead of five: per-tensor Python and autograd overhead, not arithmetic, is
    most of the extra cost of a binarized step on small tensors (BatchNorm).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        w: torch.Tensor,
        m: torch.Tensor,
        alpha_e: torch.Tensor,
        alpha_init: torch.Tensor,
        rho: float,
        alpha_min: float,
        alpha_max: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        raw = unclamped_step_size(alpha_e, alpha_init, rho)
        alpha = torch.clamp(raw, alpha_min, alpha_max)
        s = sample_binarized(m, alpha, generator)
        ctx.bounds = inside_bounds(alpha)
        # Eq. 10's chain rule: d alpha / d alpha_e = rho alpha where the clamp is inactive
        # (alpha = raw), else 0; so grad(alpha_e) = sum(g alpha dS/dalpha) rho [alpha = raw].
        ctx.save_for_backward(m, s, (raw == alpha) * rho)
        return torch.add(w, s, out=torch.empty_like(w))  # w's exact strides (see _keep_strides)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        m, s, dalpha_e = ctx.saved_tensors
        grad_m, alpha_grad_alpha = straight_through_grads(grad, m, s, ctx.bounds)
        grad_w = grad if ctx.needs_input_grad[0] else None
        return grad_w, grad_m, alpha_grad_alpha * dalpha_e, None, None, None, None, None


class BinarizedUpdate(nn.Module):
    """The learnable update m of one tensor and its step size alpha = alpha' e^(rho alpha_e).

    ``rho``, ``alpha_min``, ``alpha_max`` and ``binarizing`` are plain attributes (hyperparameters
    and phase, not state to train or exchange); ``generator`` optionally drives the noise of S.
    """

    def __init__(
        self,
        like: torch.Tensor,
        *,
        rho: float,
        alpha_min: float,
        alpha_max: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.update = nn.Parameter(torch.zeros_like(like))
        self.alpha_e = nn.Parameter(torch.zeros((), dtype=like.dtype, device=like.device))
        self.register_buffer("alpha_init", torch.zeros((), dtype=like.dtype, device=like.device))
        self.rho = float(rho)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.binarizing = False
        self.generator = generator
        self.base_requires_grad = like.requires_grad  # restored on detach

    def alpha(self) -> torch.Tensor:
        """Eq. 10, clamped to [alpha_min, alpha_max] so alpha stays > 0 even when alpha' = 0."""
        return step_size(self.alpha_e, self.alpha_init, self.rho, self.alpha_min, self.alpha_max)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.binarizing:
            return _keep_strides(w + self.update, w)  # Eq. 12
        return _BinarizedWeight.apply(  # Eq. 14
            w,
            self.update,
            self.alpha_e,
            self.alpha_init,
            self.rho,
            self.alpha_min,
            self.alpha_max,
            self.generator,
        )

    @torch.no_grad()
    def start_binarization(self) -> None:
        """Eq. 13: alpha' = ||m||_1 / d from the warm-up update, alpha_e = 0; switch to S."""
        self.alpha_init.copy_(self.update.abs().mean())
        self.alpha_e.zero_()
        self.binarizing = True

    @torch.no_grad()
    def final_bits(self) -> torch.Tensor:
        """The update to send, as bits (True = +alpha): S(m, alpha) sampled once more.

        Algorithm 1 sends the binarized update of the final m and alpha, so one fresh draw of S
        from the trained m and final alpha is taken (deterministic where |m| > alpha).
        """
        return sample_binarized(self.update, self.alpha(), self.generator) > 0

    @torch.no_grad()
    def final_alpha(self) -> float:
        """The step size that scales the sent bits (Eq. 11)."""
        return float(self.alpha())


def _keep_strides(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give ``out`` the strides of ``like`` (a copy, needed only for a few small tensors).

    Elementwise ops drop the channels_last hint of a conv weight with one input channel
    (strides of size-1 dims are ambiguous); oneDNN would then run that conv, and the layers after
    it, in the slower NCHW layout.
    """
    if out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


def attach_binarized_updates(
    model: nn.Module,
    *,
    rho: float,
    alpha_min: float,
    alpha_max: float,
    generator: torch.Generator | None = None,
) -> dict[str, BinarizedUpdate]:
    """Parametrize every floating-point parameter of ``model`` as ``w + update``.

    Base weights are frozen (``requires_grad=False``). Returns the updates keyed by the
    parameter's ``state_dict`` name before parametrization (e.g. ``"features.0.weight"``).
    """
    if any(isinstance(m, BinarizedUpdate) for m in model.modules()):
        raise ValueError("model already has binarized updates; detach them first")
    targets: dict[str, tuple[nn.Module, str, nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if not param.is_floating_point():
                continue
            if id(param) in seen:
                raise ValueError(f"parameter {key!r} is shared between modules; not supported")
            seen.add(id(param))
            targets[key] = (module, name, param)
    layers: dict[str, BinarizedUpdate] = {}
    for key, (module, name, param) in targets.items():
        layers[key] = BinarizedUpdate(
            param, rho=rho, alpha_min=alpha_min, alpha_max=alpha_max, generator=generator
        )
        param.requires_grad_(False)
        parametrize.register_parametrization(module, name, layers[key])
    return layers


def detach_binarized_updates(model: nn.Module) -> None:
    """Remove the updates again, restoring the original (unchanged) base weights."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            plist = module.parametrizations[name]
            ours = [p for p in plist if isinstance(p, BinarizedUpdate)]
            if not ours:
                continue
            original = plist.original
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            original.requires_grad_(ours[0].base_requires_grad)


def original_name(state_dict_key: str) -> str:
    """Map a parametrized ``state_dict`` key back to the parameter's own name.

    ``"features.0.parametrizations.weight.original"`` -> ``"features.0.weight"``; other keys are
    returned unchanged.
    """
    parts = state_dict_key.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] == "original":
        return ".".join([*parts[:-3], parts[-2]])
    return state_dict_key
