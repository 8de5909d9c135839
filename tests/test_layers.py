"""BinaryLinear / BinaryConv2d: drop-in behaviour, binary forward, straight-through backward, eval modes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from binaryconnect import layers
from binaryconnect.binarize import binarize_deterministic, binarize_stochastic
from binaryconnect.layers import (
    BinaryConv2d,
    BinaryLinear,
    _autocast_dtype,
    binarize_modules_,
    set_generator,
    set_stochastic_eval,
)
from helpers import DEVICES

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


# --- binarize_modules_: an existing network made BinaryConnect ---

def _float_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True, padding_mode="reflect"), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4), nn.ReLU()),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).to(dtype)
    with torch.no_grad():  # some weights past H, so that the clipping shows
        net[0].weight.mul_(8)
    return net


def _with_weights(net: nn.Module, make) -> nn.Module:
    """A deep copy of the float network whose conv/linear weights are ``make(weight)``: the oracle."""
    import copy

    ref = copy.deepcopy(net)
    for m in ref.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            with torch.no_grad():
                m.weight.copy_(make(m.weight))
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_under_autocast_the_binary_weights_come_in_its_dtype_and_nothing_else_changes(mode, ste, device, monkeypatch):
    # Oracle: the same layer made to give its weights in float32 (as before), which autocast then casts: the
    # output and the gradients (W's float32, the input's) must be the same bit for bit
    torch.manual_seed(0)
    conv = BinaryConv2d(3, 8, 3, padding=1, binarization=mode, ste=ste, H=0.75).to(device)
    with torch.no_grad():
        conv.weight.mul_(1.5)  # some latent weights beyond H: the clipped STE zeroes their gradient
    x = torch.randn(4, 3, 8, 8, device=device)
    seen = []

    def run(out_dtype_of):
        monkeypatch.setattr(layers, "_autocast_dtype", out_dtype_of)
        conv.generator = torch.Generator(device).manual_seed(5)
        xi = x.clone().requires_grad_(True)
        conv.weight.grad = None
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            wb = conv.effective_weight()
            seen.append(wb.dtype)
            y = conv(xi)
        y.float().square().sum().backward()
        return y, conv.weight.grad.clone(), xi.grad

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # same algorithms both times
        y, gw, gx = run(_autocast_dtype)
        y0, gw0, gx0 = run(lambda w: None)
    assert seen == [torch.bfloat16, torch.float32]
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert torch.equal(y, y0) and torch.equal(gw, gw0) and torch.equal(gx, gx0)
    assert (gw == 0).any() == (ste == "clipped")


def test_outside_autocast_and_for_float_layers_the_weights_keep_their_dtype():
    w = torch.zeros(3)
    assert _autocast_dtype(w) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_dtype(w) is torch.bfloat16
        float_layer = BinaryLinear(4, 2, binarization="none")
        assert float_layer.effective_weight() is float_layer.weight  # autocast casts it, as any float weight
        # float64: autocast casts no float64 tensor, so neither do the layers
        double = BinaryLinear(4, 2, dtype=torch.float64)
        assert _autocast_dtype(double.weight) is None
        x = torch.randn(3, 4, dtype=torch.float64)
        y = double(x)
        assert y.dtype == torch.float64 and torch.equal(y, F.linear(x, binarize_deterministic(double.weight.detach())))


@pytest.mark.parametrize("H", [1.0, 0.5])
def test_binarize_modules_computes_the_float_network_with_binary_weights(H):
    """Every conv and linear layer replaced, options (stride, padding mode, dilation, groups, 'same'), bias,
    dtype kept; the latent weights are the old ones clipped to [-H, H]; forward passes (train and eval) equal
    the float network run with weights +-H (sign, zero to +H), exactly."""
    net = _float_net()
    old = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
           for name, m in net.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    ref = _with_weights(net, lambda w: torch.where(w >= 0, H, -H).to(w.dtype))
    assert binarize_modules_(net, H=H) is net
    converted = {name: m for name, m in net.named_modules() if isinstance(m, (BinaryLinear, BinaryConv2d))}
    assert sorted(converted) == sorted(old) == ["0", "2.0", "4"]
    assert type(net[4]) is BinaryLinear and type(net[0]) is BinaryConv2d
    for name, m in converted.items():
        w, b = old[name]
        assert m.H == H and m.binarization == "deterministic" and m.weight.dtype == torch.float64
        assert torch.equal(m.weight.detach(), w.clamp(-H, H))
        assert (m.bias is None) == (b is None) and (b is None or torch.equal(m.bias.detach(), b))
    assert (net[2][0].groups, net[2][0].dilation, net[2][0].padding) == (4, (2, 2), "same")
    assert (net[0].stride, net[0].padding_mode) == ((2, 2), "reflect")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(net, mode)(), getattr(ref, mode)()
        assert torch.equal(net(x), ref(x)), mode


def test_binarize_modules_options_reach_every_layer_and_stochastic_eval_uses_the_latent_weights():
    net = binarize_modules_(_float_net(), "stochastic", ste="clipped", stochastic_eval="real")
    layers = [m for m in net.modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    assert len(layers) == 3 and all((m.binarization, m.ste, m.stochastic_eval) == ("stochastic", "clipped", "real")
                                    for m in layers)
    ref = _with_weights(net, lambda w: w)  # eval with the real-valued (clipped) weights, as the paper does
    net.eval(), ref.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref_layers = [m for m in ref.modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    for m in ref_layers:
        m.binarization = "none"
    assert torch.equal(net(x), ref(x))


def test_binarize_modules_exclude_keeps_layers_in_float_and_refuses_names_it_does_not_know():
    net = _float_net()
    first, last = net[0], net[4]
    binarize_modules_(net, exclude=["0", "4"])
    assert net[0] is first and net[4] is last  # untouched, the same objects
    assert type(net[2][0]) is BinaryConv2d
    with pytest.raises(ValueError, match=r"exclude names no nn.Linear or nn.Conv2d of the model: '2', 'fc'; "
                                         r"those it has: 0, 2.0, 4"):
        binarize_modules_(_float_net(), exclude=["fc", "2"])
    net = _float_net()
    binarize_modules_(net, exclude="4")  # one name as a string, not its characters
    assert type(net[4]) is nn.Linear


def test_binarize_modules_reset_initialises_as_the_paper_and_bad_options_are_refused():
    net = binarize_modules_(_float_net(torch.float32), weights="reset", H=0.5)
    w = net[4].weight.detach()
    assert w.abs().max() <= 0.5 and w.std() > 0.2  # uniform in [-H, H]: std H / sqrt(3) = 0.29
    assert torch.equal(net[0].bias.detach(), torch.zeros(8))
    with pytest.raises(ValueError, match="unknown weights 'copy'; choose one of keep, reset"):
        binarize_modules_(_float_net(), weights="copy")
    with pytest.raises(ValueError, match="unknown binarization 'sign'"):
        binarize_modules_(_float_net(), "sign")
    net = _float_net()
    for bad, message in [({"H": 0.0}, "H must be positive"), ({"ste": "tanh"}, "unknown straight-through"),
                         ({"stochastic_eval": "mean"}, "unknown stochastic_eval")]:
        with pytest.raises(ValueError, match=message):  # before anything is replaced, also with nothing to replace
            binarize_modules_(net, **bad)
        with pytest.raises(ValueError, match=message):
            binarize_modules_(nn.ReLU(), **bad)
    assert type(net[0]) is nn.Conv2d


def test_binarize_modules_keeps_sharing_modes_grads_and_leaves_other_linear_kinds_alone():
    """A layer used twice stays one layer; training mode and requires_grad carry over; already binary layers
    and nn.Linear subclasses (MultiheadAttention's projection reads its weight outside forward) are left
    alone; a bare layer comes back converted."""
    shared = nn.Linear(6, 6)
    shared.bias.requires_grad_(False)
    attention = nn.MultiheadAttention(6, 2)
    done = BinaryLinear(6, 6, binarization="stochastic")
    net = nn.ModuleDict({"a": nn.Sequential(shared, nn.ReLU(), shared), "attn": attention, "done": done}).eval()
    binarize_modules_(net)
    a = net["a"]
    assert type(a[0]) is BinaryLinear and a[0] is a[2] and not a[0].training
    assert a[0].weight.requires_grad and not a[0].bias.requires_grad
    assert net["attn"] is attention and type(attention.out_proj) is not BinaryLinear
    assert net["done"] is done and done.binarization == "stochastic"
    bare = nn.Conv2d(2, 3, 1)
    assert type(binarize_modules_(bare)) is BinaryConv2d


def test_binarize_modules_refuses_what_would_silently_not_be_binary_and_changes_nothing():
    """Tied weights (two layers, or an output layer and its embedding) would be untied, and the linear layers
    of nn.TransformerEncoderLayer would be computed with their latent float weights by PyTorch's inference
    fast path: refused, naming the layers, before anything is replaced; excluding them converts the rest."""
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    net = nn.Sequential(a, nn.ReLU(), b, nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"would untie the weights these layers share with other modules: "
                                         r"0 \(with 2\); 2 \(with 0\): exclude them"):
        binarize_modules_(net)
    assert type(net[3]) is nn.Linear  # nothing replaced
    binarize_modules_(net, exclude=["0", "2"])
    assert net[0].weight is net[2].weight and type(net[3]) is BinaryLinear
    head = nn.Linear(4, 10, bias=False)
    lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": head})
    head.weight = lm["embed"].weight
    with pytest.raises(ValueError, match=r"head \(with embed\)"):
        binarize_modules_(lm)

    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0)
    net = nn.Sequential(encoder, nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"the weights of 0.linear1, 0.linear2 are read by the module holding "
                                         r"them outside their forward"):
        binarize_modules_(net)
    assert type(encoder.linear1) is nn.Linear and type(net[1]) is nn.Linear
    binarize_modules_(net, exclude=["0.linear1", "0.linear2"])
    assert type(net[1]) is BinaryLinear and type(encoder.linear1) is nn.Linear


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("make", [
    lambda: nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),  # class ParametrizedLinear
    lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)),
    lambda: prune.l1_unstructured(nn.Linear(4, 4), "weight", 0.5),  # weight made by a hook
    lambda: nn.utils.weight_norm(nn.Linear(4, 4)),
    lambda: nn.LazyLinear(4),  # becomes an nn.Linear at its first forward pass
], ids=["weight_norm", "spectral_norm", "pruned", "old_weight_norm", "lazy"])
def test_binarize_modules_refuses_a_weight_that_is_not_a_plain_parameter_and_it_can_be_excluded(make):
    net = nn.Sequential(make(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"the weights of 0 are not plain parameters but made by a parametrization"):
        binarize_modules_(net)
    assert type(net[1]) is nn.Linear
    kind = type(net[0])
    binarize_modules_(net, exclude=["0"])
    assert type(net[0]) is kind and type(net[1]) is BinaryLinear


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_binarize_modules_names_the_model_itself_and_converts_empty_layers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = self.fc.weight  # the model holds the layer's weight too

    with pytest.raises(ValueError, match=r"fc \(with \(the model itself\)\)"):
        binarize_modules_(Tied())
    for binarization in ("none", "deterministic"):
        for weights in ("keep", "reset"):
            empty = binarize_modules_(nn.Linear(0, 3), binarization, weights=weights)
            assert empty.weight.shape == (3, 0) and torch.equal(empty(torch.zeros(2, 0)), empty.bias.expand(2, 3))


def test_binarize_modules_a_shared_layer_is_excluded_by_any_of_its_names_and_keep_draws_no_random_numbers():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    binarize_modules_(net, exclude=["2"])
    assert net[0] is shared and net[2] is shared
    net = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 3, 3))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    binarize_modules_(net)  # weights="keep": the old weights are copied, nothing is drawn
    assert torch.equal(torch.rand(3), expected)


def test_binarize_modules_keeps_a_channels_last_weight_channels_last():
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    new = binarize_modules_(conv)
    assert new.weight.is_contiguous(memory_format=torch.channels_last) and not new.weight.is_contiguous()
    assert torch.equal(new.weight.detach(), conv.weight.detach().clamp(-1, 1))



def test_binarize_modules_moves_the_hooks_of_a_replaced_layer_and_their_handles_still_remove_them():
    """A feature-extraction hook on a layer (forward, pre-forward with kwargs, full backward, state-dict) fires
    on its binary replacement, sees the binary layer's output, and its handle removes it from there."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    seen = []
    handles = [
        model[0].register_forward_hook(lambda m, i, o: seen.append(("forward", type(m).__name__, o.detach()))),
        model[0].register_forward_pre_hook(lambda m, a, k: seen.append(("pre", type(m).__name__)), with_kwargs=True),
        model[2].register_full_backward_hook(lambda m, gi, go: seen.append(("backward", type(m).__name__))),
        model[2].register_state_dict_post_hook(lambda m, sd, prefix, local: seen.append(("state", type(m).__name__))),
    ]
    binarize_modules_(model)
    x = torch.randn(2, 5)
    model(x).sum().backward()
    model.state_dict()
    assert [e[:2] for e in seen] == [("pre", "BinaryLinear"), ("forward", "BinaryLinear"),
                                     ("backward", "BinaryLinear"), ("state", "BinaryLinear")]
    w, b = model[0].weight.detach(), model[0].bias.detach()
    assert torch.equal(seen[1][2], F.linear(x, binarize_deterministic(w), b))  # the binary layer's output
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x).sum().backward()
    model.state_dict()
    assert seen == []


