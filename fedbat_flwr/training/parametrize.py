"""Frozen base weights + learned (binarized) updates, for every parameter of any model.

``attach_binarized_updates(model)`` parametrizes each floating-point parameter
(`torch.nn.utils.parametrize`) as ``w + m`` (full-precision warm-up, paper Eq. 12) or
``w + S(m, alpha)`` (binarization-aware training, Eq. 14), with one step size alpha per tensor.
No layer class is rewritten, so every architecture works unchanged.

All updates of a model live in one flat buffer (``BinarizedUpdates``), each tensor's entries in
its parameter's memory order. A forward pass computes every weight with a few whole-model
kernels and one autograd node; each parametrized tensor is a view of that result with its
parameter's exact strides (channels_last included). One node per tensor cost ~0.1 ms of Python
and autograd overhead each, more than the arithmetic on CNN4 (benchmarks/NOTES.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from fedbat_flwr.training.binarize import grad_inside, sample_binarized


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


@dataclass(frozen=True)
class _Layout:
    """Where one parameter lives in the flat buffer and how to view it with its own strides."""

    name: str
    offset: int
    numel: int
    memory_shape: tuple[int, ...]  # the parameter's dims, outermost to innermost in memory
    from_param: tuple[int, ...]  # permutation of the parameter's dims into memory order
    to_param: tuple[int, ...]  # and back

    def view(self, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk`` (this parameter's slice of a flat buffer) with the parameter's shape."""
        return chunk.view(self.memory_shape).permute(self.to_param)


def _layout(name: str, t: torch.Tensor, offset: int) -> _Layout:
    order = _memory_order(name, t)
    return _Layout(
        name,
        offset,
        t.numel(),
        tuple(t.shape[d] for d in order),
        order,
        tuple(order.index(d) for d in range(t.dim())),
    )


def _memory_order(name: str, t: torch.Tensor) -> tuple[int, ...]:
    """Dims of ``t`` outermost to innermost in memory: ``t.permute(order)`` is contiguous.

    Size-1 dims can sit anywhere; the order that reproduces their strides too is preferred,
    because conv kernels pick their layout from them (a 1-input-channel channels_last weight).
    """
    if t.numel() == 0:
        return tuple(range(t.dim()))
    by_stride = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    orders = [by_stride, *itertools.permutations(range(t.dim()))] if t.dim() <= 5 else [by_stride]
    for exact in (True, False):
        for order in orders:
            if _contiguous_in(t, order, exact):
                return tuple(order)
    raise ValueError(
        f"parameter {name!r} is not dense (shape {tuple(t.shape)}, strides {t.stride()}); "
        "binarized updates need each parameter stored without gaps or overlap"
    )


def _contiguous_in(t: torch.Tensor, order: Sequence[int], exact: bool) -> bool:
    """Whether ``t.permute(order)`` has contiguous strides (size-1 dims' checked only if exact)."""
    expected = 1
    for d in reversed(order):
        if t.stride(d) != expected and (exact or t.shape[d] != 1):
            return False
        expected *= t.shape[d]
    return True


