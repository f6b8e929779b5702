"""The binarization operator S(m, alpha) and the step size alpha against paper Eq. 6-10."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbat_flwr.training import BinarizedUpdates, binarize
from fedbat_flwr.training.binarize import random_levels
from fedbat_flwr.training.parametrize import step_size

ALPHA = 0.5
DRAWS = 200_000


def _mean_within_5_se(samples: torch.Tensor, m: float, alpha: float) -> bool:
    """|mean - m| <= 5 standard errors, with Var[S] = alpha^2 - m^2 for S in {-alpha, alpha}."""
    se = math.sqrt((alpha**2 - m**2) / samples.numel())
    return abs(samples.double().mean().item() - m) <= 5 * se


def _biased_binarize(m: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """A deliberately wrong S: P(+alpha) = (alpha + m) / (2 alpha) + 0.02."""
    p = (alpha + m) / (2 * alpha) + 0.02
    return torch.where(torch.rand(m.shape, generator=generator) < p, alpha, -alpha)


@pytest.mark.parametrize("m", [-0.45, -0.2, 0.0, 0.1, 0.35])
def test_unbiased_inside_interval(m: float) -> None:
    """Eq. 7: E[S(m, alpha)] = m for m in [-alpha, alpha]; the check catches a 0.02 bias."""
    gen = torch.Generator().manual_seed(1)
    x = torch.full((DRAWS,), m)
    assert _mean_within_5_se(binarize(x, ALPHA, gen), m, ALPHA)
    assert not _mean_within_5_se(_biased_binarize(x, ALPHA, gen), m, ALPHA)


def test_outputs_are_plus_minus_alpha() -> None:
    """Eq. 6: every output is exactly +alpha or -alpha, whatever m."""
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(10_000, generator=gen)
    out = binarize(m, ALPHA, gen)
    assert set(out.unique().tolist()) == {-ALPHA, ALPHA}


def test_outside_interval_is_clipped() -> None:
    """Eq. 6: m > alpha gives +alpha and m < -alpha gives -alpha, boundaries included, always."""
    gen = torch.Generator().manual_seed(3)
    above = torch.tensor([ALPHA, 0.5000001, 0.7, 3.0]).repeat(50_000)
    below = -above
    assert torch.all(binarize(above, ALPHA, gen) == ALPHA)
    assert torch.all(binarize(below, ALPHA, gen) == -ALPHA)


def test_bits_follow_eq7_floor_with_the_same_noise() -> None:
    """Eq. 7: bit = floor((alpha + m) / (2 alpha) + zeta), clipped to {0, 1}, for the drawn
    zeta = (k + 2^15 + 1/2) / 2^16 (the midpoint of the drawn 16-bit cell)."""
    m = torch.linspace(-0.9, 0.9, 1001)
    out = binarize(m, ALPHA, torch.Generator().manual_seed(4))
    k = random_levels(m, torch.Generator().manual_seed(4)).double()
    zeta = (k + 2**15 + 0.5) / 2**16
    expected = torch.floor((ALPHA + m.double()) / (2 * ALPHA) + zeta) >= 1
    assert torch.equal(out > 0, expected)


def test_probability_is_exact_to_2_to_the_16() -> None:
    """Eq. 7 with 16 random bits: over all 2^16 values of k, P(+alpha) is (1 + q) / 2 rounded
    to a multiple of 2^-16, so the bias |E[S] - m| is at most 2^-16 alpha."""
    q = torch.tensor([-1.0, -0.7, -1e-6, 0.0, 0.3, 0.123456, 1.0]).double()
    k = torch.arange(-(2**15), 2**15, dtype=torch.float64)
    u = 2**15 * q + 0.5
    p_plus = ((k[None, :] + u[:, None]) >= 0).double().mean(dim=1)
    assert torch.all((p_plus - (1 + q) / 2).abs() <= 2**-17)


def test_noise_is_uniform_on_16_bit_levels() -> None:
    """Eq. 7's k: integers in [-2^15, 2^15), every 64th of the range equally likely
    (chi-square over 1M draws; a count not a multiple of 4 leaves part of the last draw)."""
    n = 1_000_001
    k = random_levels(torch.empty(n), torch.Generator().manual_seed(11)).double()
    assert k.shape == (n,) and k.min() >= -(2**15) and k.max() < 2**15
    assert torch.equal(k, torch.round(k))
    counts = torch.histc(k, bins=64, min=-(2**15), max=2**15)
    expected = n / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) ~ 1e-5
    assert random_levels(torch.empty(3, dtype=torch.float64)).dtype == torch.float64


def test_gradients_match_eq8_eq9_in_all_regions() -> None:
    """Eq. 8-9 (straight-through): dS/dm and dS/dalpha on hand-built inputs, summed for alpha."""
    m = torch.tensor([-1.2, -0.5, -0.3, 0.0, 0.2, 0.4, 0.5, 0.9], requires_grad=True)
    alpha = torch.tensor(ALPHA, requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 1.5, 4.0])
    out = binarize(m, alpha, torch.Generator().manual_seed(5))
    out.backward(upstream)

    bits = (out > 0).double()  # the sampled b; outside it is forced: 0 below, 1 above
    md = m.detach().double()
    inside = (md.abs() <= ALPHA).double()
    # Eq. 9 by cases: +1 above, -1 below, 2 b - (m + alpha) / alpha inside.
    ds_dalpha = torch.where(
        md > ALPHA,
        1.0,
        torch.where(md < -ALPHA, -1.0, 2 * bits - (md + ALPHA) / ALPHA),
    )
    assert torch.equal(bits[[0, 1]], torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert torch.equal(bits[[6, 7]], torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(m.grad.double(), upstream.double() * inside)
    torch.testing.assert_close(alpha.grad.double(), (upstream.double() * ds_dalpha).sum())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (64, 32, 3, 3)])  # small and large paths
def test_gradients_on_conv_shaped_tensors(
    layout: torch.memory_format, shape: tuple[int, ...]
) -> None:
    """Eq. 8-9 on conv weights in both layouts the trainer uses (CPU: channels_last)."""
    gen = torch.Generator().manual_seed(9)
    m0 = torch.empty(shape).uniform_(-0.6, 0.6, generator=gen)
    m = m0.contiguous(memory_format=layout).requires_grad_()
    upstream = torch.randn(shape, generator=gen).contiguous(memory_format=layout)
    alpha = torch.tensor(ALPHA, requires_grad=True)
    out = binarize(m, alpha, gen)
    out.backward(upstream)

    md, g = m0.double(), upstream.double()
    inside = (md.abs() <= ALPHA).double()
    ds_dalpha = (out.detach().double() / ALPHA) - inside * md / ALPHA  # Eq. 9, all regions
    assert m.grad.is_contiguous(memory_format=layout)
    assert torch.equal(m.grad.double(), g * inside)
    torch.testing.assert_close(alpha.grad.double(), (g * ds_dalpha).sum(), rtol=1e-5, atol=1e-6)


def test_gradient_hand_computed_example() -> None:
    """Eq. 8-9 on a spelled-out case: alpha = 0.5, m = (-1, 0, 1), bit inside forced via noise."""
    m = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    alpha = torch.tensor(ALPHA, requires_grad=True)
    gen = torch.Generator().manual_seed(6)
    out = binarize(m, alpha, gen)
    out.sum().backward()
    b = float(out[1] > 0)
    # dS/dm: 0 outside, 1 inside. dS/dalpha: -1 + (2 b - (0 + 0.5) / 0.5) + 1 = 2 b - 1.
    assert m.grad.tolist() == [0.0, 1.0, 0.0]
    assert alpha.grad.item() == pytest.approx(2 * b - 1)


def test_same_seed_same_bits_fresh_noise_each_call() -> None:
    """Eq. 7 noise is reproducible under a seeded generator and fresh on every call."""
    m = torch.empty(5000).uniform_(-ALPHA, ALPHA, generator=torch.Generator().manual_seed(0))
    first = binarize(m, ALPHA, torch.Generator().manual_seed(7))
    again = binarize(m, ALPHA, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    gen = torch.Generator().manual_seed(7)
    assert not torch.equal(binarize(m, ALPHA, gen), binarize(m, ALPHA, gen))


def _updates(*tensors: torch.Tensor, **kwargs: object) -> BinarizedUpdates:
    options = {"rho": 6.0, "alpha_min": 5e-4, "alpha_max": 5e-2, **kwargs}
    return BinarizedUpdates({f"t{i}": t for i, t in enumerate(tensors)}, **options)


@settings(max_examples=60, deadline=None)
@given(
    alpha_init=st.floats(0.0, 1.0),
    alpha_e=st.floats(-20.0, 20.0),
    rho=st.floats(0.0, 10.0),
)
def test_step_size_eq10_positive_and_clamped(alpha_init: float, alpha_e: float, rho: float) -> None:
    """Eq. 10: alpha = alpha' exp(rho alpha_e), clamped into [alpha_min, alpha_max] (so > 0)."""
    updates = _updates(torch.zeros(3), rho=rho)
    with torch.no_grad():
        updates.alpha_init.fill_(alpha_init)
        updates.alpha_e.fill_(alpha_e)
    alpha = updates.alpha().item()
    expected = min(max(alpha_init * math.exp(rho * alpha_e), 5e-4), 5e-2)
    lo, hi = torch.tensor([5e-4, 5e-2]).tolist()  # the float32 bounds
    assert 0 < lo <= alpha <= hi
    assert alpha == pytest.approx(expected, rel=1e-5)


