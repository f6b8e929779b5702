"""The learnable stochastic binarization operator S(m, alpha) of FedBAT (paper Eq. 6-9).

Forward (Eq. 6-7): +alpha where m > alpha, -alpha where m < -alpha, and inside [-alpha, alpha]
+alpha with probability (alpha + m) / (2 alpha), else -alpha, so E[S(m, alpha)] = m there.
Eq. 7's bit floor((alpha + m) / (2 alpha) + zeta), zeta ~ U[0, 1), clipped to {0, 1}, is 1 iff
r = (zeta - 1/2) + m / (2 alpha) >= 0, so S = copysign(alpha, r) covers all three cases (r is never
-0; m = alpha gives +alpha and m = -alpha gives -alpha for every zeta).

Backward is the straight-through estimator (Eq. 8-9): dS/dm = 1 inside [-alpha, alpha], else 0;
dS/dalpha = +1 above, -1 below and 2 b - (m + alpha) / alpha inside (b the sampled bit). As
2 b - 1 = S / alpha in all three regions, dS/dalpha = (S - [inside] m) / alpha, so the gradient of
the shared alpha is one reduction: sum(g (S - [inside] m)) / alpha.

Everything runs as float kernels (no bool masks, no ``torch.where``: on CPU those are ~10x
slower), and the backward pass is two kernels: per-tensor Python and dispatch overhead, not
arithmetic, is most of what a binarized step costs on top of a plain SGD step.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx


def sample_binarized(
    m: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw S(m, alpha) (Eq. 6-7); no autograd. ``alpha`` is a 0-dim tensor > 0.

    The noise is drawn in m's memory order: a seeded generator reproduces the bits for the
    same layout (a channels_last and a contiguous copy of m get different, equally valid draws).
    """
    # zeta - 1/2 in one pass: uniform_(-0.5, 0.5) consumes the generator exactly like rand_like.
    r = torch.empty_like(m).uniform_(-0.5, 0.5, generator=generator)
    return torch.copysign(alpha, r.addcdiv_(m, 2 * alpha), out=r)


def straight_through_factors(
    m: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dS/dm = [|m| <= alpha] (Eq. 8) and alpha dS/dalpha = S - [|m| <= alpha] m (Eq. 9).

    Computed in the forward pass so the backward pass is two kernels: grad * dS/dm and
    sum(grad * alpha dS/dalpha). Both are float tensors.
    """
    inside = torch.abs(m, out=torch.empty_like(m))
    inside = torch.le(inside, alpha, out=inside)
    return inside, torch.addcmul(s, inside, m, value=-1)


class StochasticBinarize(torch.autograd.Function):
    """S(m, alpha) with straight-through gradients for m and the 0-dim step size alpha."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        m: torch.Tensor,
        alpha: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        s = sample_binarized(m, alpha, generator)
        ctx.save_for_backward(alpha, *straight_through_factors(m, alpha, s))
        return s

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        alpha, ds_dm, alpha_ds_dalpha = ctx.saved_tensors
        grad_alpha = (grad * alpha_ds_dalpha).sum() / alpha if ctx.needs_input_grad[1] else None
        return grad * ds_dm, grad_alpha, None


def binarize(
    m: torch.Tensor, alpha: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample S(m, alpha) (values in {-alpha, +alpha}); differentiable in m and alpha (Eq. 6-9).

    ``generator`` makes the draw reproducible; every call draws fresh noise.
    """
    alpha_t = torch.as_tensor(alpha, dtype=m.dtype, device=m.device)
    return StochasticBinarize.apply(m, alpha_t, generator)
