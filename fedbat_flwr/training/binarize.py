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
float kernels: bool masks and ``torch.where`` are ~10x slower on CPU. The noise is the largest
extra cost of a binarized step on CPU (torch's generator is single-threaded), hence
``centred_uniform``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

_ONE_UP = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))  # |q| < this: inside


def centred_uniform(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """zeta - 1/2, zeta ~ U[0, 1) on a 2^-23 grid: one per entry of ``like`` (its shape, C order).

    ~1.5x faster than ``uniform_`` on CPU: one 64-bit draw feeds two entries, and 23 random bits
    become the mantissa of a float in [1, 2) directly (no int -> float conversion); subtracting
    1.5 is exact. Drawn as float32, then cast to ``like``'s dtype.
    """
    n = like.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits random
    mantissas = words.view(torch.int32)[:n].bitwise_and_(0x007FFFFF)
    one_to_two = mantissas.bitwise_or_(0x3F800000).view(torch.float32)  # exponent of 1.0
    return one_to_two.sub_(1.5).view(like.shape).to(like.dtype)


def sample_binarized(
    m: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S(m, alpha) (Eq. 6-7); no autograd. Returns (S, q = m / alpha); alpha > 0.

    A seeded generator reproduces the bits (noise in C order, see ``centred_uniform``).
    """
    q = torch.div(m, alpha)
    r = centred_uniform(m, generator).add_(q, alpha=0.5)  # Eq. 7: +alpha iff r >= 0
    return torch.copysign(alpha, r, out=r), q


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
