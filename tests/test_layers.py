"""BinaryLinear / BinaryConv2d: drop-in behaviour, binary forward, straight-through backward, eval modes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binaryconnect.binarize import binarize_deterministic, binarize_stochastic
from binaryconnect.layers import BinaryConv2d, BinaryLinear, set_generator, set_stochastic_eval

BACKEND = "aot_eager"  # Dynamo + AOTAutograd, where the straight-through gradient is traced; no C++ build


def test_drop_in_for_nn_linear():
    layer = BinaryLinear(20, 7)
    assert isinstance(layer, nn.Linear)
    assert list(dict(layer.named_parameters())) == ["weight"]
    assert layer.state_dict().keys() == nn.Linear(20, 7, bias=False).state_dict().keys()
    layer_b = BinaryLinear(20, 7, bias=True)
    assert layer_b.state_dict().keys() == nn.Linear(20, 7).state_dict().keys()


def test_drop_in_for_nn_conv2d_and_its_bias_is_used():
    """Binarized layers carry no bias by default (batch norm follows); one asked for is added as nn.Conv2d's."""
    layer = BinaryConv2d(2, 3, 3)
    assert isinstance(layer, nn.Conv2d) and layer.bias is None
    assert layer.state_dict().keys() == nn.Conv2d(2, 3, 3, bias=False).state_dict().keys()
    layer_b = BinaryConv2d(3, 5, 3, padding=1, bias=True)
    assert layer_b.state_dict().keys() == nn.Conv2d(3, 5, 3).state_dict().keys()
    with torch.no_grad():
        layer_b.bias.normal_()
    x = torch.randn(2, 3, 6, 6)
    w = binarize_deterministic(layer_b.weight.detach())
    assert torch.equal(layer_b(x), F.conv2d(x, w, layer_b.bias, padding=1))
    lin = BinaryLinear(4, 3, bias=True)
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(5, 4)
    assert torch.equal(lin(x), F.linear(x, binarize_deterministic(lin.weight.detach()), lin.bias))


@pytest.mark.parametrize("H", [1.0, 0.25])
def test_latent_init_is_uniform_in_minus_H_H(H):
    w = BinaryLinear(500, 400, H=H).weight.detach()
    assert w.min() >= -H and w.max() <= H
    # n = 200,000 draws of U[-H, H]: the mean's sd is H / sqrt(3n) = 0.0013 H, the variance estimate's
    # sd is about H^2 * sqrt(4 / (45 n)) = 0.00067 H^2; the bounds are 7.7 and 15 of them
    assert abs(w.mean().item()) < 0.01 * H
    assert abs(w.var().item() - H * H / 3) < 0.01 * H * H  # variance of U[-H, H]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_float_layers_start_glorot_uniform(kind):
    layer = (BinaryLinear(300, 100, binarization="none") if kind == "linear"
             else BinaryConv2d(16, 32, 3, binarization="none"))  # built in the test: after the seed fixture
    w = layer.weight.detach()
    receptive = w[0, 0].numel()
    bound = (6 / (w.shape[1] * receptive + w.shape[0] * receptive)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="H must be positive"):
        BinaryLinear(2, 2, H=0)
    with pytest.raises(ValueError, match="unknown binarization"):
        BinaryLinear(2, 2, binarization="xnor")
    with pytest.raises(ValueError, match="stochastic_eval"):
        BinaryLinear(2, 2, stochastic_eval="mean")
    with pytest.raises(ValueError, match="identity, clipped"):  # at construction, not at the first forward pass
        BinaryLinear(2, 2, ste="tanh")


@pytest.mark.parametrize("binarization", ["deterministic", "none"])
def test_biases_start_at_zero(binarization):
    for layer in (BinaryLinear(5, 3, bias=True, binarization=binarization),
                  BinaryConv2d(2, 4, 3, bias=True, binarization=binarization)):
        assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias))
        layer.bias.data.fill_(1.0)
        layer.reset_latent()
        assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias))


def _grads_with_binary_leaf(layer, x, wb, fn):
    """Oracle: the gradients of the same computation with Wb as an ordinary leaf tensor."""
    wb = wb.clone().requires_grad_()
    xl = x.clone().requires_grad_()
    out = fn(xl, wb)
    upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(5))
    out.backward(upstream)
    return out.detach(), wb.grad, xl.grad, upstream


def test_linear_deterministic_forward_and_backward_against_oracle():
    layer = BinaryLinear(30, 12, H=1.0)
    x = torch.randn(8, 30)
    wb = binarize_deterministic(layer.weight.detach())
    ref_out, ref_wgrad, ref_xgrad, upstream = _grads_with_binary_leaf(layer, x, wb, F.linear)
    xl = x.clone().requires_grad_()
    out = layer(xl)
    out.backward(upstream)
    assert torch.equal(out.detach(), ref_out)
    assert torch.equal(layer.weight.grad, ref_wgrad)  # straight-through: dL/dW = dL/dWb
    assert torch.equal(xl.grad, ref_xgrad)  # the input gradient also propagates through Wb


