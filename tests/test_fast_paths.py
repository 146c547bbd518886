"""The speed-ups compute the same numbers as the plain forms they replace (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trqam_lit.adjoint import lean_adjoint
from trqam_lit.nets import VelocityField, gelu_tanh

OBS, ACT, B, K = 7, 5, 16, 10


def test_gelu_tanh_equals_torch_kernel_in_value_and_gradient():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float32).requires_grad_(True)
    y = gelu_tanh(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    ref_x = x.detach().requires_grad_(True)
    ref = F.gelu(ref_x, approximate="tanh")
    (dref,) = torch.autograd.grad(ref.sum(), ref_x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dy, dref, rtol=1e-5, atol=3e-6)  # float32 rounding of a slope of order 1
    with torch.no_grad():  # the in-place no-grad path
        torch.testing.assert_close(gelu_tanh(x.detach()), ref.detach(), rtol=0, atol=1e-6)


def test_gelu_tanh_no_grad_path_leaves_its_input_alone():
    x = torch.randn(64, 32)
    before = x.clone()
    with torch.no_grad():
        gelu_tanh(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_lean_adjoint_through_the_linearisation_equals_autograd(layer_norm):
    """The VelocityField fast path (one batched forward, matmul VJPs) against per-step autograd VJPs."""
    torch.manual_seed(0)
    v_base = VelocityField(OBS, ACT, (32, 32, 32), layer_norm=layer_norm)
    if layer_norm:  # non-trivial LayerNorm scale and shift, so their VJP is exercised
        for norm in v_base.mlp.norms:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.normal_(norm.bias)
    s, xs, adj_final = torch.randn(B, OBS), torch.randn(K + 1, B, ACT), torch.randn(B, ACT)
    fast = lean_adjoint(v_base, s, xs, adj_final)
    plain = lean_adjoint(lambda s_, x_, t_: v_base(s_, x_, t_), s, xs, adj_final)  # not a VelocityField: autograd
    assert fast.shape == (K, B, ACT)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast[0], adj_final, atol=1e-2)  # the recursion moved the adjoint