def _segment_dots(a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """<a_i, b_i> for each segment i of two flat tensors cut into ``sizes``."""
    return torch.stack(
        [torch.dot(x, y) for x, y in zip(a.split(sizes), b.split(sizes), strict=True)]
    )


class _BinarizedWeights(torch.autograd.Function):
    """All weights ``w + S(m, alpha(alpha_e))`` of a model, flat: Eq. 14 with Eq. 10's chain rule.

    Same maths per tensor as ``binarize.StochasticBinarize`` after ``step_size`` (a test
    compares them), as one autograd node for the whole model.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        base: torch.Tensor,
        update: torch.Tensor,
        alpha_e: torch.Tensor,
        alpha_init: torch.Tensor,
        updates: BinarizedUpdates,
    ) -> torch.Tensor:
        raw = unclamped_step_size(alpha_e, alpha_init, updates.rho)
        alpha = torch.clamp(raw, updates.alpha_min, updates.alpha_max)
        s, q = sample_binarized(update, updates.per_element(alpha), updates.generator)
        # Eq. 10's chain rule: d alpha / d alpha_e = rho alpha where the clamp is inactive
        # (alpha = raw), else 0; so grad(alpha_e) = sum(g alpha dS/dalpha) rho [alpha = raw].
        ctx.sizes = updates.sizes
        ctx.save_for_backward(update, s, q, (raw == alpha) * updates.rho)
        return torch.add(base, s)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        m, s, q, dalpha_e = ctx.saved_tensors
        grad_m = grad_inside(grad, q)  # Eq. 8
        # Eq. 9 per tensor: alpha dS/dalpha = S - [inside] m, summed against the gradient.
        alpha_grad_alpha = _segment_dots(grad, s, ctx.sizes) - _segment_dots(grad_m, m, ctx.sizes)
        return None, grad_m, alpha_grad_alpha * dalpha_e, None, None


class BinarizedUpdates(nn.Module):
    """The learnable updates m and step sizes alpha = alpha' e^(rho alpha_e) of a whole model.

    ``update`` holds every tensor's m (flat, each in its parameter's memory order), ``alpha_e``
    and the buffer ``alpha_init`` one entry per tensor, the buffer ``base`` the frozen weights
    as they were at attach time. ``rho``, ``alpha_min``, ``alpha_max`` and ``binarizing`` are
    plain attributes (hyperparameters and phase); ``generator`` optionally drives S's noise.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        *,
        rho: float,
        alpha_min: float,
        alpha_max: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not params:
            raise ValueError("the model has no floating-point parameters to update")
        kinds = {(p.dtype, p.device) for p in params.values()}
        if len(kinds) > 1:
            raise ValueError(
                f"parameters mix dtypes/devices {sorted(map(str, kinds))}; binarized updates "
                "need one dtype and device for the whole model"
            )
        layouts, offset = [], 0
        for name, p in params.items():
            layouts.append(_layout(name, p, offset))
            offset += p.numel()
        self.layouts = tuple(layouts)
        self.sizes = [layout.numel for layout in layouts]
        like = next(iter(params.values()))
        base = [
            p.detach().permute(layout.from_param).reshape(-1)
            for layout, p in zip(layouts, params.values(), strict=True)
        ]
        self.register_buffer("base", torch.cat(base))
        self.update = nn.Parameter(like.new_zeros(offset))
        self.alpha_e = nn.Parameter(like.new_zeros(len(layouts)))
        self.register_buffer("alpha_init", like.new_zeros(len(layouts)))
        self.rho = float(rho)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.binarizing = False
        self.generator = generator
        self._current: list[torch.Tensor] | None = None  # the weights of the running forward
        self._hooks: list[RemovableHandle] = []

    @property
    def names(self) -> tuple[str, ...]:
        """The updated parameters' names, in buffer order."""
        return tuple(layout.name for layout in self.layouts)

    def alpha(self) -> torch.Tensor:
        """Eq. 10 per tensor, clamped to [alpha_min, alpha_max] so alpha stays > 0."""
        return step_size(self.alpha_e, self.alpha_init, self.rho, self.alpha_min, self.alpha_max)

    def per_element(self, values: torch.Tensor) -> torch.Tensor:
        """A flat tensor holding ``values[i]`` over every entry of tensor i."""
        out = torch.empty_like(self.base)
        for chunk, value in zip(out.split(self.sizes), values.unbind(), strict=True):
            chunk.fill_(value)
        return out

    def weights(self) -> list[torch.Tensor]:
        """Every parametrized weight, fresh: w + m (Eq. 12) or w + S(m, alpha) (Eq. 14)."""
        if self.binarizing:
            flat = _BinarizedWeights.apply(
                self.base, self.update, self.alpha_e, self.alpha_init, self
            )
        else:
            flat = self.base + self.update
        return self._per_tensor(flat)

    def _per_tensor(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat buffer cut into views with each parameter's shape and strides."""
        chunks = flat.split(self.sizes)
        return [layout.view(chunk) for layout, chunk in zip(self.layouts, chunks, strict=True)]

    def weight(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s weight: the one of the running forward pass, else a fresh one."""
        current = self._current if self._current is not None else self.weights()
        return current[index]

    def update_of(self, name: str) -> torch.Tensor:
        """m of one parameter with its shape: a view without autograd, to inspect or set up."""
        layout = self.layouts[self.names.index(name)]
        return layout.view(self.update.detach()[layout.offset : layout.offset + layout.numel])

    def hook_into(self, model: nn.Module) -> None:
        """Compute all weights once per forward pass of ``model``, not once per tensor."""

        def begin(*_: object) -> None:
            self._current = self.weights()

        def end(*_: object) -> None:
            self._current = None

        self._hooks = [
            model.register_forward_pre_hook(begin),
            model.register_forward_hook(end, always_call=True),
        ]

    def unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._current = None

    @torch.no_grad()
    def start_binarization(self) -> None:
        """Eq. 13: alpha' = ||m||_1 / d per tensor from the warm-up update, alpha_e = 0; use S."""
        counts = torch.tensor(self.sizes, dtype=self.update.dtype, device=self.update.device)
        l1 = torch.stack([chunk.abs().sum() for chunk in self.update.split(self.sizes)])
        self.alpha_init.copy_(l1 / counts.clamp(min=1))
        self.alpha_e.zero_()
        self.binarizing = True

    @torch.no_grad()
    def final_bits(self) -> dict[str, torch.Tensor]:
        """The update to send, as bits per tensor (True = +alpha): S(m, alpha) sampled once more.

        Algorithm 1 sends the binarized update of the final m and alpha, so one fresh draw of S
        from the trained m and final alpha is taken (deterministic where |m| > alpha).
        """
        s, _ = sample_binarized(self.update, self.per_element(self.alpha()), self.generator)
        return dict(zip(self.names, self._per_tensor(s > 0), strict=True))

    @torch.no_grad()
    def final_alphas(self) -> dict[str, float]:
        """The step size that scales each tensor's sent bits (Eq. 11)."""
        return dict(zip(self.names, self.alpha().tolist(), strict=True))


class _UpdatedWeight(nn.Module):
    """The parametrization of one tensor: its entry of the model's ``BinarizedUpdates``.

    The ``w`` torch passes in is not used: the updates keep the same frozen weights in ``base``.
    """

    def __init__(self, updates: BinarizedUpdates, index: int, base_requires_grad: bool) -> None:
        super().__init__()
        self.__dict__["updates"] = updates  # shared by all tensors: not a submodule
        self.index = index
        self.base_requires_grad = base_requires_grad  # restored on detach

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.updates.weight(self.index)


def keep_strides(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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
) -> BinarizedUpdates:
    """Parametrize every floating-point parameter of ``model`` as ``w + update``.

    Base weights are frozen (``requires_grad=False``). The returned updates (also found with
    ``binarized_updates_of(model)``) name each tensor by its ``state_dict`` name before
    parametrization (e.g. ``"features.0.weight"``). They are not a submodule of ``model``
    (containers such as ``nn.Sequential`` call every child): move the model first, then attach.
    """
    if binarized_updates_of(model) is not None:
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
    updates = BinarizedUpdates(
        {key: param for key, (_, _, param) in targets.items()},
        rho=rho,
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        generator=generator,
    )
    for index, (module, name, param) in enumerate(targets.values()):
        view = _UpdatedWeight(updates, index, param.requires_grad)
        param.requires_grad_(False)
        parametrize.register_parametrization(module, name, view)
    updates.hook_into(model)
    return updates


def binarized_updates_of(model: nn.Module) -> BinarizedUpdates | None:
    """The updates attached to ``model``, or None."""
    for module in model.modules():
        if isinstance(module, _UpdatedWeight):
            return module.updates
    return None


def detach_binarized_updates(model: nn.Module) -> None:
    """Remove the updates again, restoring the original (unchanged) base weights."""
    updates = binarized_updates_of(model)
    if updates is not None:
        updates.unhook()
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            plist = module.parametrizations[name]
            ours = [p for p in plist if isinstance(p, _UpdatedWeight)]
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