def test_binarize_modules_moved_hooks_leave_the_old_layer_and_load_state_dict_hooks_get_the_new_one():
    """The hooks move, they are not shared: a hook registered later on the old layer (kept by the caller) does
    not fire on the new one. A load-state-dict pre-hook (PyTorch keeps its module by weak reference) gets the
    new layer, and still works once the old one is gone."""
    import gc

    old = nn.Linear(4, 3)
    seen = []
    old.register_load_state_dict_pre_hook(lambda m, *args: seen.append(type(m).__name__))
    new = binarize_modules_(old)
    assert not old._load_state_dict_pre_hooks and not old._forward_hooks
    old.register_forward_hook(lambda m, i, o: seen.append("old forward"))
    new(torch.randn(1, 4))
    assert seen == []
    model = nn.Sequential(new)
    state = model.state_dict()
    del old
    gc.collect()
    model.load_state_dict(state)
    assert seen == ["BinaryLinear"]

def test_a_binarized_torchvision_resnet_trains_with_the_papers_scales_and_clipping():
    """torchvision's ResNet-18, first and last layer kept in float: make_optimizer gives each binarized conv
    its Glorot scale, and after a step every latent weight is within [-H, H]."""
    import math

    import torchvision

    from binaryconnect.losses import square_hinge_loss
    from binaryconnect.optim import make_optimizer

    torch.manual_seed(0)
    net = binarize_modules_(torchvision.models.resnet18(num_classes=10), exclude=["conv1", "fc"])
    binary = [m for m in net.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 19 and type(net.conv1) is nn.Conv2d and type(net.fc) is nn.Linear
    optimizer = make_optimizer(net, lr=0.1)
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert scales["layer1.0.conv1.weight"] == pytest.approx(1 / math.sqrt(1.5 / (2 * 64 * 9)))
    assert len(scales) == 20  # one group per binarized weight, one for the rest
    loss = square_hinge_loss(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert all(m.weight.abs().max() <= 1.0 for m in binary)
    assert any(m.weight.abs().max() == 1.0 for m in binary)  # a large learning rate: the clipping did work
