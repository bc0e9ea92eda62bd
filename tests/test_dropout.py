"""The hashed dropout of compiled CPU graphs against the distribution F.dropout draws from: Bernoulli(1 - p)
masks, independent between neighbours and between seeds, scaled by 1 / (1 - p); and F.dropout itself outside."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ddpmkit.runtime.dropout as D


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32)


def _within(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    """``observed`` is a Bernoulli(expected) frequency over ``n`` draws, within ``sigmas`` standard errors."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_drops_each_element_with_probability_p_and_scales_the_rest(p):
    x = torch.rand(16, 32, 32, 64) + 0.5
    torch.manual_seed(0)
    y = D.hashed_dropout(x, p)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    assert _within(1 - kept.float().mean().item(), p, x.numel())


def test_the_uniforms_are_uniform():
    u = D.hashed_uniform(_seed(7), torch.empty(1 << 20))
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, f"chi-square {chi2:.1f} over 16 bins (15 degrees of freedom; 60 is beyond p = 1e-6)"


def test_neighbours_in_every_dimension_and_other_seeds_are_independent():
    p, shape = 0.1, (8, 16, 32, 32)
    drop = D.hashed_uniform(_seed(11), torch.empty(shape)) < p
    for dim in range(len(shape)):
        n = drop.shape[dim] - 1
        both = drop.narrow(dim, 0, n) & drop.narrow(dim, 1, n)
        assert _within(both.float().mean().item(), p * p, both.numel()), f"dimension {dim}"
    other = D.hashed_uniform(_seed(12), torch.empty(shape)) < p
    assert _within((drop & other).float().mean().item(), p * p, drop.numel())
    shifted = other.flatten()[1:]  # the next seed's stream is not this one moved by an element
    assert _within((drop.flatten()[:-1] & shifted).float().mean().item(), p * p, shifted.numel())


def test_the_mask_follows_the_memory_layout_and_the_seed():
    x = torch.rand(4, 8, 6, 6)
    cl = x.to(memory_format=torch.channels_last)
    u = D.hashed_uniform(_seed(3), cl)
    assert u.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(u, D.hashed_uniform(_seed(3), cl)) and not torch.equal(u, D.hashed_uniform(_seed(4), cl))
    torch.manual_seed(5)
    y = D.hashed_dropout(cl, 0.2)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_the_gradient_is_the_mask_over_one_minus_p():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    torch.manual_seed(1)
    y = D.hashed_dropout(x, 0.25)
    y.sum().backward()
    assert torch.allclose(x.grad, (y != 0).float() / 0.75)


def test_outside_a_compiled_graph_it_is_f_dropout_and_off_when_not_training():
    x = torch.rand(4, 8, 8, 8)
    torch.manual_seed(2)
    a = D.dropout(x, 0.1, training=True)
    torch.manual_seed(2)
    assert torch.equal(a, F.dropout(x, 0.1, training=True))
    assert D.dropout(x, 0.1, training=False) is x and D.dropout(x, 0.0, training=True) is x
    q, k, v = (torch.rand(2, 4, 16, 8) for _ in range(3))
    torch.manual_seed(3)
    a = D.attention(q, k, v, 0.1)
    torch.manual_seed(3)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))


def test_the_written_out_attention_is_sdpas_maths(monkeypatch):
    """With the dropout itself taken out, the compiled path's attention equals SDPA's, bf16 inputs included."""
    monkeypatch.setattr(D, "_hashed_here", lambda x: True)
    monkeypatch.setattr(D, "hashed_dropout", lambda w, p: w)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    assert torch.allclose(D.attention(q, k, v, 0.1), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = D.attention(qb, kb, vb, 0.1)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), F.scaled_dot_product_attention(qb, kb, vb).float(), atol=2e-2)


def test_a_compiled_graph_draws_a_new_mask_per_call_and_per_layer_from_the_global_rng(monkeypatch):
    """The masks are a function of the global RNG's state, which the training loop seeds at every step: so a resumed
    compiled run draws the masks the uninterrupted one drew."""
    traced = []
    real = D.hashed_dropout
    monkeypatch.setattr(D, "hashed_dropout", lambda x, p: traced.append(p) or real(x, p))

    @torch.compile
    def two_layers(x):
        return D.dropout(x, 0.1, True), D.dropout(x, 0.1, True)

    x = torch.ones(8, 16, 16, 16).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    a1, b1 = two_layers(x)
    a2, _ = two_layers(x)
    torch.manual_seed(0)
    a3, b3 = two_layers(x)
    assert traced, "the compiled graph did not take the hashed dropout"
    assert not torch.equal(a1, b1) and not torch.equal(a1, a2)
    assert torch.equal(a1, a3) and torch.equal(b1, b3)
    assert _within(1 - (a1 != 0).float().mean().item(), 0.1, x.numel())
    assert a1.is_contiguous(memory_format=torch.channels_last)