def test_whole_model_node_matches_operator_per_tensor() -> None:
    """Eq. 8-10, 14: the one node for all tensors gives, tensor by tensor, the weight and
    gradients of w + S(m, alpha()) built from alpha() and StochasticBinarize; one tensor's
    alpha is clamped at alpha_max (no alpha_e gradient), one tensor is empty."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(64, 32, 3, 3), (0,), (320,), (8, 8)]  # whole buffer rows: draws line up per tensor
    ws = [torch.randn(shape, generator=gen) for shape in shapes]
    upstream = [torch.randn(shape, generator=gen) for shape in shapes]
    updates = _updates(*ws, alpha_min=1e-4, alpha_max=0.2, generator=gen)
    with torch.no_grad():
        updates.update.uniform_(-0.1, 0.1, generator=gen)
    updates.start_binarization()
    with torch.no_grad():
        updates.alpha_e.copy_(torch.tensor([0.05, 0.0, 2.0, -0.1]))
    state = gen.get_state()
    out = updates.weights()
    torch.autograd.backward(out, upstream)
    grad_m, grad_e = updates.update.grad.clone(), updates.alpha_e.grad.clone()

    gen.set_state(state)  # the node draws tensor after tensor from the same generator
    m = updates.update.detach().clone().requires_grad_()
    alpha_e = updates.alpha_e.detach().clone().requires_grad_()
    alpha = step_size(alpha_e, updates.alpha_init, 6.0, 1e-4, 0.2)
    reference = [
        w + binarize(chunk.view(w.shape), a, gen)
        for w, chunk, a in zip(ws, m.split([w.numel() for w in ws]), alpha.unbind(), strict=True)
    ]
    torch.autograd.backward(reference, upstream)
    for got, want in zip(out, reference, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(grad_m, m.grad)
    torch.testing.assert_close(grad_e, alpha_e.grad)
    assert grad_e[2].item() == 0.0 and grad_e[1].item() == 0.0
    assert grad_e[0].item() != 0.0 and grad_e[3].item() != 0.0


def test_whole_model_gradients_with_padded_rows() -> None:
    """Eq. 8-10 on tensors that do not fill whole buffer rows (sizes 105, 1, 65, 0, 64): each
    output is w + (+-alpha), m's gradient is the upstream one inside [-alpha, alpha], and
    alpha_e's is rho sum(g (S - [inside] m)) per tensor, padding contributing nothing."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(3, 5, 7), (1,), (65,), (0,), (64,)]
    ws = [torch.randn(shape, generator=gen) for shape in shapes]
    upstream = [torch.randn(shape, generator=gen) for shape in shapes]
    updates = _updates(*ws, alpha_min=1e-4, alpha_max=1.0, generator=gen)
    with torch.no_grad():
        updates.update.uniform_(-0.1, 0.1, generator=gen)  # padding too: must not matter
    updates.start_binarization()
    out = updates.weights()
    torch.autograd.backward(out, upstream)
    alpha = updates.alpha().detach()
    for i, (w, got, g) in enumerate(zip(ws, out, upstream, strict=True)):
        m = updates.update_of(f"t{i}")
        s = got.detach() - w
        torch.testing.assert_close(s.abs(), alpha[i].expand_as(s), rtol=1e-5, atol=1e-7)
        inside = (m.abs() <= alpha[i]).to(m.dtype)
        grad_m = updates.update.grad[updates.layouts[i].offset :][: w.numel()].view(w.shape)
        assert torch.equal(grad_m, g * inside)
        expected = 6.0 * (g * (s - inside * m)).sum()
        torch.testing.assert_close(updates.alpha_e.grad[i], expected, rtol=1e-4, atol=1e-6)
    padding = torch.ones_like(updates.update, dtype=torch.bool)
    for layout in updates.layouts:
        padding[layout.offset : layout.offset + layout.numel] = False
    assert padding.any() and torch.all(updates.update.grad[padding] == 0)


def test_step_size_gradient_through_alpha_e() -> None:
    """Eq. 10: d alpha / d alpha_e = rho alpha inside the clamp, 0 when clamped."""
    updates = _updates(torch.zeros(3))
    with torch.no_grad():
        updates.alpha_init.fill_(0.01)
    updates.alpha().sum().backward()
    assert updates.alpha_e.grad.item() == pytest.approx(6.0 * 0.01)
    updates.alpha_e.grad = None
    with torch.no_grad():
        updates.alpha_e.fill_(1.0)  # 0.01 e^6 > alpha_max: clamped
    updates.alpha().sum().backward()
    assert updates.alpha_e.grad.item() == 0.0
