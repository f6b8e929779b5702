"""The learnable stochastic binarization operator S(m, alpha) of FedBAT (paper Eq. 6-9).

Forward (Eq. 6-7): +alpha where m > alpha, -alpha where m < -alpha, and inside [-alpha, alpha]
+alpha with probability (alpha + m) / (2 alpha), else -alpha, so E[S(m, alpha)] = m there.
Eq. 7's bit floor((alpha + m) / (2 alpha) + zeta), zeta ~ U[0, 1), clipped to {0, 1}, is 1 iff
r = (zeta - 1/2) + q / 2 >= 0 with q = m / alpha, so S = copysign(alpha, r) covers all three
cases (r is never -0; m = alpha gives +alpha and m = -alpha gives -alpha for every zeta).

Backward is the straight-through estimator (Eq. 8-9): dS/dm = 1 inside [-alpha, alpha], else 0;
dS/dalpha = +1 above, -1 below and 2 b - (m + alpha) / alpha inside (b the sampled bit). As
2 b - 1 = S / alpha in all three regions, alpha dS/dalpha = S - [inside] m, so the gradient of
a shared alpha is two dot products. "Inside" is |q| <= 1, tested on the q the forward pass used.

``alpha`` may be one step size (0-dim) or one per element (the whole-model update of
``parametrize.BinarizedUpdates`` expands each tensor's alpha over its entries). Everything is
float kernels: bool masks and ``torch.where`` are ~10x slower on CPU.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

_ONE_UP = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))  # |q| < this: inside


def sample_binarized(
    m: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S(m, alpha) (Eq. 6-7); no autograd. Returns (S, q = m / alpha); alpha > 0.

    The noise is drawn in m's memory order: a seeded generator reproduces the bits for the
    same layout (a channels_last and a contiguous copy of m get different, equally valid draws).
    """
    q = torch.div(m, alpha)
    # zeta - 1/2 in one pass: uniform_(-0.5, 0.5) consumes the generator exactly like rand_like.
    r = torch.empty_like(m).uniform_(-0.5, 0.5, generator=generator)
    return torch.copysign(alpha, r.add_(q, alpha=0.5), out=r), q


def grad_inside(grad: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ``grad`` where |q| <= 1 (m inside [-alpha, alpha]), else 0; one float kernel."""
    return torch.ops.aten.hardtanh_backward(grad, q, -_ONE_UP, _ONE_UP)


class StochasticBinarize(torch.autograd.Function):
    """S(m, alpha) with straight-through gradients for m and the 0-dim step size alpha."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        m: torch.Tensor,
        alpha: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        s, q = sample_binarized(m, alpha, generator)
        ctx.save_for_backward(m, alpha, s, q)
        return s

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        m, alpha, s, q = ctx.saved_tensors
        grad_m = grad_inside(grad, q)
        if not ctx.needs_input_grad[1]:
            return grad_m, None, None
        alpha_grad_alpha = (grad * s).sum() - (grad_m * m).sum()  # Eq. 9 times alpha
        return grad_m, alpha_grad_alpha / alpha, None


def binarize(
    m: torch.Tensor, alpha: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample S(m, alpha) (values in {-alpha, +alpha}); differentiable in m and alpha (Eq. 6-9).

    ``generator`` makes the draw reproducible; every call draws fresh noise.
    """
    alpha_t = torch.as_tensor(alpha, dtype=m.dtype, device=m.device)
    return StochasticBinarize.apply(m, alpha_t, generator)
