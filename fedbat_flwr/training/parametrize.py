"""Frozen base weights + learned (binarized) updates, for every parameter of any model.

``attach_binarized_updates(model)`` parametrizes each floating-point parameter
(`torch.nn.utils.parametrize`) as ``w + m`` (full-precision warm-up, paper Eq. 12) or
``w + S(m, alpha)`` (binarization-aware training, Eq. 14), with one step size alpha per tensor.
No layer class is rewritten, so every architecture works unchanged.

All updates of a model live in one buffer of ``ROW``-entry rows (``BinarizedUpdates``): each
tensor starts on a fresh row, its entries in its parameter's memory order, the rest of its last
row zero padding. A forward pass computes every weight with a few whole-model kernels and one
autograd node, alpha entering as one value per row (broadcast, never expanded per entry) and
alpha's gradient as per-row sums added up per tensor: no per-tensor loop in a training step.
Each parametrized tensor is a view of the result with its parameter's exact strides
(channels_last included). One node per tensor cost ~0.1 ms of Python and autograd overhead
each, more than the arithmetic on CNN4 (benchmarks/NOTES.md).
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

from fedbat_flwr.training.binarize import alpha_grad_alpha, grad_inside, sample_binarized


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


ROW = 64
"""Entries per row of the update buffer: padding is < ROW entries per tensor (2 % of CNN4)."""


@dataclass(frozen=True)
class _Layout:
    """Where one parameter lives in the flat buffer and how to view it with its own strides."""

    name: str
    offset: int
    numel: int
    memory_shape: tuple[int, ...]  # the parameter's dims, outermost to innermost in memory
    from_param: tuple[int, ...]  # permutation of the parameter's dims into memory order
    to_param: tuple[int, ...]  # and back
    in_order: bool  # memory order is the dims' order (C-contiguous): no permute needed

    def view(self, chunk: torch.Tensor) -> torch.Tensor:
        """``chunk`` (this parameter's slice of a flat buffer) with the parameter's shape."""
        if len(self.memory_shape) == 1:
            return chunk
        if self.in_order:
            return chunk.view(self.memory_shape)
        return chunk.view(self.memory_shape).permute(self.to_param)

    def flatten(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of the parameter's shape as a flat slice in memory order (``view``'s inverse).

        Skips the calls a 1-D or C-ordered parameter does not need: a training step runs this
        for every parameter.
        """
        if t.dim() == 1:
            return t
        if self.in_order:
            return t.reshape(-1)
        return t.permute(self.from_param).reshape(-1)


def _layout(name: str, t: torch.Tensor, offset: int) -> _Layout:
    order = _memory_order(name, t)
    return _Layout(
        name,
        offset,
        t.numel(),
        tuple(t.shape[d] for d in order),
        order,
        tuple(order.index(d) for d in range(t.dim())),
        order == tuple(range(t.dim())),
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


class _Weights(torch.autograd.Function):
    """All weights ``w + m`` of a model (Eq. 12), returned as per-tensor views: one node.

    Returning the views from the node (rather than views of its flat output) spares autograd a
    view node per tensor and a split node; ``backward`` lays the per-tensor gradients out
    flat itself (``BinarizedUpdates.flat``).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, base: torch.Tensor, update: torch.Tensor, updates: BinarizedUpdates
    ) -> tuple[torch.Tensor, ...]:
        ctx.updates = updates
        return updates.per_tensor(torch.add(base, update))

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, ctx.updates.flat(grads), None


class _BinarizedWeights(torch.autograd.Function):
    """All weights ``w + S(m, alpha(alpha_e))`` of a model: Eq. 14 with Eq. 10's chain rule.

    Same maths per tensor as ``binarize.StochasticBinarize`` after ``step_size`` (a test
    compares them), as one autograd node for the whole model returning per-tensor views (see
    ``_Weights``). Works on the (rows, ROW) view of the buffers with one alpha per row.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        base: torch.Tensor,
        update: torch.Tensor,
        alpha_e: torch.Tensor,
        alpha_init: torch.Tensor,
        updates: BinarizedUpdates,
    ) -> tuple[torch.Tensor, ...]:
        raw = unclamped_step_size(alpha_e, alpha_init, updates.rho)
        alpha = torch.clamp(raw, updates.alpha_min, updates.alpha_max)
        m = update.view(-1, ROW)
        s, u = sample_binarized(m, updates.per_row(alpha), updates.generator)
        # Eq. 10's chain rule: d alpha / d alpha_e = rho alpha where the clamp is inactive
        # (alpha = raw), else 0; so grad(alpha_e) = sum(g alpha dS/dalpha) rho [alpha = raw].
        ctx.updates = updates
        ctx.save_for_backward(m, s, u, (raw == alpha) * updates.rho)
        return updates.per_tensor(torch.add(base, s.view(-1)))

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        m, s, u, dalpha_e = ctx.saved_tensors
        updates: BinarizedUpdates = ctx.updates
        grad = updates.flat(grads).view(-1, ROW)
        grad_m = grad_inside(grad, u)  # Eq. 8
        # Eq. 9 per tensor: row by row (padding has zero gradient), rows added up per tensor.
        per_row = alpha_grad_alpha(grad, grad_m, s, m, dim=1)
        per_tensor = torch.zeros_like(dalpha_e).index_add_(0, updates.row_tensor, per_row)
        return None, grad_m.view(-1), per_tensor * dalpha_e, None, None


def _layouts(params: dict[str, torch.Tensor]) -> tuple[list[_Layout], int]:
    """Each tensor's place in one flat buffer (rows of ROW entries) and the buffer's length;
    the tensors must share one dtype and device."""
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
        offset += -(-p.numel() // ROW) * ROW
    return layouts, offset


class BinarizedUpdates(nn.Module):
    """The learnable updates m and step sizes alpha = alpha' e^(rho alpha_e) of a whole model.

    ``update`` holds every tensor's m (flat, each tensor from a row boundary in its parameter's
    memory order, see ``ROW``), ``alpha_e`` and the buffer ``alpha_init`` one entry per tensor,
    the buffer ``base`` the frozen weights as they were at attach time (padding: zeros), the
    buffer ``row_tensor`` the tensor each row belongs to. ``rho``, ``alpha_min``, ``alpha_max``
    and ``binarizing`` are plain attributes (hyperparameters and phase); ``generator``
    optionally drives S's noise.
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
        layouts, offset = _layouts(params)
        self.layouts = tuple(layouts)
        # Each tensor's entries, then its padding: the pieces a flat buffer is split into.
        ends = [layout.offset for layout in layouts[1:]] + [offset]
        self._pieces = [
            n
            for layout, end in zip(layouts, ends, strict=True)
            for n in (layout.numel, end - layout.offset - layout.numel)
        ]
        like = next(iter(params.values()))
        # Padding of a flat gradient (``flat``) is cut from one row of zeros.
        self.register_buffer("zeros", like.new_zeros(ROW), persistent=False)
        self.register_buffer("base", like.new_zeros(offset))
        for layout, p in zip(layouts, params.values(), strict=True):
            self._entries(self.base, layout).copy_(layout.flatten(p.detach()))
        rows_per_tensor = torch.tensor(
            [(end - layout.offset) // ROW for layout, end in zip(layouts, ends, strict=True)]
        )
        self.register_buffer(
            "row_tensor",
            torch.repeat_interleave(torch.arange(len(layouts)), rows_per_tensor).to(like.device),
        )
        self.update = nn.Parameter(like.new_zeros(offset))
        self.alpha_e = nn.Parameter(like.new_zeros(len(layouts)))
        self.register_buffer("alpha_init", like.new_zeros(len(layouts)))
        self.rho = float(rho)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.binarizing = False
        self.generator = generator
        self._current: tuple[torch.Tensor, ...] | None = None  # the weights of the running forward
        self._hooks: list[RemovableHandle] = []

    @property
    def names(self) -> tuple[str, ...]:
        """The updated parameters' names, in buffer order."""
        return tuple(layout.name for layout in self.layouts)

    def alpha(self) -> torch.Tensor:
        """Eq. 10 per tensor, clamped to [alpha_min, alpha_max] so alpha stays > 0."""
        return step_size(self.alpha_e, self.alpha_init, self.rho, self.alpha_min, self.alpha_max)

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """A (rows, 1) column holding ``values[i]`` on every row of tensor i, to broadcast."""
        return values[self.row_tensor].unsqueeze(1)

    @staticmethod
    def _entries(flat: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """One tensor's entries of a flat buffer, padding excluded."""
        return flat[layout.offset : layout.offset + layout.numel]

    def weights(self) -> tuple[torch.Tensor, ...]:
        """Every parametrized weight, fresh: w + m (Eq. 12) or w + S(m, alpha) (Eq. 14)."""
        if self.binarizing:
            return _BinarizedWeights.apply(
                self.base, self.update, self.alpha_e, self.alpha_init, self
            )
        return _Weights.apply(self.base, self.update, self)

    def per_tensor(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A flat buffer cut into views with each parameter's shape and strides."""
        entries = flat.split(self._pieces)[::2]
        return tuple(layout.view(e) for layout, e in zip(self.layouts, entries, strict=True))

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``per_tensor``: one tensor per parameter laid out flat, zero padded."""
        pieces = []
        for layout, t, n in zip(self.layouts, tensors, self._pieces[1::2], strict=True):
            pieces.append(layout.flatten(t))
            if n:
                pieces.append(self.zeros[:n])
        return torch.cat(pieces)

    def weight(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s weight: the one of the running forward pass, else a fresh one."""
        current = self._current if self._current is not None else self.weights()
        return current[index]

    def update_of(self, name: str) -> torch.Tensor:
        """m of one parameter with its shape: a view without autograd, to inspect or set up."""
        layout = self.layouts[self.names.index(name)]
        return layout.view(self._entries(self.update.detach(), layout))

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
        for i, layout in enumerate(self.layouts):  # once a round: a loop is fine
            l1 = self._entries(self.update, layout).abs().sum()
            self.alpha_init[i] = l1 / max(layout.numel, 1)
        self.alpha_e.zero_()
        self.binarizing = True

    @torch.no_grad()
    def final_bits(self) -> dict[str, torch.Tensor]:
        """The update to send, as bits per tensor (True = +alpha): S(m, alpha) sampled once more.

        Algorithm 1 sends the binarized update of the final m and alpha, so one fresh draw of S
        from the trained m and final alpha is taken (deterministic where |m| > alpha).
        """
        m = self.update.view(-1, ROW)
        s, _ = sample_binarized(m, self.per_row(self.alpha()), self.generator)
        return dict(zip(self.names, self.per_tensor(s.view(-1) > 0), strict=True))

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


def attach_binarized_updates(
    model: nn.Module,
    *,
    rho: float,
    alpha_min: float,
    alpha_max: float,
    generator: torch.Generator | None = None,
    only_matrices: bool = False,
) -> BinarizedUpdates:
    """Parametrize every floating-point parameter of ``model`` as ``w + update``.

    With ``only_matrices`` only parameters of two or more dimensions (conv / linear weights) are
    binarized; the others (BatchNorm affine, biases) stay plain, trainable parameters.
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
            if not param.is_floating_point() or (only_matrices and param.dim() < 2):
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
