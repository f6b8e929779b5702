"""The learnable stochastic binarization operator S(m, alpha) of FedBAT (paper Eq. 6-9).

Forward (Eq. 6-7): +alpha where m > alpha, -alpha where m < -alpha, and inside [-alpha, alpha]
+alpha with probability (alpha + m) / (2 alpha), else -alpha, so E[S(m, alpha)] = m there.
Eq. 7's bit floor((alpha + m) / (2 alpha) + zeta), clipped to {0, 1}, is drawn with zeta on
a grid of 2^16 cell midpoints, zeta = (k + 2^15 + 1/2) / 2^16 for a random 16-bit integer k in
[-2^15, 2^15): the bit is 1 iff k + u >= 0 with u = 2^15 q + 1/2, q = m / alpha. So
P(+alpha) = (1 + q) / 2 rounded to the nearest multiple of 2^-16 (|E[S] - m| <= 2^-16 alpha),
m >= alpha always gives +alpha and m <= -alpha always -alpha, and S = copysign(alpha, k + u)
(k + u is never -0). Sixteen random bits per entry is what makes S cheap: torch's CPU
generator is single-threaded and the largest extra cost of a binarized step (four entries per
64-bit draw, half the time of two 23-bit mantissas per draw).

Backward is the straight-through estimator (Eq. 8-9): dS/dm = 1 inside [-alpha, alpha], else 0;
dS/dalpha = +1 above, -1 below and 2 b - (m + alpha) / alpha inside (b the sampled bit). As
2 b - 1 = S / alpha in all three regions, alpha dS/dalpha = S - [inside] m, so the gradient of
a shared alpha is two dot products. "Inside" is |q| <= 1, tested on the u the forward pass
used (u is exact near the boundary: |q| <= 1 iff -2^15 + 1/2 <= u <= 2^15 + 1/2).

``alpha`` may be one step size (0-dim) or anything that broadcasts against m (the whole-model
update of ``parametrize.BinarizedUpdates`` passes one alpha per row of its buffer). Everything
is float kernels: bool masks and ``torch.where`` are ~10x slower on CPU.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

_HALF_LEVELS = 2**15  # k in [-2^15, 2^15): 16 random bits per entry
_INSIDE_LOW = float(torch.nextafter(torch.tensor(0.5 - _HALF_LEVELS), torch.tensor(-1e9)))
_INSIDE_HIGH = float(torch.nextafter(torch.tensor(0.5 + _HALF_LEVELS), torch.tensor(1e9)))


def random_levels(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """k uniform on the integers [-2^15, 2^15), one per entry of ``like``, as its dtype.

    Four entries per 64-bit draw (C order: entry i is 16-bit word i of the little-endian draw
    sequence); Eq. 7's zeta is (k + 2^15 + 1/2) / 2^16.
    """
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)  # all 64 bits random
    return words.view(torch.int16)[:n].to(like.dtype).view(like.shape)


def sample_binarized(
    m: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S(m, alpha) (Eq. 6-7); no autograd. Returns (S, u = 2^15 m / alpha + 1/2); alpha > 0.

    A seeded generator reproduces the bits (one ``random_levels`` draw per call).
    """
    # alpha / 2^15 is exact, so u's bits are 2^15 m / alpha's (addcdiv would be 3x slower).
    u = torch.div(m, alpha * (1 / _HALF_LEVELS)).add_(0.5)
    r = random_levels(m, generator).add_(u)  # Eq. 7: +alpha iff k + u >= 0
    return torch.copysign(alpha, r, out=r), u


def grad_inside(grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ``grad`` where |m| <= alpha (u from ``sample_binarized``), else 0; one kernel."""
    return torch.ops.aten.hardtanh_backward(grad, u, _INSIDE_LOW, _INSIDE_HIGH)


def alpha_grad_alpha(
    grad: torch.Tensor,
    grad_m: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
    dim: int | None = None,
) -> torch.Tensor:
    """Eq. 9 times alpha, against the gradient: sum(grad (S - [inside] m)) over ``dim`` (all
    entries if None); ``grad_m`` is ``grad_inside(grad, u)``."""
    terms = torch.mul(grad, s).addcmul_(grad_m, m, value=-1)
    return terms.sum() if dim is None else terms.sum(dim=dim)


class StochasticBinarize(torch.autograd.Function):
    """S(m, alpha) with straight-through gradients for m and the 0-dim step size alpha."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        m: torch.Tensor,
        alpha: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        s, u = sample_binarized(m, alpha, generator)
        ctx.save_for_backward(m, alpha, s, u)
        return s

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        m, alpha, s, u = ctx.saved_tensors
        grad_m = grad_inside(grad, u)
        if not ctx.needs_input_grad[1]:
            return grad_m, None, None
        return grad_m, alpha_grad_alpha(grad, grad_m, s, m) / alpha, None


def binarize(
    m: torch.Tensor, alpha: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample S(m, alpha) (values in {-alpha, +alpha}); differentiable in m and alpha (Eq. 6-9).

    ``generator`` makes the draw reproducible; every call draws fresh noise.
    """
    alpha_t = torch.as_tensor(alpha, dtype=m.dtype, device=m.device)
    return StochasticBinarize.apply(m, alpha_t, generator)