def test_conv_deterministic_forward_and_backward_against_oracle():
    layer = BinaryConv2d(3, 5, 3, padding=1, H=0.5)
    assert isinstance(layer, nn.Conv2d)
    x = torch.randn(2, 3, 6, 6)
    wb = binarize_deterministic(layer.weight.detach(), 0.5)
    ref_out, ref_wgrad, ref_xgrad, upstream = _grads_with_binary_leaf(
        layer, x, wb, lambda a, w: F.conv2d(a, w, padding=1))
    xl = x.clone().requires_grad_()
    out = layer(xl)
    out.backward(upstream)
    assert torch.equal(out.detach(), ref_out)
    assert torch.equal(layer.weight.grad, ref_wgrad)
    assert torch.equal(xl.grad, ref_xgrad)


def test_stochastic_training_samples_afresh_each_pass_from_the_generator():
    layer = BinaryLinear(50, 40, binarization="stochastic")
    x = torch.randn(4, 50)
    set_generator(layer, torch.Generator().manual_seed(0))
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # a new sample every forward pass
    set_generator(layer, torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), a)  # reproducible from the seed
    # the weight used is a +-H matrix: recover it by feeding the identity
    wb = layer(torch.eye(50)).detach().T
    assert torch.equal(wb.abs(), torch.ones_like(wb))


def test_eval_mode_weights_per_binarization():
    x = torch.randn(6, 10)
    det = BinaryLinear(10, 4, binarization="deterministic").eval()
    assert torch.equal(det(x), F.linear(x, binarize_deterministic(det.weight.detach())))
    sto = BinaryLinear(10, 4, binarization="stochastic").eval()
    assert torch.equal(sto(x), F.linear(x, sto.weight.detach()))  # the paper: real-valued weights
    set_stochastic_eval(sto, "sample")
    set_generator(sto, torch.Generator().manual_seed(1))
    sampled = sto(torch.eye(10)).detach().T
    # eq. (2) on the same generator stream: the sampled weights, not the sign of the real ones
    assert torch.equal(sampled, binarize_stochastic(sto.weight.detach(), 1.0, torch.Generator().manual_seed(1)))
    assert not torch.equal(sto(torch.eye(10)).detach().T, sampled)  # a fresh sample every call
    flt = BinaryLinear(10, 4, binarization="none")
    assert torch.equal(flt(x), F.linear(x, flt.weight))
    assert torch.equal(flt.eval()(x), F.linear(x, flt.weight))


def test_binary_weight_is_sign_with_zero_to_plus_H():
    layer = BinaryLinear(3, 2, H=2.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, -0.1, 0.5], [-2.0, 2.0, -0.0]]))
    assert torch.equal(layer.binary_weight(), torch.tensor([[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]]))



@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("H", [1.0, 0.5])
def test_compiled_layer_passes_the_straight_through_gradient(mode, ste, H):
    """Under torch.compile the latent weight gets dL/dWb (masked to |W| <= H for ``clipped``, so latent
    weights exactly at +-H, where clipping leaves many, still learn). For a linear layer dL/dWb =
    upstream^T x whatever Wb is, so the oracle holds for stochastic samples too. torch 2.11's Dynamo
    turned the eager autograd.Function into a zero gradient here (binarize.py)."""
    torch.manual_seed(0)
    layer = BinaryLinear(30, 12, binarization=mode, ste=ste, H=H)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # about a third of |W| > H: the clipped variant's mask matters
        layer.weight[0, :10] = torch.tensor([H, -H] * 5)  # exactly at the bounds: inside the mask
    x, upstream = torch.randn(64, 30, dtype=torch.float64), torch.randn(64, 12, dtype=torch.float64)
    layer.double()
    out = torch.compile(layer, backend=BACKEND, fullgraph=True)(x)
    out.backward(upstream)
    expected = upstream.T @ x
    if ste == "clipped":
        expected = expected * (layer.weight.detach().abs() <= H)
    torch.testing.assert_close(layer.weight.grad, expected)
    used = torch.linalg.lstsq(x, out.detach()).solution.T  # the weights the compiled pass multiplied by
    torch.testing.assert_close(used.abs(), torch.full_like(used, H), rtol=0, atol=1e-9)  # exactly +-H
    if mode == "deterministic":
        torch.testing.assert_close(used, binarize_deterministic(layer.weight.detach(), H), rtol=0, atol=1e-9)
